//! Notifications: every notable event goes to the log, to a ring of recent events
//! (`GET /v1/events`) that is also stored in the usage history database (so the list and
//! its ids outlive a restart), and to the channels configured for its kind: a webhook (JSON POST signed
//! with HMAC-SHA256, retried with backoff) and a user hook (an executable that gets the event
//! as JSON on stdin, with a timeout). The hook runs after the webhook delivery, for each event.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::history::{Notification, NotificationLog};

/// How many recent events are kept in memory for the API and the console.
pub const RECENT_EVENTS_MAX: usize = 500;
/// Events waiting for delivery; beyond this, new events are logged but not delivered.
const DELIVERY_QUEUE_MAX: usize = 1024;
const WEBHOOK_ATTEMPTS_MAX: u32 = 5;
const WEBHOOK_FIRST_BACKOFF: Duration = Duration::from_millis(500);
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
pub const SIGNATURE_HEADER: &str = "x-tessera-signature";

/// The kind of an event: what happened. Its name (`as_str`) is the `kind` of the event's
/// JSON, of webhooks and of notification rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    ClockSetBack,
    ComponentExhausted,
    DenialSpike,
    DomainHostBack,
    DomainHostLost,
    DonationEnded,
    GrantForged,
    GrantReduced,
    GrantRefused,
    GrantReleased,
    KeyExpired,
    KeyExpiring,
    KeyImported,
    KeyNotUpdated,
    KeyRemoved,
    KeyUpdated,
    LicenseMismatch,
    LicensesDonated,
    LicensesReturned,
    NeighbourLinkFailed,
    NeighbourLinkRestored,
    NeighbourRefused,
    PairJournalLost,
    PairStatus,
    PrimaryChanged,
    SyncBlocked,
    SyncCompleted,
    SyncDeadlineNear,
    SyncFailed,
    TrustChanged,
}

