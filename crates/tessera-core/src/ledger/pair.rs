//! A redundant pair: two hosts that keep one ledger, and keep serving alone without ever
//! issuing, between them, more than a key holds.
//!
//! While the hosts reach each other every entry is on both before it is acknowledged, and
//! the primary issues from all of a key's licenses. The licenses of each key are split into
//! two **shares**, the primary's and the backup's (`SetPairSplit`: the backup's percentage,
//! default half), and every lease records which share pays for it. The split is a replicated
//! fact: both hosts hold the same tags, so when they lose each other they agree on who owns
//! what without talking. Paired, the ledger keeps each share's leases within its size and
//! gives each new lease to the share with more free licenses (in proportion to its size), so
//! the free licenses stay split as configured.
//!
//! **Alone** (`Ledger::set_alone`, not replicated: a host that cannot reach the other), a host
//! issues only from its own share, renews a lease of the other share only by taking it over
//! (spending a license of its own share), and frees a license only into its own share. Since
//! each host stays within its own share and the shares add up to the key, the pair never
//! exceeds a key, whichever host died or whether the network only split. Admin changes wait
//! for the pair (`invalid_request`).
//!
//! On reconnect both hosts' states enter the replicated log in one `MergeAlone`; until a host
//! knows it is committed, it serves nobody (Recovering). Each host is
//! the authority over its own share: what the pair holds afterwards is, for each share, the
//! leases its host held in it when the pair came back (`Ledger::alone_state`) — including
//! leases it took over — and for a host that never served alone (it was down), its share's
//! leases as the log has them. A lease both hosts hold (one took it over) is kept once, as
//! renewed last; a station keeps one lease per key. So no lease a station was told it holds is
//! lost, none is duplicated, and a lease neither host holds in its own share — a checkout
//! that was in the log but never acknowledged, which the other host never saw — does not
//! come back to life. Then the shares are rebalanced.
//!
//! A host going alone first applies every entry of its own log, committed or not (an entry
//! it has may have been acknowledged by the other host), then serves alone from there.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use smallvec::SmallVec;

use super::{KeyRecord, Lease, LeaseView, Ledger, invalid};
use crate::command::Command;
use crate::outcome::{Outcome, Refusal};
use crate::records::{AloneLease, AloneState, Share};

/// The pair's state in the ledger.
#[derive(Clone, Debug, Default)]
pub(super) struct PairState {
    /// The backup's share of every key, in percent; `None`: not a pair.
    pub backup_percent: Option<u8>,
    /// Leases paid by the backup's share (every other lease is the primary's).
    pub backup_leases: BTreeSet<Arc<str>>,
    /// Set on a host serving alone (not replicated, not in snapshots).
    pub alone: Option<Share>,
    /// Per share, the latest epoch merged.
    pub merged_epochs: BTreeMap<Share, u64>,
}

impl Ledger {
    /// Serve alone as `share`'s host (`None`: paired again). A host sets this on its own copy
    /// of the ledger while it cannot reach the other host; see the module docs.
    pub fn set_alone(&mut self, share: Option<Share>) {
        self.pair.alone = share;
    }

    pub fn alone(&self) -> Option<Share> {
        self.pair.alone
    }

    /// The backup's share in percent, if this ledger is a pair's.
    pub fn pair_backup_percent(&self) -> Option<u8> {
        self.pair.backup_percent
    }

    /// Which share pays for a lease.
    pub fn lease_share(&self, lease_id: &str) -> Share {
        if self.pair.backup_leases.contains(lease_id) {
            Share::Backup
        } else {
            Share::Primary
        }
    }

    /// The latest epoch of `share`'s alone state the pair merged (0: none).
    pub fn merged_epoch(&self, share: Share) -> u64 {
        self.pair.merged_epochs.get(&share).copied().unwrap_or(0)
    }

