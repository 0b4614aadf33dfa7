//! Leases: checkout (with borrowing and the caps a key, its renewal and its grants put on
//! a lease), heartbeat, checkin and force-release, and the expiry of due leases.

use super::*;

impl Ledger {
    pub(super) fn checkout(&mut self, request: CheckoutRequest<'_>, at: i64) -> Outcome {
        if let Err(reason) = request.validate() {
            return Outcome::Refused {
                refusal: Refusal::InvalidRequest { reason },
            };
        }
        let component = request.component;
        let synchronized = self.sync.is_synchronized(at);
        let (covering, unsynchronized): (Vec<&KeyRecord>, Vec<&KeyRecord>) = self
            .keys
            .values()
            .filter(|record| {
                self.allocated_to(record, request.station)
                    && is_active(record, at)
                    && record.covers(component)
            })
            // Received grants carry their donor's certificate limit in their chain.
            .partition(|record| {
                synchronized || record.key.payload.server_id.is_none() || record.received.is_some()
            });
        // A borrowing only from keys that allow it for that long.
        let (covering, too_short): (Vec<&KeyRecord>, Vec<&KeyRecord>) = covering
            .into_iter()
            .partition(|record| allows_borrowing(record, request.borrow_ms));
        if covering.is_empty() && !too_short.is_empty() {
            let max_days = too_short
                .iter()
                .map(|record| record.key.payload.max_borrow_days)
                .max()
                .unwrap_or(0);
            return Outcome::Refused {
                refusal: Refusal::BorrowNotAllowed {
                    component: component.into(),
                    requested_hours: (request.borrow_ms + 3_599_999) / 3_600_000,
                    max_days,
                },
            };
        }
        if covering.is_empty() {
            let refusal = if unsynchronized.is_empty() {
                Refusal::ComponentNotLicensed {
                    component: component.into(),
                }
            } else {
                Refusal::ServerNotSynchronized {
                    deadline_ms: self.sync.deadline_ms(),
                }
            };
            return Outcome::Refused { refusal };
        }
        // The same station asking again: hand back the license it holds (idempotent). If it
        // holds several covering keys, the one chosen is the one a new lease would use.
        let held = covering
            .iter()
            .filter_map(|record| {
                let lease_id = self.station_lease(request.station, &record.id)?;
                Some(((record.valid_until_ms(), &*record.id), lease_id))
            })
            .min()
            .map(|(_, lease_id)| lease_id.clone());
        if let Some(lease_id) = held {
            if let Err(refused) = self.take_over(&lease_id, at) {
                return *refused;
            }
            let record = &self.keys[&*self.leases[&lease_id].key_id];
            let wanted = self.borrow_cap(
                record,
                &request,
                at + request.wanted_ms() + grace_ms(record),
            );
            let until = self.lease_cap(record, Some(&lease_id), at, wanted);
            let shared = record.component(component).cloned();
            let lease = self.extend_lease(&lease_id, at, until);
            lease.borrowed |= request.borrow_ms > 0;
            if let Some(shared) = shared
                && let Err(position) = lease.components.binary_search(&shared)
            {
                lease.components.insert(position, shared);
            }
            return Outcome::LeaseGranted {
                lease: lease.view(),
                created: false,
            };
        }
        let licenses: u32 = covering
            .iter()
            .map(|r| r.licenses(at).saturating_sub(r.donated))
            .sum();
        let Some(chosen) = covering
            .iter()
            .filter(|record| self.new_lease_share(record, at).is_some())
            .min_by_key(|record| (record.valid_until_ms(), record.id.clone()))
        else {
            let alone_share = self.pair.alone.map(|share| {
                covering
                    .iter()
                    .map(|record| {
                        let (primary, backup) = self.share_sizes(record, at);
                        match share {
                            Share::Primary => primary,
                            Share::Backup => backup,
                        }
                    })
                    .sum()
            });
            return Outcome::Refused {
                refusal: Refusal::NoLicensesAvailable {
                    component: component.into(),
                    licenses,
                    alone_share,
                },
            };
        };
        if self.leases.contains_key(request.lease_id) {
            return Outcome::Refused {
                refusal: Refusal::InvalidRequest {
                    reason: format!("lease id {} is already in use", request.lease_id),
                },
            };
        }
        let wanted = self.borrow_cap(
            chosen,
            &request,
            at + request.wanted_ms() + grace_ms(chosen),
        );
        let expires_at_ms = self.lease_cap(chosen, None, at, wanted);
        let share = self.new_lease_share(chosen, at).expect("chosen for it");
        // A station already indexed shares its name with the index entry.
        let station = self
            .by_station
            .get_key_value(request.station)
            .map(|(station, _)| station.clone())
            .unwrap_or_else(|| Arc::from(request.station));
        let lease = Lease {
            id: Arc::from(request.lease_id),
            key_id: chosen.id.clone(),
            components: smallvec![chosen.component(component).expect("covers").clone()],
            station,
            user: request.user.into(),
            host: request.host.into(),
            issued_at_ms: at,
            renewed_at_ms: at,
            expires_at_ms,
            borrowed: request.borrow_ms > 0,
        };
        let view = lease.view();
        let id = lease.id.clone();
        self.insert_lease(lease);
        self.tag(&id, share);
        self.sync.leases_issued += 1;
        Outcome::LeaseGranted {
            lease: view,
            created: true,
        }
    }