impl EventKind {
    /// Every kind, for checking the kinds a notification rule names.
    pub const ALL: &[EventKind] = &[
        EventKind::ClockSetBack,
        EventKind::ComponentExhausted,
        EventKind::DenialSpike,
        EventKind::DomainHostBack,
        EventKind::DomainHostLost,
        EventKind::DonationEnded,
        EventKind::GrantForged,
        EventKind::GrantReduced,
        EventKind::GrantRefused,
        EventKind::GrantReleased,
        EventKind::KeyExpired,
        EventKind::KeyExpiring,
        EventKind::KeyImported,
        EventKind::KeyNotUpdated,
        EventKind::KeyRemoved,
        EventKind::KeyUpdated,
        EventKind::LicenseMismatch,
        EventKind::LicensesDonated,
        EventKind::LicensesReturned,
        EventKind::NeighbourLinkFailed,
        EventKind::NeighbourLinkRestored,
        EventKind::NeighbourRefused,
        EventKind::PairJournalLost,
        EventKind::PairStatus,
        EventKind::PrimaryChanged,
        EventKind::SyncBlocked,
        EventKind::SyncCompleted,
        EventKind::SyncDeadlineNear,
        EventKind::SyncFailed,
        EventKind::TrustChanged,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::ClockSetBack => "clock_set_back",
            EventKind::ComponentExhausted => "component_exhausted",
            EventKind::DenialSpike => "denial_spike",
            EventKind::DomainHostBack => "domain_host_back",
            EventKind::DomainHostLost => "domain_host_lost",
            EventKind::DonationEnded => "donation_ended",
            EventKind::GrantForged => "grant_forged",
            EventKind::GrantReduced => "grant_reduced",
            EventKind::GrantRefused => "grant_refused",
            EventKind::GrantReleased => "grant_released",
            EventKind::KeyExpired => "key_expired",
            EventKind::KeyExpiring => "key_expiring",
            EventKind::KeyImported => "key_imported",
            EventKind::KeyNotUpdated => "key_not_updated",
            EventKind::KeyRemoved => "key_removed",
            EventKind::KeyUpdated => "key_updated",
            EventKind::LicenseMismatch => "license_mismatch",
            EventKind::LicensesDonated => "licenses_donated",
            EventKind::LicensesReturned => "licenses_returned",
            EventKind::NeighbourLinkFailed => "neighbour_link_failed",
            EventKind::NeighbourLinkRestored => "neighbour_link_restored",
            EventKind::NeighbourRefused => "neighbour_refused",
            EventKind::PairJournalLost => "pair_journal_lost",
            EventKind::PairStatus => "pair_status",
            EventKind::PrimaryChanged => "primary_changed",
            EventKind::SyncBlocked => "sync_blocked",
            EventKind::SyncCompleted => "sync_completed",
            EventKind::SyncDeadlineNear => "sync_deadline_near",
            EventKind::SyncFailed => "sync_failed",
            EventKind::TrustChanged => "trust_changed",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How much an event matters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Severity {
    Info,
    Warning,
    Error,
    /// The promise "never more licenses than sold" is at stake (a lost or edited journal, a
    /// forged grant).
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
            Severity::Critical => "critical",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    pub id: u64,
    #[schema(value_type = String, format = DateTime)]
    pub at: Timestamp,
    /// e.g. `key_updated`, `key_not_updated`, `sync_deadline_near`, `sync_failed`. Between
    /// neighbour servers: `licenses_donated`, `donation_ended`, `licenses_returned` (a
    /// receiver gave licenses back), `license_mismatch` (the synchronization found donor and
    /// receiver records differ; the message names both counts), `neighbour_link_failed`,
    /// `neighbour_link_restored`, `neighbour_refused` (a message from another server was
    /// refused here), and on the receiver `grant_refused`, `grant_reduced`, `grant_released`
    /// (the donor called its licenses back), `grant_forged` (critical: it held a grant the
    /// donor's chain of grants does not contain). A redundant pair: `pair_status` (the pair status
    /// changed; `info` for Paired and Available, else `warning`; details: the whole status).
    pub kind: String,
    /// `info`, `warning` or `error`.
    pub severity: String,
    pub server_id: Option<String>,
    /// The number of the domain host that raised it; null on a single server. Each host
    /// numbers its own events: `id` names an event together with `host`.
    pub host: Option<u64>,
    pub message: String,
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
}

impl Event {
    /// The row the usage history keeps of it (table `notification`).
    pub fn stored(&self) -> Notification {
        Notification {
            id: self.id,
            at_ms: self.at.as_millisecond(),
            kind: self.kind.clone(),
            severity: self.severity.clone(),
            server_id: self.server_id.clone(),
            host: self.host,
            message: self.message.clone(),
            details: self.details.clone(),
        }
    }

    /// The event a stored row was made of.
    pub fn from_stored(row: Notification) -> Event {
        Event {
            id: row.id,
            at: Timestamp::from_millisecond(row.at_ms).unwrap_or(Timestamp::UNIX_EPOCH),
            kind: row.kind,
            severity: row.severity,
            server_id: row.server_id,
            host: row.host,
            message: row.message,
            details: row.details,
        }
    }
}

/// One `[[notification]]` entry of the configuration.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotificationRule {
    /// Event kinds this rule is for; `"*"` for all.
    pub events: Vec<String>,
    /// URL to POST each event to.
    pub webhook: Option<String>,
    /// HMAC-SHA256 key for the webhook's `X-Tessera-Signature: sha256=<hex>` header.
    pub secret: Option<String>,
    /// Executable run with the event as JSON on stdin.
    pub hook: Option<PathBuf>,
    /// e.g. "10s" (default).
    pub hook_timeout: Option<String>,
}

impl NotificationRule {
    fn matches(&self, kind: &str) -> bool {
        self.events.iter().any(|e| e == "*" || e == kind)
    }
}

pub struct Notifier {
    server_id: Option<String>,
    host: Option<u64>,
    next_id: AtomicU64,
    recent: Mutex<VecDeque<Event>>,
    store: NotificationLog,
    queue: Option<mpsc::Sender<Event>>,
}

impl Notifier {
    /// Starts the delivery task if any rule has a channel. `earlier` are the stored events
    /// (oldest first): the list starts with them and the next id follows the highest.
    pub fn start(
        server_id: Option<String>,
        host: Option<u64>,
        rules: Vec<NotificationRule>,
        earlier: Vec<Event>,
        store: NotificationLog,
        http: reqwest::Client,
    ) -> Notifier {
        let queue = if rules
            .iter()
            .any(|r| r.webhook.is_some() || r.hook.is_some())
        {
            let (sender, receiver) = mpsc::channel(DELIVERY_QUEUE_MAX);
            tokio::spawn(deliver_all(rules, receiver, http));
            Some(sender)
        } else {
            None
        };
        let next_id = earlier.iter().map(|event| event.id + 1).max().unwrap_or(1);
        let skip = earlier.len().saturating_sub(RECENT_EVENTS_MAX);
        Notifier {
            server_id,
            host,
            next_id: AtomicU64::new(next_id),
            recent: Mutex::new(earlier.into_iter().skip(skip).collect()),
            store,
            queue,
        }
    }

