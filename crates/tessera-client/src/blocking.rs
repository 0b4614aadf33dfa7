//! The blocking API: what an application without an async runtime calls (and what the C and
//! Python SDKs are built on).
//!
//! A [`Client`] owns a small runtime (one worker thread, which runs the heartbeats and calls
//! the event callback); its calls block the calling thread until the answer. It identifies
//! the station by the machine ([`crate::station_identity`]) and checks every lease against
//! the vendor's root key given at [`Client::new`]. Two clients share nothing.
//!
//! ```no_run
//! # fn main() -> Result<(), tessera_client::ClientError> {
//! let root = tessera_core::PublicKey::from_base64("…the vendor's key, compiled in…").unwrap();
//! let client = tessera_client::blocking::Client::new(root, Some("http://127.0.0.1:7400"))?;
//! let lease = client.checkout("cad", false, None)?; // heartbeated in the background
//! // … run the licensed feature …
//! lease.checkin()?;
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use tessera_api::{CheckoutRequest, Lease};

use crate::{BorrowStore, Borrowed, ClientError, GuardEvent, LeaseGuard};

/// The application's callback for a held lease's events: the lease id and the event.
pub type LeaseEvents = Arc<dyn Fn(&str, &GuardEvent) + Send + Sync>;

/// How long a checkout with `wait` waits for a license to come free, and how often it asks.
pub const WAIT_FOR: Duration = Duration::from_secs(60);
pub const WAIT_EVERY: Duration = Duration::from_secs(2);

/// A blocking client of one vendor's licenses (see the module docs).
pub struct Client {
    runtime: Arc<tokio::runtime::Runtime>,
    client: crate::Client,
    station: String,
    user: String,
    borrows: Option<BorrowStore>,
}

impl Client {
    /// A client accepting only leases that check out against `vendor_root` (compiled into
    /// the application). `servers`: one URL or a comma-separated list of a domain's or a
    /// pair's hosts; `None` or empty reads `TESSERA_SERVER`. Borrowings are kept in
    /// [`BorrowStore::default_dir`].
    pub fn new(
        vendor_root: tessera_core::PublicKey,
        servers: Option<&str>,
    ) -> Result<Client, ClientError> {
        let servers = servers
            .map(str::to_string)
            .filter(|s| !s.trim().is_empty())
            .or_else(|| std::env::var("TESSERA_SERVER").ok())
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| ClientError::Transport {
                url: String::new(),
                message: "no server: pass the server list or set TESSERA_SERVER".into(),
            })?;
        Client::from_async(crate::Client::new(&servers, None).verifying(vendor_root))
    }

    /// Wraps an async client as configured (a test's clock, say).
    pub fn from_async(client: crate::Client) -> Result<Client, ClientError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tessera")
            .enable_all()
            .build()
            .map_err(|error| ClientError::Transport {
                url: String::new(),
                message: format!("cannot start the SDK's thread: {error}"),
            })?;
        let borrows = BorrowStore::default_dir()
            .map(|dir| BorrowStore::new(dir).for_vendor(client.vendor_root.as_ref()));
        Ok(Client {
            runtime: Arc::new(runtime),
            client,
            station: crate::station_identity(),
            user: std::env::var("USER").unwrap_or_default(),
            borrows,
        })
    }

    /// Keeps borrowings in `store`, in a directory of its own for this vendor (None:
    /// borrowing is not used).
    pub fn with_borrow_store(mut self, store: Option<BorrowStore>) -> Client {
        self.set_borrow_store(store);
        self
    }

    /// [`Client::with_borrow_store`] in place.
    pub fn set_borrow_store(&mut self, store: Option<BorrowStore>) {
        self.borrows = store.map(|store| store.for_vendor(self.client.vendor_root.as_ref()));
    }

    /// This machine's station identity, sent with every checkout.
    pub fn station(&self) -> &str {
        &self.station
    }

    /// The async client underneath.
    pub fn client(&self) -> &crate::Client {
        &self.client
    }

    fn request(&self, component: &str) -> CheckoutRequest {
        CheckoutRequest {
            component: component.into(),
            station: self.station.clone(),
            user: self.user.clone(),
            host: self.station.clone(),
            nonce: String::new(),
            holder_key: String::new(),
            borrow_hours: 0,
        }
    }

    /// A license of `component` for this machine: a borrowing kept here for it, while it
    /// holds; else a lease from the servers, heartbeated in the background until
    /// [`Held::checkin`] (with `wait`, waiting up to [`WAIT_FOR`] for one to come free).
    /// `events` hears when heartbeats fail, come back, or the lease is lost (on the SDK's
    /// thread: note the event there, act on it from the application's own thread).
    pub fn checkout(
        &self,
        component: &str,
        wait: bool,
        events: Option<LeaseEvents>,
    ) -> Result<Held, ClientError> {
        if let Some(held) = self.stored_borrowing(component) {
            return Ok(held);
        }
        let request = self.request(component);
        let client = self.client.clone();
        let guard = self.runtime.block_on(async move {
            let deadline = tokio::time::Instant::now() + WAIT_FOR;
            let lease = loop {
                match client.checkout(&request).await {
                    Err(error)
                        if wait
                            && error.code() == Some("no_licenses_available")
                            && tokio::time::Instant::now() + WAIT_EVERY < deadline =>
                    {
                        tokio::time::sleep(WAIT_EVERY).await;
                    }
                    other => break other.map(|(lease, _)| lease),
                }
            }?;
            let lease_id = lease.lease_id.clone();
            let events = move |event: &GuardEvent| {
                if let Some(events) = &events {
                    events(&lease_id, event);
                }
            };
            Ok::<_, ClientError>(LeaseGuard::start_with_events(
                client,
                lease,
                Arc::new(events),
            ))
        })?;
        Ok(Held {
            runtime: self.runtime.clone(),
            kind: Kind::Guarded(Some(guard)),
        })
    }

    /// Borrows a license of `component` for `hours` (up to the key's `max_borrow_days`) and
    /// keeps it in the borrow store: until it ends, [`Client::checkout`] of the component
    /// answers with it, without a server. [`Held::checkin`] returns it early.
    pub fn borrow(&self, component: &str, hours: u32) -> Result<Held, ClientError> {
        let Some(store) = &self.borrows else {
            return Err(ClientError::Invalid {
                message: "nowhere to keep a borrowing: set TESSERA_BORROW_DIR (or HOME)".into(),
            });
        };
        if hours == 0 {
            return Err(ClientError::Invalid {
                message: "a borrowing lasts at least one hour".into(),
            });
        }
        let request = self.request(component);
        let stored = self.runtime.block_on(self.client.borrow(&request, hours))?;
        store.latest_seen(self.client.clock.now_ms());
        if let Err(error) = store.save(component, &stored) {
            // Not kept: give the seat back rather than hold it where nobody can use it.
            let _ = self.runtime.block_on(self.client.return_borrowed(&stored));
            return Err(ClientError::Transport {
                url: store.dir().display().to_string(),
                message: format!("cannot keep the borrowing: {error}"),
            });
        }
        Ok(self.held_borrowing(component, stored))
    }

    /// The borrowing kept for `component`, if it still checks out. One that does not
    /// (edited, another machine's, a clock far behind) is not used; only one that has ended
    /// is removed.
    fn stored_borrowing(&self, component: &str) -> Option<Held> {
        let store = self.borrows.as_ref()?;
        let stored = store.load(component)?;
        let now = self.client.clock.now_ms();
        if now + (crate::CLOCK_TOLERANCE.as_millis() as i64) < store.latest_seen(now) {
            // The clock was set back since a borrowing was last used: not one to trust.
            return None;
        }
        match self.client.borrowed(&stored, component, &self.station) {
            Ok(_) => Some(self.held_borrowing(component, stored)),
            Err(_) => {
                if stored.lease.expires_at.as_millisecond() <= self.client.clock.now_ms() {
                    store.remove(component);
                }
                None
            }
        }
    }

    fn held_borrowing(&self, component: &str, stored: Borrowed) -> Held {
        Held {
            runtime: self.runtime.clone(),
            kind: Kind::Borrowed {
                stored: Box::new(stored),
                component: component.to_string(),
                client: self.client.clone(),
                store: self.borrows.clone(),
            },
        }
    }
}