    /// The leases this host holds in its own share while alone, for `MergeAlone` (epoch 0:
    /// the caller sets it).
    pub fn alone_state(&self) -> Option<AloneState> {
        let share = self.pair.alone?;
        let mut leases: Vec<AloneLease> = self
            .leases
            .values()
            .filter(|lease| self.lease_share(&lease.id) == share)
            .map(|lease| AloneLease {
                lease: lease.view(),
                share,
            })
            .collect();
        leases.sort_by(|a, b| a.lease.lease_id.cmp(&b.lease.lease_id));
        Some(AloneState {
            share,
            epoch: 0,
            leases,
        })
    }

    /// The sizes of a key's two shares at `at`: (primary, backup). Not a pair: all primary.
    pub(super) fn share_sizes(&self, record: &KeyRecord, at: i64) -> (u32, u32) {
        let usable = record
            .licenses(at)
            .saturating_sub(record.donated + record.ended_early);
        let backup = match self.pair.backup_percent {
            Some(percent) => (u64::from(usable) * u64::from(percent) / 100) as u32,
            None => 0,
        };
        (usable - backup, backup)
    }

    /// Free licenses of one share (negative when it is over, which only a shrinking key
    /// causes; the next rebalance moves leases).
    pub(super) fn share_free(&self, record: &KeyRecord, at: i64, share: Share) -> i64 {
        let (primary, backup) = self.share_sizes(record, at);
        let in_use_backup = i64::from(record.in_use_backup);
        match share {
            Share::Primary => {
                i64::from(primary) - (i64::from(record.in_use + record.ended_early) - in_use_backup)
            }
            Share::Backup => i64::from(backup) - in_use_backup,
        }
    }

    /// The share a new lease of `record` would be paid by, if it may have one now.
    pub(super) fn new_lease_share(&self, record: &KeyRecord, at: i64) -> Option<Share> {
        if record.free(at) == 0 {
            return None;
        }
        if let Some(share) = self.pair.alone {
            return (self.share_free(record, at, share) > 0).then_some(share);
        }
        let Some(percent) = self.pair.backup_percent else {
            return Some(Share::Primary);
        };
        // The share with more free licenses in proportion to its size, so the free licenses
        // stay split as configured.
        let free_primary = self.share_free(record, at, Share::Primary).max(0) as u64;
        let free_backup = self.share_free(record, at, Share::Backup).max(0) as u64;
        let weighted_primary = free_primary * u64::from(percent);
        let weighted_backup = free_backup * u64::from(100 - percent);
        if free_backup > 0 && (weighted_backup > weighted_primary || free_primary == 0) {
            Some(Share::Backup)
        } else if free_primary > 0 {
            Some(Share::Primary)
        } else {
            None
        }
    }

    /// Alone: a lease of the other share is renewed here only by taking it over with a license
    /// of this host's share. `Ok` when the lease may be renewed (taken over if needed).
    pub(super) fn take_over(&mut self, lease_id: &str, at: i64) -> Result<(), Box<Outcome>> {
        let Some(mine) = self.pair.alone else {
            return Ok(());
        };
        if self.lease_share(lease_id) == mine {
            return Ok(());
        }
        let key_id = self.leases[lease_id].key_id.clone();
        let record = &self.keys[&*key_id];
        if self.share_free(record, at, mine) <= 0 {
            let lease = &self.leases[lease_id];
            return Err(Box::new(Outcome::Refused {
                refusal: Refusal::NoLicensesAvailable {
                    component: lease.components.first().map_or("", |c| &**c).into(),
                    licenses: record.licenses(at),
                    alone_share: Some({
                        let (primary, backup) = self.share_sizes(record, at);
                        match mine {
                            Share::Primary => primary,
                            Share::Backup => backup,
                        }
                    }),
                },
            }));
        }
        let id = self.leases[lease_id].id.clone();
        self.tag(&id, mine);
        Ok(())
    }

    /// Records which share pays for a lease (the lease exists).
    pub(super) fn tag(&mut self, lease_id: &Arc<str>, share: Share) {
        let key_id = self.leases[lease_id].key_id.clone();
        let was_backup = self.pair.backup_leases.contains(lease_id);
        let record = self.keys.get_mut(&*key_id).expect("a lease's key exists");
        match (was_backup, share) {
            (false, Share::Backup) => {
                self.pair.backup_leases.insert(lease_id.clone());
                record.in_use_backup += 1;
            }
            (true, Share::Primary) => {
                self.pair.backup_leases.remove(lease_id);
                record.in_use_backup -= 1;
            }
            _ => {}
        }
    }

