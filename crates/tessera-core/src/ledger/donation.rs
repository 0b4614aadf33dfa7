//! Donations between servers, the donor's side: its grants to its neighbours (donate, renew,
//! end, take back), the usage its receivers report, and the link history both sides keep.
//! What a receiver holds is `received.rs`.

use super::*;

/// The longest installation hash or log hash a usage report may carry.
const REPORTED_TEXT_MAX: usize = 128;

impl Ledger {
    /// Creates or changes the donation of `licenses` from a key to a neighbour. A change is a
    /// new grant with the next serial; the previous grants stay counted until they lapse, so
    /// lowering a donation frees licenses only once the neighbour can no longer use them.
    fn donate(&mut self, request: DonateRequest<'_>, at: i64) -> Outcome {
        let DonateRequest {
            key_id,
            to,
            receiver_public_key,
            licenses,
            until_ms,
            renewal_period_ms,
        } = request;
        let Some(server_id) = self.config.server_id.clone() else {
            return invalid(
                "this server has no server ID: configure server_id before donating licenses".into(),
            );
        };
        if !is_name(to) || to == server_id {
            return invalid(format!("{to:?} is not a neighbour server ID"));
        }
        if PublicKey::from_base64(receiver_public_key).is_err() {
            return invalid(format!("the public key of neighbour {to} is not valid"));
        }
        if !(1..=DONATION_RENEWAL_PERIOD_MS_MAX).contains(&renewal_period_ms) {
            return invalid("the donation renewal period must be 1 ms to 366 days".into());
        }
        if licenses == 0 || licenses > crate::key::LICENSES_PER_KEY_MAX {
            return invalid(
                "donate at least one license (to end a donation, end it instead)".into(),
            );
        }
        let Some(record) = self.keys.get(key_id) else {
            return Outcome::Refused {
                refusal: Refusal::KeyNotFound {
                    key_id: key_id.into(),
                },
            };
        };
        let refuse = |reason: String| Outcome::Refused {
            refusal: Refusal::DonationRefused {
                key_id: key_id.into(),
                reason,
            },
        };
        if !self.donatable(record, at) {
            return refuse(format!("key {key_id} is not active"));
        }
        if until_ms <= at {
            return refuse("the donation end date is not in the future".into());
        }
        let until_limit = match &record.received {
            Some(received) => received.grant.last().donation_until_ms(),
            None => record.key.payload.valid_until_ms(),
        };
        if until_ms > until_limit {
            return refuse(format!(
                "the donation end date is after {}, when the licenses of {key_id} end here",
                format_ms(until_limit)
            ));
        }
        // The receiver keeps one pool per vendor key and donor, numbered by one serial: one
        // donation of a vendor key to a neighbour at a time, whichever pool it comes from.
        let vendor_key_id = record.key.payload.key_id.as_str();
        if let Some(other) = self.donations.values().find(|d| {
            d.to == to
                && d.key_id != key_id
                && self
                    .keys
                    .get(&d.key_id)
                    .is_some_and(|r| r.key.payload.key_id == vendor_key_id)
        }) {
            return refuse(format!(
                "{to} already receives licenses of key {vendor_key_id} from {}: one donation of a key to a neighbour at a time",
                other.key_id
            ));
        }
        let existing = self.donations.get(&(key_id.to_string(), to.to_string()));
        let counted = existing.map_or(0, Donation::counted);
        // A re-grant never gives more than the grant its chain carries (the current one).
        let available = record
            .licenses(at)
            .saturating_sub(record.used() - counted)
            .min(regrant_limit(record));
        if licenses > counted.max(available) {
            return Outcome::Refused {
                refusal: Refusal::NotEnoughLicenses {
                    key_id: key_id.into(),
                    requested: licenses,
                    free: available,
                },
            };
        }
        let lease_until_ms =
            match self.donation_lease_until(record, at, renewal_period_ms, until_ms) {
                Ok(until) => until,
                Err(reason) => return refuse(reason),
            };
        let serial_key = received_pool_id(vendor_key_id, to);
        let previous = existing
            .map_or(0, |d| d.serial)
            .max(self.issued_serials.get(&serial_key).copied().unwrap_or(0));
        let serial = next_number(previous, at);
        let mut outstanding = existing.map(|d| d.outstanding.clone()).unwrap_or_default();
        push_outstanding(
            &mut outstanding,
            Outstanding {
                serial,
                licenses,
                lease_until_ms,
            },
        );
        let donation = Donation {
            key_id: key_id.into(),
            to: to.into(),
            receiver_public_key: receiver_public_key.into(),
            licenses,
            donation_until_ms: until_ms,
            renewal_period_ms,
            serial,
            prev_serial: (previous > 0).then_some(previous),
            lease_until_ms,
            renewed_at_ms: at,
            ended: false,
            outstanding,
        };
        self.donations
            .insert((key_id.into(), to.into()), donation.clone());
        self.issued_serials.insert(serial_key, serial);
        let vendor_key_id = self.keys[key_id].key.payload.key_id.clone();
        self.record_link(
            LinkSide::Donor,
            None,
            to,
            &vendor_key_id,
            serial,
            licenses,
            at,
        );
        let record = self.keys.get_mut(key_id).expect("checked");
        record.meta.neighbours.insert(to.into());
        self.recount_donated();
        Outcome::Donated { donation }
    }

