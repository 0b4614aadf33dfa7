//! The invariants, checked after every apply in debug builds (tests, simulation).

use super::*;

/// An invariant the ledger broke, described (a bug: it stops a debug build and the
/// simulation).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Violation(pub String);

impl Ledger {
    /// Checks every invariant; returns the first violation found. Runs after every apply in
    /// debug builds (tests, simulation).
    pub fn check_invariants(&self) -> Result<(), Violation> {
        let mut counted: HashMap<&str, u32> = HashMap::new();
        for (lease_id, lease) in &self.leases {
            if lease_id != &lease.id {
                return Err(Violation(format!(
                    "lease {lease_id} stored under another id"
                )));
            }
            let Some(record) = self.keys.get(&*lease.key_id) else {
                return Err(Violation(format!(
                    "lease {lease_id} refers to missing key {}",
                    lease.key_id
                )));
            };
            if lease.expires_at_ms <= self.last_at_ms {
                return Err(Violation(format!("lease {lease_id} outlived its expiry")));
            }
            let until = match &record.received {
                // Carried onto the pool of the renewal key while it is there (`lease_cap`).
                Some(received) => self
                    .pending_renewal(record)
                    .map_or(received.usable_until_max_ms(), |renewal| {
                        renewal.valid_until_ms().max(received.usable_until_max_ms())
                    }),
                // A replaced key's leases may run up to its renewal's end, and keep what they
                // were told if the renewal is removed before it takes over.
                None if record.meta.replaced_by.is_some() => i64::MAX,
                None => self.carry_until_ms(record),
            };
            if lease.expires_at_ms > until {
                return Err(Violation(format!("lease {lease_id} outlives its key")));
            }
            if self.station_lease(&lease.station, &lease.key_id) != Some(lease_id) {
                return Err(Violation(format!(
                    "lease {lease_id} missing from the station index"
                )));
            }
            if !self
                .expiry
                .contains(&(lease.expires_at_ms, lease_id.clone()))
            {
                return Err(Violation(format!(
                    "lease {lease_id} missing from the expiry index"
                )));
            }
            *counted.entry(&*lease.key_id).or_default() += 1;
        }
        let indexed: usize = self.by_station.values().map(|held| held.len()).sum();
        if indexed != self.leases.len() || self.expiry.len() != self.leases.len() {
            return Err(Violation(
                "indexes hold entries for leases that do not exist".into(),
            ));
        }
        let mut donated: HashMap<&str, u32> = HashMap::new();
        for ((key_id, to), donation) in &self.donations {
            if !self.keys.contains_key(key_id) {
                return Err(Violation(format!(
                    "donation of missing key {key_id} to {to}"
                )));
            }
            *donated.entry(key_id.as_str()).or_default() += donation.counted();
        }
        for (key_id, record) in &self.keys {
            if donated.get(key_id.as_str()).copied().unwrap_or(0) != record.donated {
                return Err(Violation(format!(
                    "key {key_id} counts {} donated, donations say otherwise",
                    record.donated
                )));
            }
            let in_use = counted.get(key_id.as_str()).copied().unwrap_or(0);
            if in_use != record.in_use {
                return Err(Violation(format!(
                    "key {key_id} counts {} in use, leases say {in_use}",
                    record.in_use
                )));
            }
            let backup = self
                .pair
                .backup_leases
                .iter()
                .filter(|id| {
                    self.leases
                        .get(&***id)
                        .is_some_and(|l| &*l.key_id == key_id)
                })
                .count() as u32;
            if backup != record.in_use_backup {
                return Err(Violation(format!(
                    "key {key_id} counts {} leases of the backup share, tags say {backup}",
                    record.in_use_backup
                )));
            }
            let ended_early = self.ended_early.get(key_id).map_or(0, |e| e.len() as u32);
            if ended_early != record.ended_early {
                return Err(Violation(format!(
                    "key {key_id} counts leases that ended early wrongly"
                )));
            }
            // Leases that ended early may exceed a pool that came back smaller: the donor
            // still counts the released grant they came from until they ran out. Nothing
            // else may be added then.
            let at = self.last_at_ms;
            if record.used() > record.licenses(at).max(ended_early) {
                return Err(Violation(format!(
                    "key {key_id} over-issued: {in_use} leases, {ended_early} ended early and {} donated for {} licenses",
                    record.donated,
                    record.licenses(at)
                )));
            }
            // A pool that shrinks later: what still runs then fits in what is left then.
            if let Some(received) = &record.received {
                for (_, end) in received.grants().filter(|(_, end)| *end > at) {
                    let ended_early = self
                        .ended_early
                        .get(key_id)
                        .into_iter()
                        .flatten()
                        .filter(|expires| **expires > end)
                        .count() as u32;
                    let running = self
                        .leases
                        .values()
                        .filter(|lease| &*lease.key_id == key_id && lease.expires_at_ms > end)
                        .count() as u32
                        + ended_early
                        + self.donated_after(key_id, end);
                    let (renewal_room, renewal_counted) = self.renewal_pool_at(record, end);
                    let room = u64::from(received.capacity_at(end).max(ended_early)) + renewal_room;
                    if u64::from(running) + renewal_counted > room {
                        return Err(Violation(format!(
                            "pool {key_id} over-issued after {end}: {running} still running for {} licenses",
                            received.capacity_at(end)
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}
