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
    /// failed try. The lease holds until its end, which includes the key's `grace_minutes`
    /// (the server counts the seat through it); then it is [`GuardEvent::Lost`].
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

/// The key's `grace_minutes`, for the lost-lease message (the key as the server sent it).
fn grace_minutes(lease: &Lease) -> i64 {
    lease
        .license_key
        .as_ref()
        .and_then(|key| key.get("payload")?.get("grace_minutes")?.as_i64())
        .unwrap_or(0)
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
    // How long the lease has left, measured on the monotonic clock from its last renewal:
    // setting the date back does not stretch it.
    let left_ms = |lease: &Lease| lease.expires_at.as_millisecond() - client.clock.now_ms();
    let first = shared
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .lease
        .as_ref()
        .map(&left_ms)
        .unwrap_or(0);
    let mut renewed = (client.clock.monotonic_ms(), first);
    loop {
        tokio::time::sleep(wait).await;
        match client.heartbeat(&lease_id).await {
            Ok(lease) => {
                renewed = (client.clock.monotonic_ms(), left_ms(&lease));
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
            // The server refused to renew it (gone, another holder's, no seat left for it), or
            // the answer does not check out: lost. Only unreachable servers and 5xx retry.
            Err(
                error @ (ClientError::Api {
                    status: 400..=499, ..
                }
                | ClientError::Untrusted { .. }),
            ) => {
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
                // The lease's end includes the key's grace: the server counts the seat that
                // long, so the application may run until then without a server.
                let (renewed_at, left) = renewed;
                if client.clock.now_ms() >= lease.expires_at.as_millisecond()
                    || client.clock.monotonic_ms() - renewed_at >= left
                {
                    let reason = format!(
                        "no server could be reached to renew the lease: it ended at {}, the key's grace of {} minutes included ({error})",
                        lease.expires_at,
                        grace_minutes(&lease)
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
