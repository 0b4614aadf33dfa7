//! What a host of a redundant pair knows of the link to the other host, from the Raft
//! traffic itself (real time, like Raft's own timers):
//!
//! - **heard**: the last time the other host answered one of this host's RPCs, or sent one
//!   this host accepted. A host that has not heard from the other for
//!   `tessera_engine::pair::Timing::HOSTS` serves alone.
//! - **reachable**: the last time anything came back at all, a refusal included: a host
//!   serving alone refuses every Raft RPC (503 `pair_alone`), so the Raft log cannot move
//!   while it issues from its share; the other host sees it is reachable and alone, and
//!   starts the recovery.
//! - **peer alone**: the last time the other host refused an RPC because it serves alone.
//!
//! Times are milliseconds since this link was made (monotonic), 0 = never.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The error code a host serving alone answers every Raft RPC with.
pub const PAIR_ALONE_CODE: &str = "pair_alone";
/// Every Raft answer carries the answering host's pair mode in this header, so the host
/// that proposes knows whether the other one is paired.
pub const MODE_HEADER: &str = "x-tessera-pair-mode";

/// How long the other host's mode, as its last message said, counts.
pub const PEER_MODE_FRESH: Duration = Duration::from_secs(2);

pub use tessera_engine::pair::Mode;

fn mode_code(mode: Mode) -> u8 {
    match mode {
        Mode::Off => 1,
        Mode::Paired => 2,
        Mode::Alone => 3,
        Mode::Recovering => 4,
    }
}

fn mode_from_code(code: u8) -> Option<Mode> {
    Mode::ALL.into_iter().find(|mode| mode_code(*mode) == code)
}

#[derive(Debug)]
pub struct PairLink {
    start: Instant,
    heard_ms: AtomicU64,
    reachable_ms: AtomicU64,
    peer_alone_ms: AtomicU64,
    /// `true` while this host serves alone: the Raft routes refuse every RPC. An RPC holds
    /// the read side while it is handled, so a host going alone waits for those in flight
    /// (an entry it acknowledged is in the log it builds its alone ledger from).
    pub gate: tokio::sync::RwLock<bool>,
    own_mode: AtomicU8,
    peer_mode: AtomicU8,
    peer_mode_ms: AtomicU64,
    /// Grows whenever the pair may no longer be in step (this host leaves `Paired`, the other
    /// host answers as not paired or refuses): an entry proposed before and committed after
    /// a change is not acknowledged (the station retries).
    disturbed: AtomicU64,
}

impl Default for PairLink {
    fn default() -> PairLink {
        PairLink {
            start: Instant::now(),
            heard_ms: AtomicU64::new(0),
            reachable_ms: AtomicU64::new(0),
            peer_alone_ms: AtomicU64::new(0),
            gate: tokio::sync::RwLock::new(false),
            own_mode: AtomicU8::new(mode_code(Mode::Off)),
            peer_mode: AtomicU8::new(0),
            peer_mode_ms: AtomicU64::new(0),
            disturbed: AtomicU64::new(0),
        }
    }
}

impl PairLink {
    fn now_ms(&self) -> u64 {
        // +1: 0 means never.
        self.start.elapsed().as_millis() as u64 + 1
    }