    /// A lease left the ledger: its share no longer pays for it.
    pub(super) fn untag(&mut self, lease: &Lease) {
        if self.pair.backup_leases.remove(&lease.id)
            && let Some(record) = self.keys.get_mut(&*lease.key_id)
        {
            record.in_use_backup -= 1;
        }
    }

    /// Alone, a host serves stations only: everything else waits for the pair.
    pub(super) fn refused_alone(&self, command: &Command) -> Option<Outcome> {
        self.pair.alone?;
        match command {
            Command::Checkout { .. }
            | Command::Heartbeat { .. }
            | Command::Checkin { .. }
            | Command::ForceRelease { .. }
            | Command::Expire => None,
            other => Some(invalid(format!(
                "the pair's hosts cannot reach each other: this host serves stations alone, within its share of the licenses; {} waits until the pair is back",
                other.name()
            ))),
        }
    }

    pub(super) fn set_pair_split(&mut self, backup_percent: Option<u8>, at: i64) -> Outcome {
        if backup_percent.is_some_and(|p| p > 100) {
            return invalid("the backup's share is a percentage, 0 to 100".into());
        }
        self.pair.backup_percent = backup_percent;
        if backup_percent.is_none() {
            let tagged: Vec<Arc<str>> = self.pair.backup_leases.iter().cloned().collect();
            for id in tagged {
                self.tag(&id, Share::Primary);
            }
        }
        self.rebalance(at);
        Outcome::PairSplitSet { backup_percent }
    }

    /// Paired: keeps each share's leases within its size (a key's usable licenses can shrink:
    /// donations, lapsed grants), moving the newest leases across.
    pub(super) fn rebalance(&mut self, at: i64) {
        if self.pair.backup_percent.is_none() || self.pair.alone.is_some() {
            return;
        }
        let keys: Vec<String> = self.keys.keys().cloned().collect();
        for key_id in keys {
            loop {
                let record = &self.keys[&key_id];
                let (primary, backup) = self.share_sizes(record, at);
                let in_use_backup = record.in_use_backup;
                let in_use_primary = record.in_use + record.ended_early - in_use_backup;
                let from = if in_use_backup > backup && in_use_primary < primary {
                    Share::Backup
                } else if in_use_primary > primary && in_use_backup < backup {
                    Share::Primary
                } else {
                    break;
                };
                let Some(id) = self.newest_lease_of(&key_id, from) else {
                    break;
                };
                self.tag(&id, from.other());
            }
        }
    }

    /// The lease of `key_id` paid by `share` that expires last (ties: the highest id).
    fn newest_lease_of(&self, key_id: &str, share: Share) -> Option<Arc<str>> {
        self.expiry
            .iter()
            .rev()
            .map(|(_, id)| id)
            .find(|id| *self.leases[&**id].key_id == *key_id && self.lease_share(id) == share)
            .cloned()
    }

