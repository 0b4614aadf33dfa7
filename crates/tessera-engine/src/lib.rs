//! Tessera's protocol rules as pure state machines.
//!
//! An engine holds only the state its rule needs. Each input is a call of the shape
//! `on_*(&mut self, now_ms, &Ledger, input) -> Vec<Action>`. The engine reads no clock,
//! does no I/O and spawns nothing; the caller carries out the actions in order and reports
//! how the slow ones ended through another `on_*` call. Two runtimes drive the same code:
//!
//! - `tessera-server` on real hosts (HTTP, SQLite, Raft, a monotonic clock);
//! - `tessera-sim` on simulated hosts (a model of the log, seeded faults, simulated time).
//!
//! A rule written here is therefore the one the simulator checks and the one that ships.
//!
//! - [`link`]: the neighbour link (push and renewal timing, the grants a donor signs, what a
//!   receiver holds and gives back, what a donor takes back and how it compares records).
//! - [`pair`]: the redundant pair's Off / Paired / Alone / Recovering machine.
//! - [`schedule`]: the primary's schedules (the expiry beacon, the automatic sync, the
//!   sync-deadline warnings).

pub mod link;
pub mod pair;
pub mod schedule;