    pub fn emit(
        &self,
        at_ms: i64,
        kind: EventKind,
        severity: Severity,
        message: String,
        details: serde_json::Value,
    ) {
        let (kind, severity) = (kind.as_str(), severity.as_str());
        let event = Event {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            at: Timestamp::from_millisecond(at_ms).unwrap_or(Timestamp::UNIX_EPOCH),
            kind: kind.to_string(),
            severity: severity.to_string(),
            server_id: self.server_id.clone(),
            host: self.host,
            message,
            details,
        };
        match severity {
            "error" | "critical" => tracing::error!(kind, message = %event.message, "event"),
            "warning" => tracing::warn!(kind, message = %event.message, "event"),
            _ => tracing::info!(kind, message = %event.message, "event"),
        }
        {
            let mut recent = self.recent.lock().expect("events lock");
            if recent.len() == RECENT_EVENTS_MAX {
                recent.pop_front();
            }
            recent.push_back(event.clone());
        }
        self.store.record(event.stored());
        if let Some(queue) = &self.queue
            && queue.try_send(event).is_err()
        {
            tracing::warn!(
                kind,
                "notification queue full: event logged but not delivered"
            );
        }
    }

    /// Newest first.
    pub fn recent(&self) -> Vec<Event> {
        self.recent
            .lock()
            .expect("events lock")
            .iter()
            .rev()
            .cloned()
            .collect()
    }
}

/// Delivers events to their webhooks (with `client`: HTTPS trusting the system's roots and
/// the server's `tls_ca`) and hooks.
async fn deliver_all(
    rules: Vec<NotificationRule>,
    mut receiver: mpsc::Receiver<Event>,
    client: reqwest::Client,
) {
    while let Some(event) = receiver.recv().await {
        let body = serde_json::to_vec(&event).expect("events serialize");
        for rule in rules.iter().filter(|rule| rule.matches(&event.kind)) {
            if let Some(url) = &rule.webhook {
                send_webhook(&client, url, rule.secret.as_deref(), &body).await;
            }
            if let Some(hook) = &rule.hook {
                let timeout = rule
                    .hook_timeout
                    .as_deref()
                    .and_then(|t| humantime::parse_duration(t).ok())
                    .unwrap_or(Duration::from_secs(10));
                run_hook(hook, &body, timeout).await;
            }
        }
    }
}

/// `sha256=<hex of HMAC-SHA256(secret, body)>`.
pub fn sign_body(secret: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

async fn send_webhook(client: &reqwest::Client, url: &str, secret: Option<&str>, body: &[u8]) {
    let mut backoff = WEBHOOK_FIRST_BACKOFF;
    for attempt in 1..=WEBHOOK_ATTEMPTS_MAX {
        let mut request = client
            .post(url)
            .timeout(WEBHOOK_TIMEOUT)
            .header("content-type", "application/json")
            .body(body.to_vec());
        if let Some(secret) = secret {
            request = request.header(SIGNATURE_HEADER, sign_body(secret, body));
        }
        match request.send().await {
            Ok(response) if response.status().is_success() => return,
            Ok(response) => {
                tracing::warn!(url, attempt, status = %response.status(), "webhook refused")
            }
            Err(error) => tracing::warn!(url, attempt, %error, "webhook unreachable"),
        }
        if attempt < WEBHOOK_ATTEMPTS_MAX {
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }
    tracing::error!(
        url,
        "webhook delivery abandoned after {WEBHOOK_ATTEMPTS_MAX} attempts"
    );
}

async fn run_hook(hook: &PathBuf, body: &[u8], timeout: Duration) {
    let child = tokio::process::Command::new(hook)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(error) => {
            tracing::error!(hook = %hook.display(), %error, "cannot run user hook");
            return;
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(body).await;
    }
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(output)) if output.status.success() => {}
        Ok(Ok(output)) => tracing::warn!(
            hook = %hook.display(),
            status = %output.status,
            stderr = %String::from_utf8_lossy(&output.stderr),
            "user hook failed"
        ),
        Ok(Err(error)) => tracing::error!(hook = %hook.display(), %error, "user hook failed"),
        Err(_) => {
            tracing::error!(hook = %hook.display(), ?timeout, "user hook timed out and was killed")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_signatures_are_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign_body("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