    /// A borrowing is checked offline by the application against what came with it, so it
    /// ends when that stops checking out: a donated license with the grant it was given
    /// under, a key bound to this server (or requiring a certified one) with this server's
    /// certificate (the 366-day rule).
    pub(super) fn borrow_cap(
        &self,
        record: &KeyRecord,
        request: &CheckoutRequest<'_>,
        wanted: i64,
    ) -> i64 {
        if request.borrow_ms == 0 {
            return wanted;
        }
        if let Some(received) = &record.received {
            return wanted.min(received.usable_until_ms);
        }
        let payload = &record.key.payload;
        if payload.server_id.is_some() || payload.certified_server_required {
            return wanted.min(self.sync.deadline_ms().unwrap_or(i64::MAX));
        }
        wanted
    }

    pub(super) fn heartbeat(&mut self, lease_id: &str, lease_ttl_ms: i64, at: i64) -> Outcome {
        if !(1..=LEASE_TTL_MS_MAX).contains(&lease_ttl_ms) {
            return Outcome::Refused {
                refusal: Refusal::InvalidRequest {
                    reason: format!("lease_ttl_ms must be 1 to {LEASE_TTL_MS_MAX}"),
                },
            };
        }
        let Some(lease) = self.leases.get(lease_id) else {
            return lease_not_found(lease_id);
        };
        // A received grant whose end date came while the lease still had time (told under an
        // earlier grant): its station hears now that the lease is over, so it ends now.
        let record = &self.keys[&*lease.key_id];
        if record.received.is_some() && at >= record.valid_until_ms() {
            self.remove_lease(lease_id);
            return lease_not_found(lease_id);
        }
        if let Err(refused) = self.take_over(lease_id, at) {
            return *refused;
        }
        let lease = &self.leases[lease_id];
        let record = &self.keys[&*lease.key_id];
        let until = self.lease_cap(
            record,
            Some(lease_id),
            at,
            at + lease_ttl_ms + grace_ms(record),
        );
        let lease = self.extend_lease(lease_id, at, until);
        Outcome::LeaseRenewed {
            lease: lease.view(),
        }
    }

    /// An administrator takes a lease back; not a borrowing, which its application holds
    /// offline until its end: freeing its seat would let two stations use one license.
    pub(super) fn force_release(&mut self, lease_id: &str) -> Outcome {
        if let Some(lease) = self.leases.get(lease_id)
            && lease.borrowed
        {
            return Outcome::Refused {
                refusal: Refusal::LeaseBorrowed {
                    lease_id: lease_id.into(),
                    until_ms: lease.expires_at_ms,
                },
            };
        }
        self.release(lease_id)
    }