    /// When a new grant from `record` may run until: one renewal period, within the
    /// donation, the key, the certificate of a key bound to this server, and for licenses
    /// received from a neighbour, ending `clock_skew_max` before this server stops using them.
    fn donation_lease_until(
        &self,
        record: &KeyRecord,
        at: i64,
        renewal_period_ms: i64,
        until_ms: i64,
    ) -> Result<i64, String> {
        let mut lease_until = at
            .saturating_add(renewal_period_ms)
            .min(until_ms)
            .min(record.key.payload.valid_until_ms());
        match &record.received {
            Some(received) => {
                // Re-grants end before the first grant of the pool lapses (what they give may
                // rest on it), by the clock skew, so the receiver stops before this server
                // does.
                let until = received.usable_until_min_ms();
                lease_until = lease_until.min(until.saturating_sub(self.config.clock_skew_max_ms));
            }
            None => {
                if record.key.payload.server_id.is_some() {
                    let Some(deadline) = self.sync.deadline_ms() else {
                        return Err(format!(
                            "key {} is issued to this server ID: synchronize with the vendor first, so neighbours can verify the grant",
                            record.id
                        ));
                    };
                    lease_until = lease_until.min(deadline);
                }
            }
        }
        if lease_until <= at {
            return Err(format!(
                "the licenses of {} end too soon to donate",
                record.id
            ));
        }
        Ok(lease_until)
    }

    /// Renews every running donation to a neighbour: the link to it is alive. Each gets a new
    /// grant with the next serial, one renewal period long.
    pub(super) fn renew_donations(&mut self, to: &str, at: i64) -> Outcome {
        let ids: Vec<(String, String)> = self
            .donations
            .iter()
            .filter(|((_, t), d)| t == to && !d.ended && d.donation_until_ms > at)
            .map(|(id, _)| id.clone())
            .collect();
        let mut renewed = Vec::new();
        for id in ids {
            let donation = &self.donations[&id];
            let Some(record) = self.keys.get(&id.0) else {
                continue;
            };
            if !self.donatable(record, at) {
                continue;
            }
            let counted = donation.counted();
            let available = record
                .licenses(at)
                .saturating_sub(record.used() - counted)
                .min(regrant_limit(record));
            // Licenses that lapsed back meanwhile may have gone to stations.
            let licenses = donation.licenses.min(available);
            if licenses == 0 {
                continue;
            }
            let Ok(lease_until_ms) = self.donation_lease_until(
                record,
                at,
                donation.renewal_period_ms,
                donation.donation_until_ms,
            ) else {
                continue;
            };
            let serial_key = received_pool_id(&record.key.payload.key_id, &id.1);
            let donation = self.donations.get_mut(&id).expect("listed");
            let previous = donation
                .serial
                .max(self.issued_serials.get(&serial_key).copied().unwrap_or(0));
            donation.serial = next_number(previous, at);
            donation.prev_serial = (previous > 0).then_some(previous);
            self.issued_serials.insert(serial_key, donation.serial);
            donation.lease_until_ms = lease_until_ms;
            donation.renewed_at_ms = at;
            let serial = donation.serial;
            push_outstanding(
                &mut donation.outstanding,
                Outstanding {
                    serial,
                    licenses,
                    lease_until_ms,
                },
            );
            renewed.push(donation.clone());
            let vendor_key_id = self.keys[&id.0].key.payload.key_id.clone();
            self.record_link(
                LinkSide::Donor,
                None,
                &id.1,
                &vendor_key_id,
                serial,
                licenses,
                at,
            );
            self.recount_donated();
        }
        Outcome::DonationsRenewed {
            to: to.into(),
            donations: renewed,
        }
    }