/// A license held: a lease heartbeated in the background, or a borrowing.
pub struct Held {
    // Fields drop in order: the lease before the runtime it runs on.
    kind: Kind,
    runtime: Arc<tokio::runtime::Runtime>,
}

enum Kind {
    /// `None` once checked in.
    Guarded(Option<LeaseGuard>),
    Borrowed {
        stored: Box<Borrowed>,
        component: String,
        client: crate::Client,
        store: Option<BorrowStore>,
    },
}

impl Held {
    /// The lease as last renewed (or granted).
    pub fn lease(&self) -> Lease {
        match &self.kind {
            Kind::Guarded(Some(guard)) => guard.lease(),
            Kind::Guarded(None) => unreachable!("a checked-in lease is consumed"),
            Kind::Borrowed { stored, .. } => stored.lease.clone(),
        }
    }

    pub fn lease_id(&self) -> String {
        self.lease().lease_id
    }

    /// Whether this is a borrowing (no heartbeat; held offline until its end).
    pub fn is_borrowed(&self) -> bool {
        matches!(self.kind, Kind::Borrowed { .. })
    }

    /// Why the license is no longer held (lost, or the borrowing ended), or `None`.
    pub fn lost(&self) -> Option<String> {
        match &self.kind {
            Kind::Guarded(guard) => guard.as_ref().and_then(LeaseGuard::lost),
            Kind::Borrowed { stored, client, .. } => (stored.lease.expires_at.as_millisecond()
                <= client.clock.now_ms())
            .then(|| format!("the borrowing ended at {}", stored.lease.expires_at)),
        }
    }

    /// Returns the license: stops the heartbeat and checks the lease in, or returns a
    /// borrowing early (and forgets it here). A borrowing that cannot be returned (no server
    /// reachable) stays kept, and the error says why.
    pub fn checkin(mut self) -> Result<(), ClientError> {
        self.return_now()
    }

    fn return_now(&mut self) -> Result<(), ClientError> {
        match &mut self.kind {
            Kind::Guarded(guard) => match guard.take() {
                Some(guard) => self.runtime.block_on(guard.checkin()),
                None => Ok(()),
            },
            Kind::Borrowed {
                stored,
                component,
                client,
                store,
            } => {
                self.runtime.block_on(client.return_borrowed(stored))?;
                if let Some(store) = store {
                    store.remove(component);
                }
                Ok(())
            }
        }
    }
}

impl Drop for Held {
    /// A lease still held is checked in (a borrowing is kept: that is what it is for).
    fn drop(&mut self) {
        if matches!(self.kind, Kind::Guarded(Some(_)))
            && tokio::runtime::Handle::try_current().is_err()
        {
            let _ = self.return_now();
        }
    }
}
