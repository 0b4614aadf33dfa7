//! Received grants: what a receiver holds from its donors. Accepting a grant (checked for
//! forgery: signature, serial, the donor's chain of grants), the pools it is used as, releasing
//! a pool back to its donor, and the grants that lapse.

use super::*;

impl Ledger {
    /// A neighbour's grant: verified down to the vendor's key, then used as a pool of licenses
    /// named `KEY@DONOR`. A newer serial replaces the pool's grant; an older one is a replay.
    pub(super) fn accept_grant(&mut self, grant: &Grant, at: i64) -> Outcome {
        let (Some(server_id), Some(server_key)) =
            (self.config.server_id.clone(), self.config.server_public_key)
        else {
            return invalid(
                "this server has no server ID and identity key: it cannot receive licenses".into(),
            );
        };
        let rejected = |error: GrantError| Outcome::Refused {
            refusal: Refusal::GrantRejected { error },
        };
        let last = match grant.verify(&self.config.trusted_vendors, &server_id, &server_key, at) {
            Ok(last) => last.clone(),
            Err(error) => return rejected(error),
        };
        if self
            .keys
            .get(&last.key_id)
            .is_some_and(|record| record.received.is_none())
        {
            return invalid(format!(
                "this server holds key {} itself: a grant of it would count its licenses twice",
                last.key_id
            ));
        }
        let pool = received_pool_id(&last.key_id, &last.donor);
        let accepted = self.accepted_serials.get(&pool).copied().unwrap_or(0);
        // The serial in use may come again (a retried push); once its pool is given back,
        // even that serial is spent.
        let replayed = match self.keys.contains_key(&pool) {
            true => last.serial < accepted,
            false => last.serial <= accepted,
        };
        // Serials are at least the donor's time in ms (`next_number`): one far ahead of this
        // clock was not issued by the donor's ledger, and accepted it would make every real
        // grant after it look like a replay.
        let ahead_limit = at
            .saturating_add(self.config.clock_skew_max_ms)
            .saturating_add(GRANT_SERIAL_AHEAD_MS);
        if u64::try_from(ahead_limit).is_ok_and(|limit| last.serial > limit) {
            return rejected(GrantError::SerialAhead {
                key_id: last.key_id.clone(),
                donor: last.donor.clone(),
                serial: last.serial,
                now_ms: at,
            });
        }
        if replayed {
            return rejected(GrantError::Replayed {
                key_id: last.key_id.clone(),
                donor: last.donor.clone(),
                serial: last.serial,
                accepted,
            });
        }
        let usable_until_ms = last
            .ends_at_ms()
            .min(at.saturating_add(DONATION_RENEWAL_PERIOD_CAP_MS))
            - self.config.clock_skew_max_ms;
        if usable_until_ms <= at {
            return rejected(GrantError::Expired {
                key_id: last.key_id.clone(),
                donor: last.donor.clone(),
                ended_at: format_ms(last.ends_at_ms()),
            });
        }
        // The donor's chain: the grant before this one on the link is `prev_serial`; a
        // serial held here between the two was never issued by the donor's ledger.
        let unknown_to_donor = last
            .prev_serial
            .filter(|prev| accepted > *prev && accepted < last.serial)
            .map(|_| accepted);
        let mut received = Received {
            grant: grant.clone(),
            donor: last.donor.clone(),
            serial: last.serial,
            licenses: last.licenses,
            usable_until_ms,
            accepted_at_ms: at,
            floor: Vec::new(),
            starts_early_ms: self.config.clock_skew_max_ms,
        };
        let mut leases_ended = 0;
        match self.keys.get_mut(&pool) {
            Some(record) => {
                let current = record.received.as_ref().map_or(0, |r| r.serial);
                if last.serial == current {
                    return self.grant_accepted(&pool, 0, None);
                }
                // The donor counts every earlier grant until it lapses, unless a later one
                // gives as many licenses for as long: those stay usable here too, so a
                // smaller or shorter grant never cuts a lease short.
                if let Some(previous) = record.received.take() {
                    let mut floor = previous.floor;
                    // Kept usable even when the donor's ledger never issued it (its leases and
                    // the licenses donated on from it stay within what this pool allowed;
                    // the 7-day cap bounds it): the event is the answer.
                    floor.push((previous.licenses, previous.usable_until_ms));
                    floor.retain(|(licenses, until)| {
                        *until > at
                            && (*licenses > received.licenses || *until > received.usable_until_ms)
                    });
                    floor.sort_unstable();
                    floor.dedup();
                    received.floor = floor;
                }
                record.received = Some(received);
            }
            None => {
                let record = KeyRecord::with_id(
                    &pool,
                    grant.key.clone(),
                    KeyMeta {
                        stations: true,
                        ..KeyMeta::default()
                    },
                    Some(received),
                );
                self.keys.insert(pool.clone(), record);
                self.recount_ended_early();
                // A grant of a renewal key takes over the leases of the key it renews: now, or,
                // sent in advance, when it starts (`take_over_renewals`). Linked whichever
                // pool arrives first, so the two never serve side by side.
                if let Some(old) = &grant.key.payload.renews {
                    let old_pool = received_pool_id(old, &last.donor);
                    if let Some(old_record) = self.keys.get_mut(&old_pool) {
                        old_record.meta.replaced_by = Some(pool.clone());
                        if is_active(&self.keys[&pool], at) {
                            let (_, ended) = self.move_leases(&old_pool, &pool);
                            leases_ended += ended;
                            if let Some(old_record) = self.keys.get_mut(&old_pool) {
                                old_record.meta.stations = false;
                                old_record.meta.groups.clear();
                            }
                        }
                    }
                }
                let renewing_pool = self
                    .keys
                    .values()
                    .find(|other| {
                        other
                            .received
                            .as_ref()
                            .is_some_and(|r| r.donor == last.donor)
                            && other.key.payload.renews.as_deref() == Some(last.key_id.as_str())
                    })
                    .map(|other| (other.id.to_string(), is_active(other, at)));
                if let Some((renewing, active)) = renewing_pool
                    && let Some(record) = self.keys.get_mut(&pool)
                {
                    record.meta.replaced_by = Some(renewing);
                    if active {
                        record.meta.stations = false;
                    }
                }
            }
        }
        self.accepted_serials.insert(pool.clone(), last.serial);
        self.record_link(
            LinkSide::Receiver,
            Some(&last.donor),
            "",
            &last.key_id,
            last.serial,
            last.licenses,
            at,
        );
        self.refresh_grant_due();
        self.grant_accepted(&pool, leases_ended, unknown_to_donor)
    }