    pub(super) fn release(&mut self, lease_id: &str) -> Outcome {
        match self.remove_lease(lease_id) {
            Some(lease) => Outcome::LeaseReleased {
                lease: lease.view(),
            },
            None => lease_not_found(lease_id),
        }
    }

    /// Extends a lease to `until` (from `lease_cap`).
    pub(super) fn extend_lease(&mut self, lease_id: &str, at: i64, until: i64) -> &mut Lease {
        let lease = self
            .leases
            .get_mut(lease_id)
            .expect("caller checked the lease exists");
        self.expiry.remove(&(lease.expires_at_ms, lease.id.clone()));
        // A renewal never shortens a lease: a late, duplicated heartbeat must not cut it, and
        // its station may already count on the expiry it was told.
        lease.expires_at_ms = lease.expires_at_ms.max(until);
        lease.renewed_at_ms = at;
        self.expiry.insert((lease.expires_at_ms, lease.id.clone()));
        lease
    }

    /// How long a lease of `record` (new, or `lease_id` renewed) may run, at most until
    /// `wanted`: within the key, and for a received pool, within its current grant. A pool
    /// whose donor lowered the donation still holds the earlier, larger grant until it
    /// lapses; a lease runs past that grant's end only if it fits in what is left after it,
    /// with every other lease and re-grant still running then. So leases run out by
    /// themselves as the pool shrinks: none is ended early while its station may still count
    /// on it, and the donor, which counts each grant until it lapses, is never short.
    pub(super) fn lease_cap(
        &self,
        record: &KeyRecord,
        lease_id: Option<&str>,
        at: i64,
        wanted: i64,
    ) -> i64 {
        let cap = wanted.min(self.carry_until_ms(record));
        let Some(received) = &record.received else {
            return cap;
        };
        let mut ends: Vec<i64> = received
            .grants()
            .map(|(_, until)| until)
            .filter(|until| *until > at && *until < cap)
            .collect();
        if ends.is_empty() {
            return cap;
        }
        ends.sort_unstable();
        ends.dedup();
        let pool = &*record.id;
        // Only leases still running after the first end count at any end: with leases much
        // shorter than grants, a handful.
        let first = ends[0];
        let mut others: Vec<i64> = self
            .expiry
            .range((first.saturating_add(1), Arc::<str>::from(""))..)
            .filter(|(_, id)| Some(&**id) != lease_id && *self.leases[&**id].key_id == *pool)
            .map(|(expires_at_ms, _)| *expires_at_ms)
            .chain(self.ended_early.get(pool).into_iter().flatten().copied())
            .collect();
        others.sort_unstable();
        for end in ends {
            let (renewal_room, renewal_counted) = self.renewal_pool_at(record, end);
            let room = u64::from(received.capacity_at(end)) + renewal_room;
            let running = others.len() - others.partition_point(|expires| *expires <= end);
            let counted =
                running as u64 + 1 + u64::from(self.donated_after(pool, end)) + renewal_counted;
            if counted > room {
                return end;
            }
        }
        cap
    }

    /// After a received pool stops, the pool of its renewal key (granted in advance) carries
    /// its leases: (the renewal pool's licenses at `end`, what it counts then). Nothing
    /// before the renewal pool starts.
    pub(super) fn renewal_pool_at(&self, record: &KeyRecord, end: i64) -> (u64, u64) {
        let Some(renewal) = self.pending_renewal(record) else {
            return (0, 0);
        };
        match &renewal.received {
            Some(received) if key_start_ms(renewal) <= end => (
                u64::from(received.capacity_at(end)),
                u64::from(self.donated_after(&renewal.id, end))
                    + u64::from(renewal.in_use)
                    + u64::from(renewal.ended_early),
            ),
            _ => (0, 0),
        }
    }