    /// Applies both hosts' states after serving alone; see the module docs. `None`: that host
    /// did not serve alone (its share stays as the log has it).
    pub(super) fn merge_alone(&mut self, states: &[AloneState], at: i64) -> Outcome {
        if states
            .iter()
            .enumerate()
            .any(|(n, state)| states[..n].iter().any(|other| other.share == state.share))
        {
            return invalid("a merge holds at most one state per share".into());
        }
        // The pair's leases from now on: each share as its host holds it, the later renewal of
        // a lease both hold, and one lease per station and key.
        let authorities: BTreeSet<Share> = states.iter().map(|state| state.share).collect();
        let mut target: BTreeMap<String, AloneLease> = BTreeMap::new();
        for lease in self.leases.values() {
            let share = self.lease_share(&lease.id);
            if !authorities.contains(&share) {
                target.insert(
                    lease.id.to_string(),
                    AloneLease {
                        lease: lease.view(),
                        share,
                    },
                );
            }
        }
        for state in states {
            for held in state.leases.iter().filter(|held| held.share == state.share) {
                let later = target
                    .get(&held.lease.lease_id)
                    .is_none_or(|other| held.lease.renewed_at_ms > other.lease.renewed_at_ms);
                if later && held.lease.expires_at_ms > at {
                    target.insert(held.lease.lease_id.clone(), held.clone());
                }
            }
        }
        let mut by_station: BTreeMap<(&str, &str), &AloneLease> = BTreeMap::new();
        for held in target.values() {
            let slot = by_station
                .entry((held.lease.station.as_str(), held.lease.key_id.as_str()))
                .or_insert(held);
            if held.lease.renewed_at_ms > slot.lease.renewed_at_ms {
                *slot = held;
            }
        }
        let keep: BTreeMap<String, AloneLease> = by_station
            .into_values()
            .map(|held| (held.lease.lease_id.clone(), held.clone()))
            .collect();
        // Leases no host holds any more end first, so the others fit.
        let gone: Vec<Arc<str>> = self
            .leases
            .keys()
            .filter(|id| !keep.contains_key(&***id))
            .cloned()
            .collect();
        let removed = gone.len() as u32;
        for id in &gone {
            self.remove_lease(id);
        }
        let (mut merged, mut dropped) = (0, 0);
        for held in keep.values() {
            match self.leases.get(held.lease.lease_id.as_str()) {
                Some(existing) => {
                    let id = existing.id.clone();
                    if held.lease.renewed_at_ms > existing.renewed_at_ms
                        || held.share != self.lease_share(&id)
                    {
                        let expires_at_ms = existing.expires_at_ms.max(held.lease.expires_at_ms);
                        self.expiry.remove(&(existing.expires_at_ms, id.clone()));
                        let existing = self.leases.get_mut(&id).expect("present");
                        existing.expires_at_ms = expires_at_ms;
                        existing.renewed_at_ms =
                            existing.renewed_at_ms.max(held.lease.renewed_at_ms);
                        self.expiry.insert((expires_at_ms, id.clone()));
                        self.tag(&id, held.share);
                        merged += 1;
                    }
                }
                None => match self.merge_new_lease(&held.lease, held.share, at) {
                    Some(true) => merged += 1,
                    Some(false) => {}
                    None => dropped += 1,
                },
            }
        }
        for state in states {
            let merged = self.pair.merged_epochs.entry(state.share).or_default();
            *merged = (*merged).max(state.epoch);
        }
        self.rebalance(at);
        Outcome::AloneMerged {
            leases_merged: merged,
            leases_removed: removed,
            leases_dropped: dropped,
        }
    }

    /// A lease one host created alone (its station holds no other lease of the key now).
    /// `None` if it cannot fit (a key that shrank meanwhile): dropped, counted in the outcome.
    fn merge_new_lease(&mut self, lease: &LeaseView, share: Share, at: i64) -> Option<bool> {
        self.keys.get(lease.key_id.as_str())?;
        if self.station_lease(&lease.station, &lease.key_id).is_some() {
            return Some(false);
        }
        let record = &self.keys[lease.key_id.as_str()];
        if record.free(at) == 0 {
            return None;
        }
        let components: SmallVec<[Arc<str>; 1]> = lease
            .components
            .iter()
            .filter_map(|c| record.component(c).cloned())
            .collect();
        let key_id = record.id.clone();
        let station = self
            .by_station
            .get_key_value(lease.station.as_str())
            .map(|(station, _)| station.clone())
            .unwrap_or_else(|| Arc::from(lease.station.as_str()));
        let id: Arc<str> = Arc::from(lease.lease_id.as_str());
        self.insert_lease(Lease {
            id: id.clone(),
            key_id,
            components,
            station,
            user: lease.user.as_str().into(),
            host: lease.host.as_str().into(),
            issued_at_ms: lease.issued_at_ms,
            renewed_at_ms: lease.renewed_at_ms,
            expires_at_ms: lease.expires_at_ms,
            // A host serving alone keeps no borrowing flag in its journal: the merged lease
            // counts until its end all the same.
            borrowed: false,
        });
        self.tag(&id, share);
        Some(true)
    }
}