    pub(super) fn grant_accepted(
        &self,
        pool: &str,
        leases_ended: u32,
        unknown_to_donor: Option<u64>,
    ) -> Outcome {
        let record = &self.keys[pool];
        let received = record.received.as_ref().expect("a received pool");
        Outcome::GrantAccepted {
            key_id: pool.into(),
            donor: received.donor.clone(),
            licenses: received.licenses,
            serial: received.serial,
            usable_until_ms: received.usable_until_ms,
            leases_ended,
            unknown_to_donor,
        }
    }

    /// This server gives a received grant back: its leases end and the pool goes. Their
    /// stations may go on using them until their expiry (until their next heartbeat tells
    /// them), so the outcome says when the last one runs out: only then may the donor hear
    /// that the grant came back, and until then they count against the pool if it returns.
    pub(super) fn release_grant(&mut self, pool: &str, at: i64) -> Outcome {
        let Some(record) = self.keys.get(pool).filter(|r| r.received.is_some()) else {
            return Outcome::Refused {
                refusal: Refusal::KeyNotFound {
                    key_id: pool.into(),
                },
            };
        };
        if record.donated > 0 || self.donations.keys().any(|(from, _)| from == pool) {
            return invalid(format!(
                "licenses of {pool} are donated further: end those donations first"
            ));
        }
        let received = record.received.clone().expect("checked");
        let expiries: Vec<i64> = self
            .leases
            .values()
            .filter(|lease| &*lease.key_id == pool)
            .map(|lease| lease.expires_at_ms)
            .collect();
        let leases_ended = self.end_leases_of(pool);
        for expires_at_ms in &expiries {
            self.end_early(pool, *expires_at_ms);
        }
        let stations_until_ms = self
            .ended_early
            .get(pool)
            .into_iter()
            .flatten()
            .copied()
            .fold(at, i64::max);
        self.keys.remove(pool);
        self.refresh_grant_due();
        Outcome::GrantReleased {
            key_id: pool.into(),
            donor: received.donor,
            serial: received.serial,
            leases_ended,
            stations_until_ms,
        }
    }

    /// Grants that ran out: donated licenses whose last grant lapsed (plus the clock skew)
    /// come back; received grants past their end are dropped once nothing depends on them.
    pub(super) fn end_due_grants(&mut self, at: i64) {
        if at < self.grant_due_ms {
            return;
        }
        let skew = self.config.clock_skew_max_ms;
        for donation in self.donations.values_mut() {
            donation
                .outstanding
                .retain(|o| o.lease_until_ms.saturating_add(skew) > at);
        }
        self.donations
            .retain(|_, d| !d.outstanding.is_empty() || (!d.ended && d.donation_until_ms > at));
        self.recount_donated();
        // Earlier grants that lapsed: the pool shrinks. Leases resting on them were capped
        // at their end and ran out just before (see `lease_cap`).
        for record in self.keys.values_mut() {
            if let Some(received) = &mut record.received {
                received.floor.retain(|(_, until)| *until > at);
            }
        }
        for expiries in self.ended_early.values_mut() {
            expiries.retain(|expires_at_ms| *expires_at_ms > at);
        }
        self.ended_early.retain(|_, expiries| !expiries.is_empty());
        self.recount_ended_early();
        let donating: BTreeSet<String> = self.donations.keys().map(|(k, _)| k.clone()).collect();
        self.keys.retain(|id, record| {
            record.received.as_ref().is_none_or(|r| {
                r.usable_until_ms > at || record.in_use > 0 || donating.contains(id)
            })
        });
        self.refresh_grant_due();
    }

    /// Counts a lease that ended before its expiry against `pool` until then.
    pub(super) fn end_early(&mut self, pool: &str, expires_at_ms: i64) {
        if expires_at_ms > self.last_at_ms {
            self.ended_early
                .entry(pool.into())
                .or_default()
                .push(expires_at_ms);
            self.recount_ended_early();
        }
    }

    /// Sets every pool's count of leases that ended early.
    pub(super) fn recount_ended_early(&mut self) {
        for (id, record) in &mut self.keys {
            record.ended_early = self.ended_early.get(id).map_or(0, |e| e.len() as u32);
        }
        self.refresh_grant_due();
    }
}