    /// Licenses of `key_id` that donations still count after `at`.
    pub(super) fn donated_after(&self, key_id: &str, at: i64) -> u32 {
        let skew = self.config.clock_skew_max_ms;
        self.donations
            .values()
            .filter(|d| d.key_id == key_id)
            .map(|d| {
                d.outstanding
                    .iter()
                    .filter(|o| o.lease_until_ms.saturating_add(skew) > at)
                    .map(|o| o.licenses)
                    .max()
                    .unwrap_or(0)
            })
            .sum()
    }

    /// The lease `station` holds from `key_id`, if any.
    pub(super) fn station_lease(&self, station: &str, key_id: &str) -> Option<&Arc<str>> {
        self.by_station
            .get(station)?
            .iter()
            .find(|(key, _)| &**key == key_id)
            .map(|(_, lease_id)| lease_id)
    }

    pub(super) fn insert_lease(&mut self, lease: Lease) {
        let record = self
            .keys
            .get_mut(&*lease.key_id)
            .expect("lease's key exists");
        record.in_use += 1;
        assert!(
            record.used() <= record.licenses(self.last_at_ms),
            "over-issued key {}",
            lease.key_id
        );
        self.by_station
            .entry(lease.station.clone())
            .or_default()
            .push((lease.key_id.clone(), lease.id.clone()));
        self.expiry.insert((lease.expires_at_ms, lease.id.clone()));
        self.leases.insert(lease.id.clone(), Box::new(lease));
    }

    pub(super) fn remove_lease(&mut self, lease_id: &str) -> Option<Lease> {
        let lease = *self.leases.remove(lease_id)?;
        if let Some(held) = self.by_station.get_mut(&*lease.station) {
            held.retain(|(_, id)| id != &lease.id);
            if held.is_empty() {
                self.by_station.remove(&*lease.station);
            }
        }
        self.expiry.remove(&(lease.expires_at_ms, lease.id.clone()));
        if let Some(record) = self.keys.get_mut(&*lease.key_id) {
            record.in_use -= 1;
        }
        self.untag(&lease);
        Some(lease)
    }

    /// Ends every lease with `expires_at_ms <= at`; returns them.
    pub(super) fn end_due_leases(&mut self, at: i64) -> Vec<LeaseView> {
        let mut ended = Vec::new();
        while let Some((expires_at_ms, lease_id)) = self.expiry.first().cloned() {
            if expires_at_ms > at {
                break;
            }
            ended.extend(self.remove_lease(&lease_id).map(|lease| lease.view()));
        }
        ended
    }
}

impl CheckoutRequest<'_> {
    fn validate(&self) -> Result<(), String> {
        if !is_name(self.component) {
            return Err(format!(
                "component {:?} is not a valid name (1-128 of A-Z a-z 0-9 - _ .)",
                self.component
            ));
        }
        // Characters (Unicode scalar values), as the messages and the OpenAPI document say,
        // not UTF-8 bytes.
        let chars = |text: &str| text.chars().count();
        if self.station.is_empty() || chars(self.station) > FREE_TEXT_LENGTH_MAX {
            return Err(format!(
                "station must have 1 to {FREE_TEXT_LENGTH_MAX} characters"
            ));
        }
        if chars(self.user) > FREE_TEXT_LENGTH_MAX || chars(self.host) > FREE_TEXT_LENGTH_MAX {
            return Err(format!(
                "user and host have at most {FREE_TEXT_LENGTH_MAX} characters"
            ));
        }
        if !is_name(self.lease_id) {
            return Err("lease id is not a valid name".into());
        }
        if !(1..=LEASE_TTL_MS_MAX).contains(&self.lease_ttl_ms) {
            return Err(format!("lease_ttl_ms must be 1 to {LEASE_TTL_MS_MAX}"));
        }
        if !(0..=BORROW_MS_MAX).contains(&self.borrow_ms) {
            return Err(format!(
                "a borrowing lasts at most {} days",
                crate::key::BORROW_DAYS_MAX
            ));
        }
        Ok(())
    }

    /// How long the lease runs from `at`: the borrowing, or one time-to-live.
    fn wanted_ms(&self) -> i64 {
        self.lease_ttl_ms.max(self.borrow_ms)
    }
}