    /// The administrator's donation. It replaces one still waiting for licenses; a key whose
    /// renewal is allocated in advance donates until its end, and its renewal carries the
    /// donation on from there, up to `until_ms` (its twin, edited with it).
    pub(super) fn donate_command(&mut self, request: DonateRequest<'_>, at: i64) -> Outcome {
        let (key_id, to) = (request.key_id, request.to);
        self.drop_pending_donation(key_id, to);
        let renewal = self
            .keys
            .get(key_id)
            .and_then(|record| self.pending_renewal(record))
            .map(|renewal| renewal.id.to_string());
        let (Some(renewal_id), Some(record)) = (renewal, self.keys.get(key_id)) else {
            return self.donate(request, at);
        };
        let carried_until = self.carry_until_ms(record);
        if request.until_ms > carried_until {
            return Outcome::Refused {
                refusal: Refusal::DonationRefused {
                    key_id: key_id.into(),
                    reason: format!(
                        "the donation end date is after {}, when the licenses of {key_id} and of its renewal {renewal_id} end here",
                        format_ms(carried_until)
                    ),
                },
            };
        }
        let own_until = request.until_ms.min(record.key.payload.valid_until_ms());
        let outcome = self.donate(
            DonateRequest {
                until_ms: own_until,
                ..request
            },
            at,
        );
        if let Outcome::Donated { .. } = &outcome
            && let Some(until) = self.continued_until(key_id, &renewal_id, request.until_ms)
        {
            self.drop_pending_donation(&renewal_id, to);
            let twin = PendingDonation {
                to: to.into(),
                receiver_public_key: request.receiver_public_key.into(),
                licenses: request.licenses,
                donation_until_ms: until,
                renewal_period_ms: request.renewal_period_ms,
                reason: String::new(),
                next_try_ms: at,
            };
            self.try_pending_donation(&renewal_id, twin, at);
        }
        outcome
    }

    /// The administrator ends a donation; its twin on a renewal allocated in advance ends
    /// with it.
    pub(super) fn end_donation_command(&mut self, key_id: &str, to: &str) -> Outcome {
        let renewal = self
            .keys
            .get(key_id)
            .and_then(|record| self.pending_renewal(record))
            .map(|renewal| renewal.id.to_string());
        let outcome = self.end_donation(key_id, to);
        if let (Outcome::DonationEnded { .. }, Some(renewal_id)) = (&outcome, renewal) {
            let _ = self.end_donation(&renewal_id, to);
        }
        outcome
    }

    fn end_donation(&mut self, key_id: &str, to: &str) -> Outcome {
        let id = (key_id.to_string(), to.to_string());
        let dropped_pending = self.drop_pending_donation(key_id, to);
        let Some(donation) = self.donations.get_mut(&id) else {
            if let Some(pending) = dropped_pending {
                // A donation still waiting for free licenses of a renewal: ended before it
                // started.
                return Outcome::DonationEnded {
                    donation: Donation {
                        key_id: key_id.to_string(),
                        to: to.to_string(),
                        receiver_public_key: pending.receiver_public_key,
                        licenses: pending.licenses,
                        donation_until_ms: pending.donation_until_ms,
                        renewal_period_ms: pending.renewal_period_ms,
                        serial: 0,
                        prev_serial: None,
                        lease_until_ms: 0,
                        renewed_at_ms: 0,
                        ended: true,
                        outstanding: Vec::new(),
                    },
                };
            }
            return donation_not_found(key_id, to);
        };
        donation.ended = true;
        let donation = donation.clone();
        if donation.outstanding.is_empty() {
            self.donations.remove(&id);
        }
        Outcome::DonationEnded { donation }
    }

    /// The receiver confirmed it no longer uses the grants up to `serial`: the licenses come
    /// back now instead of when the grant lease runs out.
    pub(super) fn grant_returned(
        &mut self,
        key_id: &str,
        to: &str,
        serial: u64,
        at: i64,
    ) -> Outcome {
        let id = (key_id.to_string(), to.to_string());
        let Some(donation) = self.donations.get_mut(&id) else {
            return donation_not_found(key_id, to);
        };
        let before = donation.counted();
        donation.outstanding.retain(|o| o.serial > serial);
        let licenses_back = before - donation.counted();
        if donation.outstanding.is_empty() && (donation.ended || donation.donation_until_ms <= at) {
            self.donations.remove(&id);
        }
        self.recount_donated();
        Outcome::GrantReturned {
            key_id: key_id.into(),
            to: to.into(),
            licenses_back,
        }
    }

