//! [`LeaseGuard`]: a lease kept alive by a background heartbeat, returned on drop.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tessera_api::Lease;
use tokio::task::JoinHandle;

use crate::{Client, ClientError};

/// After a failed heartbeat (no host reachable), the next try comes this soon rather than a
/// whole interval later.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// What happens to a guarded lease, for the application's callback
/// ([`LeaseGuard::start_with_events`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuardEvent {
    /// A heartbeat could not reach any server: the guard keeps trying, telling this at each
    /// failed try. The lease holds until its expiry plus the key's `grace_minutes`; then it
    /// is [`GuardEvent::Lost`].
    Reconnecting { error: String },
    /// A heartbeat went through again after [`GuardEvent::Reconnecting`].
    Reconnected,
    /// The lease is gone (the server no longer knows it, or its answer does not check out
    /// against the vendor root): the application decides whether to save and exit.
    Lost { reason: String },
}

/// The application's callback for [`GuardEvent`]s (called on the runtime's threads).
pub type GuardEvents = Arc<dyn Fn(&GuardEvent) + Send + Sync>;

#[derive(Debug, Default)]
struct Shared {
    lease: Option<Lease>,
    /// Set when the server said the lease is gone (`lease_not_found`): heartbeats stop.
    lost: Option<String>,
    heartbeats: u64,
}

/// Holds a lease: a tokio task heartbeats it every `heartbeat_interval_s` through whichever
/// host of the domain answers, and dropping the guard checks it in (in a spawned task, so
/// drop never blocks). Use [`LeaseGuard::checkin`] to return it and see the result.
#[derive(Debug)]
pub struct LeaseGuard {
    client: Client,
    lease_id: String,
    shared: Arc<Mutex<Shared>>,
    task: Option<JoinHandle<()>>,
}

impl LeaseGuard {
    /// Starts heartbeating `lease` (must be called inside a tokio runtime).
    pub fn start(client: Client, lease: Lease) -> LeaseGuard {
        LeaseGuard::start_with_events(client, lease, Arc::new(|_: &GuardEvent| {}))
    }

    /// [`LeaseGuard::start`], telling `events` when heartbeats fail, come back, or the lease
    /// is lost.
    pub fn start_with_events(client: Client, lease: Lease, events: GuardEvents) -> LeaseGuard {
        let interval = Duration::from_secs(lease.heartbeat_interval_s.max(1));
        let lease_id = lease.lease_id.clone();
        let shared = Arc::new(Mutex::new(Shared {
            lease: Some(lease),
            ..Shared::default()
        }));
        let task = tokio::spawn(heartbeat_loop(
            client.clone(),
            lease_id.clone(),
            interval,
            shared.clone(),
            events,
        ));
        LeaseGuard {
            client,
            lease_id,
            shared,
            task: Some(task),
        }
    }

    pub fn lease_id(&self) -> &str {
        &self.lease_id
    }

    /// The lease as of the last successful heartbeat (or the checkout).
    pub fn lease(&self) -> Lease {
        self.lock()
            .lease
            .clone()
            .expect("a guard always holds its lease")
    }

    /// Why the lease was lost (the server no longer knows it), if it was.
    pub fn lost(&self) -> Option<String> {
        self.lock().lost.clone()
    }

    /// Successful background heartbeats so far.
    pub fn heartbeats(&self) -> u64 {
        self.lock().heartbeats
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops heartbeating and returns the lease, reporting the result.
    pub async fn checkin(mut self) -> Result<(), ClientError> {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self.client.checkin(&self.lease_id).await
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let Some(task) = self.task.take() else {
            return; // checked in explicitly
        };
        task.abort();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let client = self.client.clone();
            let lease_id = self.lease_id.clone();
            runtime.spawn(async move {
                if let Err(error) = client.checkin(&lease_id).await {
                    report_failed_drop_checkin(&lease_id, &error);
                }
            });
        }
    }
}

fn report_failed_drop_checkin(lease_id: &str, error: &ClientError) {
    eprintln!("tessera-client: checkin of lease {lease_id} on drop failed: {error}");
}

/// How long past its expiry the application may keep a lease it cannot renew: the key's
/// `grace_minutes` (the key as the server sent it; with a verifying client, the key checked
/// against the vendor's root).
fn grace_ms(lease: &Lease) -> i64 {
    lease
        .license_key
        .as_ref()
        .and_then(|key| key.get("payload")?.get("grace_minutes")?.as_i64())
        .unwrap_or(0)
        .clamp(0, i64::from(tessera_core::key::GRACE_MINUTES_MAX))
        * 60_000
}

/// When a lease that cannot be renewed is lost: its expiry plus the key's grace.
fn held_until_ms(lease: &Lease) -> i64 {
    lease
        .expires_at
        .as_millisecond()
        .saturating_add(grace_ms(lease))
}

async fn heartbeat_loop(
    client: Client,
    lease_id: String,
    interval: Duration,
    shared: Arc<Mutex<Shared>>,
    events: GuardEvents,
) {
    let mut wait = interval;
    let mut reconnecting = false;
    loop {
        tokio::time::sleep(wait).await;
        match client.heartbeat(&lease_id).await {
            Ok(lease) => {
                {
                    let mut shared = shared.lock().unwrap_or_else(|e| e.into_inner());
                    shared.lease = Some(lease);
                    shared.heartbeats += 1;
                }
                if std::mem::take(&mut reconnecting) {
                    events(&GuardEvent::Reconnected);
                }
                wait = interval;
            }
            Err(error @ (ClientError::Api { .. } | ClientError::Untrusted { .. }))
                if matches!(
                    error.code(),
                    Some(
                        "lease_not_found"
                            | "lease_untrusted"
                            | "lease_secret_wrong"
                            | "lease_secret_required"
                    )
                ) =>
            {
                let reason = error.to_string();
                shared.lock().unwrap_or_else(|e| e.into_inner()).lost = Some(reason.clone());
                events(&GuardEvent::Lost { reason });
                return;
            }
            Err(error) => {
                let lease = shared
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .lease
                    .clone()
                    .expect("a guard always holds its lease");
                let until = held_until_ms(&lease);
                if client.clock.now_ms() >= until {
                    let grace = grace_ms(&lease) / 60_000;
                    let reason = format!(
                        "no server could be reached to renew the lease: it ended at {} and the key's grace of {grace} minutes is over ({error})",
                        lease.expires_at
                    );
                    shared.lock().unwrap_or_else(|e| e.into_inner()).lost = Some(reason.clone());
                    events(&GuardEvent::Lost { reason });
                    return;
                }
                reconnecting = true;
                events(&GuardEvent::Reconnecting {
                    error: error.to_string(),
                });
                wait = RETRY_AFTER_FAILURE.min(interval);
            }
        }
    }
}