    fn age(&self, at: &AtomicU64) -> Option<Duration> {
        match at.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(self.now_ms().saturating_sub(ms))),
        }
    }

    /// The other host took part in Raft with this one (either direction).
    pub fn heard(&self) {
        let now = self.now_ms();
        self.heard_ms.store(now, Ordering::Relaxed);
        self.reachable_ms.store(now, Ordering::Relaxed);
    }

    /// The other host answered, but refused: it serves alone.
    pub fn peer_alone(&self) {
        let now = self.now_ms();
        self.reachable_ms.store(now, Ordering::Relaxed);
        self.peer_alone_ms.store(now, Ordering::Relaxed);
        self.peer_mode
            .store(mode_code(Mode::Alone), Ordering::SeqCst);
        self.peer_mode_ms.store(now, Ordering::SeqCst);
        self.disturbed.fetch_add(1, Ordering::SeqCst);
    }

    /// The mode the other host's answer carried ([`MODE_HEADER`]).
    pub fn peer_mode_seen(&self, mode: Mode) {
        if !matches!(mode, Mode::Paired | Mode::Off) {
            self.disturbed.fetch_add(1, Ordering::SeqCst);
        }
        self.peer_mode.store(mode_code(mode), Ordering::SeqCst);
        self.peer_mode_ms.store(self.now_ms(), Ordering::SeqCst);
    }

    /// The other host's mode as its last message said (`None`: none in the last
    /// [`PEER_MODE_FRESH`], so a stale mode never sticks).
    pub fn peer_mode(&self) -> Option<Mode> {
        let fresh = self
            .age(&self.peer_mode_ms)
            .is_some_and(|age| age < PEER_MODE_FRESH);
        fresh
            .then(|| mode_from_code(self.peer_mode.load(Ordering::SeqCst)))
            .flatten()
    }

    pub fn set_own_mode(&self, mode: Mode) {
        if mode != Mode::Paired && mode != Mode::Off {
            self.disturbed.fetch_add(1, Ordering::SeqCst);
        }
        self.own_mode.store(mode_code(mode), Ordering::SeqCst);
    }

    pub fn own_mode(&self) -> Mode {
        mode_from_code(self.own_mode.load(Ordering::SeqCst)).unwrap_or(Mode::Off)
    }

    /// See the field: compare before proposing and after the commit.
    pub fn disturbed(&self) -> u64 {
        self.disturbed.load(Ordering::SeqCst)
    }

    /// The other host sent an RPC this host refused (it serves alone).
    pub fn reached_while_alone(&self) {
        self.reachable_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// The link as the pair machine reads it: now, and each time in this link's
    /// milliseconds.
    pub fn view(&self) -> (i64, tessera_engine::pair::Link) {
        let at = |cell: &AtomicU64| match cell.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(ms as i64),
        };
        let link = tessera_engine::pair::Link {
            // `now_ms` counts from 1 at the link's start.
            started_ms: 1,
            heard_ms: at(&self.heard_ms),
            reachable_ms: at(&self.reachable_ms),
            peer_alone_ms: at(&self.peer_alone_ms),
            peer_mode: self.peer_mode(),
        };
        (self.now_ms() as i64, link)
    }

    /// Time since the other host last took part in Raft with this one (`None`: never since
    /// this host started).
    pub fn heard_age(&self) -> Option<Duration> {
        self.age(&self.heard_ms)
    }

    pub fn reachable_age(&self) -> Option<Duration> {
        self.age(&self.reachable_ms)
    }

    pub fn peer_alone_age(&self) -> Option<Duration> {
        self.age(&self.peer_alone_ms)
    }

    /// Time since this link was made (a host that never heard from the other counts from
    /// its start).
    pub fn uptime(&self) -> Duration {
        self.start.elapsed()
    }

    /// Closes (or opens) the Raft routes; closing waits for the RPCs in flight.
    pub async fn set_serving_alone(&self, alone: bool) {
        *self.gate.write().await = alone;
    }
}

#[cfg(test)]
mod tests {
    use super::{Mode, PairLink};

    #[test]
    fn heard_counts_as_reachable_and_a_refusal_only_as_reachable() {
        let link = PairLink::default();
        assert!(link.heard_age().is_none() && link.reachable_age().is_none());
        link.peer_alone();
        assert!(link.heard_age().is_none());
        assert!(link.reachable_age().is_some() && link.peer_alone_age().is_some());
        link.heard();
        assert!(link.heard_age().is_some());
        let before = link.disturbed();
        link.peer_mode_seen(Mode::Paired);
        link.set_own_mode(Mode::Paired);
        assert_eq!(link.disturbed(), before);
        link.peer_mode_seen(Mode::Recovering);
        assert!(link.disturbed() > before);
        assert_eq!(link.peer_mode(), Some(Mode::Recovering));
        assert_eq!(Mode::parse("alone"), Some(Mode::Alone));
    }
}