    /// Adds a grant serial to its link's history (see [`crate::sync::LinkReport`]): issued to
    /// `to` (donor side: `donor` is `None`, this server), or accepted from `donor` (receiver
    /// side: `to` is ignored, this server). Links silent for over 400 days are dropped.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn record_link(
        &mut self,
        side: LinkSide,
        donor: Option<&str>,
        to: &str,
        key_id: &str,
        serial: u64,
        licenses: u32,
        at: i64,
    ) {
        let Some(this) = self.config.server_id.clone() else {
            return;
        };
        let (donor, receiver) = match side {
            LinkSide::Donor => (this, to.to_string()),
            LinkSide::Receiver => (donor.unwrap_or_default().to_string(), this),
        };
        let links = &mut self.sync.links;
        let horizon = u64::try_from(at - 400 * 86_400_000).unwrap_or(0);
        links.retain(|link| link.last_serial() >= horizon);
        let index = match links.iter().position(|link| {
            link.side == side
                && link.donor == donor
                && link.receiver == receiver
                && link.key_id == key_id
        }) {
            Some(index) => index,
            None => {
                links.push(crate::sync::LinkReport {
                    side,
                    donor,
                    receiver,
                    key_id: key_id.to_string(),
                    runs: Vec::new(),
                });
                links.len() - 1
            }
        };
        links[index].record(serial, licenses);
    }

    pub(super) fn record_usage_report(&mut self, from: &str, report: &UsageReport) -> Outcome {
        if !is_name(from) {
            return invalid(format!("{from:?} is not a server ID"));
        }
        let components = report.active_stations.len() + report.in_use.len();
        if components > USAGE_REPORT_COMPONENTS_MAX
            || report
                .active_stations
                .keys()
                .chain(report.in_use.keys())
                .any(|c| !is_name(c))
        {
            return invalid(format!(
                "a usage report names at most {USAGE_REPORT_COMPONENTS_MAX} valid component names"
            ));
        }
        if let Some(heads) = &report.heads
            && (heads.installation.len() > REPORTED_TEXT_MAX
                || heads
                    .log
                    .as_ref()
                    .is_some_and(|point| point.hash.len() > REPORTED_TEXT_MAX))
        {
            return invalid(format!(
                "a usage report's installation and log hash are at most {REPORTED_TEXT_MAX} characters"
            ));
        }
        self.reports.insert(from.into(), report.clone());
        Outcome::UsageReportRecorded { from: from.into() }
    }

    /// On a renewal, donations of the old key continue from the renewal key: the old ones
    /// end (they lapse by themselves) and new grants of the renewal key take their place.
    pub(super) fn move_donations(&mut self, old: &str, new: &str, at: i64) {
        let moving: Vec<Donation> = self
            .donations
            .values()
            .filter(|d| d.key_id == old && !d.ended)
            .cloned()
            .collect();
        for donation in moving {
            if let Some(d) = self
                .donations
                .get_mut(&(old.to_string(), donation.to.clone()))
            {
                d.ended = true;
            }
            // Already continued on the renewal in advance (`continue_donations`).
            if self
                .donations
                .get(&(new.to_string(), donation.to.clone()))
                .is_some_and(|d| !d.ended)
            {
                continue;
            }
            let Some(until) = self.continued_until(old, new, donation.donation_until_ms) else {
                continue;
            };
            // Refused (not enough free licenses, say): the neighbour keeps the old grant
            // until it lapses, and the renewal key keeps the donation pending, tried again
            // about every minute (`retry_pending_donations`); the notification names it.
            let pending = PendingDonation {
                to: donation.to.clone(),
                receiver_public_key: donation.receiver_public_key.clone(),
                licenses: donation.licenses,
                donation_until_ms: until,
                renewal_period_ms: donation.renewal_period_ms,
                reason: String::new(),
                next_try_ms: at,
            };
            self.try_pending_donation(new, pending, at);
        }
    }

    /// Until when a donation of `old` ending at `until_ms` continues from its renewal `new`:
    /// one that runs to the old key's end (the longest it could) runs to the renewal's end,
    /// a later date is kept within the renewal, an earlier one is kept as it is. `None`: it
    /// ends before the renewal starts serving.
    fn continued_until(&self, old: &str, new: &str, until_ms: i64) -> Option<i64> {
        let (old, new) = (self.keys.get(old)?, self.keys.get(new)?);
        let old_end = old.key.payload.valid_until_ms();
        let new_end = new.key.payload.valid_until_ms();
        let until = match until_ms.cmp(&old_end) {
            std::cmp::Ordering::Less => until_ms,
            std::cmp::Ordering::Equal => new_end,
            std::cmp::Ordering::Greater => until_ms.min(new_end),
        };
        (until > key_start_ms(new)).then_some(until)
    }

    /// A renewal allocated in advance: every running donation of the old key gets its twin
    /// on the renewal now, so the neighbour holds the renewal's grant before it takes over
    /// (it then goes on without a gap). Refused (not enough licenses), it waits as a pending
    /// donation, retried about every minute.
    pub(super) fn continue_donations(&mut self, old: &str, new: &str, at: i64) {
        let running: Vec<Donation> = self
            .donations
            .values()
            .filter(|d| d.key_id == old && !d.ended && d.donation_until_ms > at)
            .cloned()
            .collect();
        for donation in running {
            let to = donation.to.clone();
            if self
                .donations
                .get(&(new.to_string(), to.clone()))
                .is_some_and(|d| !d.ended)
            {
                continue;
            }
            let Some(until) = self.continued_until(old, new, donation.donation_until_ms) else {
                continue;
            };
            self.drop_pending_donation(new, &to);
            let pending = PendingDonation {
                to,
                receiver_public_key: donation.receiver_public_key.clone(),
                licenses: donation.licenses,
                donation_until_ms: until,
                renewal_period_ms: donation.renewal_period_ms,
                reason: String::new(),
                next_try_ms: at,
            };
            self.try_pending_donation(new, pending, at);
        }
    }

    /// Donates `pending` from `key_id` now if it fits; otherwise keeps it pending on the key
    /// with the reason, for another try a minute later. A donation whose end has passed is
    /// dropped.
    fn try_pending_donation(&mut self, key_id: &str, mut pending: PendingDonation, at: i64) {
        if pending.donation_until_ms <= at || !self.keys.contains_key(key_id) {
            return;
        }
        let outcome = self.donate(
            DonateRequest {
                key_id,
                to: &pending.to,
                receiver_public_key: &pending.receiver_public_key,
                licenses: pending.licenses,
                until_ms: pending.donation_until_ms,
                renewal_period_ms: pending.renewal_period_ms,
            },
            at,
        );
        if let Outcome::Refused { refusal } = outcome {
            pending.reason = refusal.to_string();
            pending.next_try_ms = at.saturating_add(PENDING_DONATION_RETRY_MS);
            if let Some(record) = self.keys.get_mut(key_id) {
                record.meta.pending_donations.push(pending);
            }
        }
    }

    /// Removes the pending donation of `key_id` to `to`, if any (an administrator donated or
    /// ended it meanwhile: their word wins).
    fn drop_pending_donation(&mut self, key_id: &str, to: &str) -> Option<PendingDonation> {
        let record = self.keys.get_mut(key_id)?;
        let index = record
            .meta
            .pending_donations
            .iter()
            .position(|p| p.to == to)?;
        Some(record.meta.pending_donations.remove(index))
    }

    /// Pending donations whose minute has come are tried again (inside apply, at the entry's
    /// time, so every host agrees; the primary's timer writes an entry at least once a
    /// minute).
    pub(super) fn retry_pending_donations(&mut self, at: i64) {
        let due: Vec<(String, PendingDonation)> = self
            .keys
            .iter_mut()
            .filter(|(_, record)| !record.meta.pending_donations.is_empty())
            .flat_map(|(key_id, record)| {
                let (due, later): (Vec<_>, Vec<_>) =
                    std::mem::take(&mut record.meta.pending_donations)
                        .into_iter()
                        .partition(|p| p.next_try_ms <= at);
                record.meta.pending_donations = later;
                due.into_iter()
                    .map(|p| (key_id.clone(), p))
                    .collect::<Vec<_>>()
            })
            .collect();
        for (key_id, pending) in due {
            self.try_pending_donation(&key_id, pending, at);
        }
    }

    /// Sets every key's donated count from its donations.
    pub(super) fn recount_donated(&mut self) {
        for record in self.keys.values_mut() {
            record.donated = 0;
        }
        for donation in self.donations.values() {
            if let Some(record) = self.keys.get_mut(&donation.key_id) {
                record.donated += donation.counted();
            }
        }
        self.refresh_grant_due();
    }

    pub(super) fn refresh_grant_due(&mut self) {
        let skew = self.config.clock_skew_max_ms;
        let lapses = self
            .donations
            .values()
            .flat_map(|d| d.outstanding.iter())
            .map(|o| o.lease_until_ms.saturating_add(skew));
        let ends = self
            .keys
            .values()
            .filter_map(|r| r.received.as_ref())
            .flat_map(|r| r.grants().map(|(_, until)| until).collect::<Vec<_>>())
            .chain(self.ended_early.values().flatten().copied());
        let ended_donations = self
            .donations
            .values()
            .filter(|d| d.outstanding.is_empty())
            .map(|d| d.donation_until_ms);
        self.grant_due_ms = lapses
            .chain(ends)
            .chain(ended_donations)
            .min()
            .unwrap_or(i64::MAX);
    }
}
