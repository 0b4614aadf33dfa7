//! Key renewal: renewal keys found for the keys in use, allocated in advance, and taking
//! over (leases and donations move to them, same lease ids) when they become valid.

use super::*;

impl Ledger {
    /// The renewal candidates: renewal keys held from the vendor, and keys already imported
    /// (by an administrator) that name a key they renew. Each as (old key id, renewal key).
    pub(super) fn renewal_candidates(&self) -> Vec<(String, LicenseKey)> {
        let mut candidates: BTreeMap<String, LicenseKey> = self.sync.renewals.clone();
        for record in self.keys.values().filter(|r| r.received.is_none()) {
            if let Some(old) = &record.key.payload.renews {
                candidates
                    .entry(old.clone())
                    .or_insert_with(|| record.key.clone());
            }
        }
        candidates
            .into_iter()
            .filter(|(old, renewal)| {
                self.keys.get(old).is_some_and(|record| {
                    record.received.is_none()
                        && record.meta.replaced_by.as_deref() != Some(renewal.key_id())
                })
            })
            .collect()
    }

    /// Automatic key renewal, as the vendor's manual describes it: a renewal key with the
    /// same or more components and at least as many licenses is added and allocated to every
    /// object of the old key; otherwise it is added but not allocated, with the reason.
    pub(super) fn renew_keys(&mut self, at: i64) -> Outcome {
        let mut renewed = Vec::new();
        let (mut leases_moved, mut leases_ended) = (0, 0);
        for (old_id, renewal) in self.renewal_candidates() {
            self.sync.renewals.remove(&old_id);
            let renewal_id = renewal.key_id().to_string();
            if !self.keys.contains_key(&renewal_id) {
                match self.import_key(&renewal, at) {
                    Outcome::KeyImported { .. } => {
                        // Allocation is decided below, not by the import default.
                        self.keys
                            .get_mut(&renewal_id)
                            .expect("imported")
                            .meta
                            .stations = false;
                    }
                    Outcome::Refused { refusal } => {
                        let result = RenewalResult::NotAllocated {
                            renewal_key_id: renewal_id,
                            reason: refusal.to_string(),
                        };
                        self.keys.get_mut(&old_id).expect("candidate").meta.renewal =
                            Some(result.clone());
                        renewed.push((old_id, result));
                        continue;
                    }
                    other => unreachable!("import answered {other:?}"),
                }
            }
            let old = &self.keys[&old_id];
            let new = &self.keys[&renewal_id];
            let missing: Vec<&String> = old
                .key
                .payload
                .components
                .iter()
                .filter(|c| !new.key.payload.covers(c))
                .collect();
            let mut reasons = Vec::new();
            if !missing.is_empty() {
                reasons.push(format!(
                    "the renewal key {renewal_id} does not license {}",
                    missing
                        .iter()
                        .map(|c| c.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            if new.key.payload.licenses < old.key.payload.licenses {
                reasons.push(format!(
                    "the renewal key {renewal_id} has {} licenses, fewer than the {} of {old_id}",
                    new.key.payload.licenses, old.key.payload.licenses
                ));
            }
            let result = if reasons.is_empty() {
                let old_stations = old.meta.stations;
                let old_groups = old.meta.groups.clone();
                let old_neighbours = old.meta.neighbours.clone();
                let renewal_active = key_state(new, at) == KeyState::Active;
                let new_meta = &mut self.keys.get_mut(&renewal_id).expect("renewal").meta;
                new_meta.stations |= old_stations;
                new_meta.groups.extend(old_groups);
                new_meta.neighbours.extend(old_neighbours);
                let old = self.keys.get_mut(&old_id).expect("old");
                old.meta.replaced_by = Some(renewal_id.clone());
                if renewal_active {
                    // The renewal serves from now on: move the old key's leases onto it.
                    let (moved, ended) = self.renewal_takes_over(&old_id, &renewal_id, at);
                    leases_moved += moved;
                    leases_ended += ended;
                } else {
                    // Neighbours get the renewal's grants now, to use when it takes over.
                    self.continue_donations(&old_id, &renewal_id, at);
                }
                // Otherwise it takes over when it becomes valid (`take_over_renewals`);
                // until then the old key's leases may run until the renewal's end.
                RenewalResult::Allocated {
                    renewal_key_id: renewal_id,
                }
            } else {
                RenewalResult::NotAllocated {
                    renewal_key_id: renewal_id,
                    reason: reasons.join("; "),
                }
            };
            self.keys.get_mut(&old_id).expect("old").meta.renewal = Some(result.clone());
            renewed.push((old_id, result));
        }
        Outcome::KeysRenewed {
            renewed,
            leases_moved,
            leases_ended,
        }
    }

    /// The renewal key allocated to take over from `record` when it becomes valid, with no gap
    /// between the two keys: the old key's leases may run until its end.
    ///
    /// The same for a received pool whose donor sent, in advance, a grant of the key that
    /// renews it: the new pool takes over when the old one stops (its grant's end less the
    /// skew, when the new pool starts: `Received::starts_early_ms`).
    pub(super) fn pending_renewal(&self, record: &KeyRecord) -> Option<&KeyRecord> {
        // `replaced_by` is set only when the renewal was allocated (a later renewal result for
        // another candidate does not undo it).
        let renewal_id = record.meta.replaced_by.as_deref()?;
        let renewal = self.keys.get(renewal_id)?;
        let outlives = match (&record.received, &renewal.received) {
            (None, None) => renewal.valid_until_ms() > record.valid_until_ms(),
            // Pools: the keys' ends decide (both grants are renewed together, so their ends
            // are often equal).
            (Some(old), Some(new)) => {
                old.donor == new.donor
                    && renewal.key.payload.valid_until_ms() > record.key.payload.valid_until_ms()
            }
            _ => false,
        };
        (outlives && key_start_ms(renewal) <= record.valid_until_ms()).then_some(renewal)
    }

    /// Whether `key_id` is the renewal allocated to take over from another key in advance.
    pub(super) fn is_pending_renewal(&self, key_id: &str) -> bool {
        self.keys.values().any(|record| {
            record.meta.replaced_by.as_deref() == Some(key_id)
                && self
                    .pending_renewal(record)
                    .is_some_and(|renewal| &*renewal.id == key_id)
        })
    }

    /// Whether licenses of `record` may be donated (or a donation renewed) at `at`: an active
    /// key, or the renewal allocated in advance to a key, so that the neighbours hold its
    /// grants before it takes over and go on without a gap.
    pub(super) fn donatable(&self, record: &KeyRecord, at: i64) -> bool {
        match key_state(record, at) {
            KeyState::Active => true,
            KeyState::Pending => self.is_pending_renewal(&record.id),
            KeyState::Expired => false,
        }
    }

    /// Until when a lease of `record` may run: its end, or, when an allocated renewal takes
    /// over without a gap, the renewal's end (the lease moves to it at the takeover).
    pub(super) fn carry_until_ms(&self, record: &KeyRecord) -> i64 {
        self.pending_renewal(record)
            .map_or(record.valid_until_ms(), KeyRecord::valid_until_ms)
    }

    /// Renewals allocated in advance whose time has come: each takes over its old key's
    /// leases (same ids, same expiries) and donations, so stations and neighbours go on
    /// without a gap at the old key's end.
    pub(super) fn take_over_renewals(&mut self, at: i64) {
        let due: Vec<(String, String)> = self
            .keys
            .values()
            .filter(|record| record.meta.replaced_by.is_some())
            .filter(|record| {
                record.meta.stations
                    || record.in_use > 0
                    || self
                        .donations
                        .values()
                        .any(|d| d.key_id == *record.id && !d.ended)
            })
            .filter_map(|record| {
                let renewal = self.pending_renewal(record)?;
                is_active(renewal, at).then(|| (record.id.to_string(), renewal.id.to_string()))
            })
            .collect();
        for (old_id, renewal_id) in due {
            self.renewal_takes_over(&old_id, &renewal_id, at);
        }
    }

    /// The renewal serves from now on: the old key serves no station any more, its leases
    /// and donations move to the renewal. Returns (leases moved, leases ended).
    pub(super) fn renewal_takes_over(
        &mut self,
        old_id: &str,
        renewal_id: &str,
        at: i64,
    ) -> (u32, u32) {
        if let Some(old) = self.keys.get_mut(old_id) {
            old.meta.stations = false;
            old.meta.groups.clear();
        }
        let moved = self.move_leases(old_id, renewal_id);
        self.move_donations(old_id, renewal_id, at);
        moved
    }

    /// Moves leases from one key to another while it has free licenses; the rest end, and
    /// their stations get a license again at their next checkout if one is free.
    pub(super) fn move_leases(&mut self, from: &str, to: &str) -> (u32, u32) {
        let mut ids: Vec<Arc<str>> = self
            .leases
            .values()
            .filter(|lease| &*lease.key_id == from)
            .map(|lease| lease.id.clone())
            .collect();
        ids.sort();
        let (mut moved, mut ended) = (0, 0);
        let at = self.last_at_ms;
        for lease_id in ids {
            let mut lease = self.remove_lease(&lease_id).expect("listed");
            let target = &self.keys[to];
            let taken = self.station_lease(&lease.station, to).is_some();
            if target.free(at) > 0 && !taken {
                let until = self.lease_cap(target, None, at, lease.expires_at_ms);
                let target = &self.keys[to];
                lease.key_id = target.id.clone();
                lease.components = lease
                    .components
                    .iter()
                    .filter_map(|c| target.component(c).cloned())
                    .collect();
                lease.expires_at_ms = until;
                self.insert_lease(lease);
                moved += 1;
            } else {
                // A received grant's donor counts it until it lapses or comes back, and the
                // station may use it until it hears otherwise: it still counts there. (A
                // vendor key's renewal ends them outright, as the manual says.)
                if self.keys.get(from).is_some_and(|r| r.received.is_some()) {
                    self.end_early(from, lease.expires_at_ms);
                }
                ended += 1;
            }
        }
        (moved, ended)
    }

    /// Removes keys that a renewal replaced once nothing uses them any more: no lease, and
    /// either expired or no longer allocated to stations.
    pub(super) fn retire_replaced_keys(&mut self, at: i64) {
        let retired: Vec<String> = self
            .keys
            .iter()
            .filter(|(_, record)| {
                record.meta.replaced_by.is_some()
                    // A received pool goes when its grant lapses or is given back.
                    && record.received.is_none()
                    && record.in_use == 0
                    && !self.ended_early.contains_key(&*record.id)
                    && record.donated == 0
                    && !self.donations.keys().any(|(from, _)| from == &*record.id)
                    && (!record.meta.stations || key_state(record, at) == KeyState::Expired)
            })
            .map(|(key_id, _)| key_id.clone())
            .collect();
        for key_id in retired {
            self.keys.remove(&key_id);
        }
    }
}
