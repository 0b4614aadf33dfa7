//! The neighbour link's rules (docs/neighbours.md): when a donor pushes its grants and a
//! receiver asks for a renewal, which grants a donor signs, what a receiver says it holds and
//! no longer uses, what a donor takes back and how it compares the receiver's word with its
//! own records.
//!
//! [`LinkMemory`] is what one host remembers of one link (in memory: a new primary starts
//! afresh and contacts every neighbour at once). The functions read the ledger and that
//! memory, and return what to send or to propose; the runtime (the server over signed HTTP,
//! the simulator over its simulated network) carries it, proposes the commands, and tells
//! the memory what happened (`on_*`).

use std::collections::{BTreeMap, BTreeSet};

use tessera_core::{Command, Grant, Ledger, SecretKey};

/// How a receiver keeps in touch with its donor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Connection {
    /// Always reachable: renewals at half a grant's length, a report or a sync period.
    Permanent,
    /// Reachable now and then: every `reconnect_ms`, and when a grant is about to lapse.
    Periodic { reconnect_ms: i64 },
}

/// The link's timers, from the host's configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkTiming {
    /// A donor pushes (license synchronization) at least this often; a permanent receiver
    /// asks for a renewal at least this often.
    pub sync_period_ms: i64,
    /// A periodic receiver asks when a grant has less than this left.
    pub preliminary_renewal_ms: i64,
    /// After a failed attempt, a link is tried again no sooner than this.
    pub retry_ms: i64,
    /// The clocks of two neighbours may differ this much (`clock_skew_max`).
    pub skew_ms: i64,
}

/// What a receiver says it holds from a donor (one grant per vendor key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    /// The vendor key id.
    pub key_id: String,
    pub serial: u64,
    pub licenses: u32,
    /// Licenses of it in use here now.
    pub in_use: u32,
}

/// A grant a receiver no longer uses: every serial up to `serial` of the vendor key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Returned {
    pub key_id: String,
    pub serial: u64,
}

/// What one host remembers of one link.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkMemory {
    pub last_push_ms: Option<i64>,
    pub last_renew_ms: Option<i64>,
    pub last_report_ms: Option<i64>,
    pub last_failure_ms: Option<i64>,
    /// Receiver side: the donor's usage report period, once its answer said it.
    pub report_period_ms: Option<i64>,
    /// Donor side: per donation (key id as donated), the latest serial the receiver was seen
    /// holding. A receiver that held a grant and then reports nothing, without having given
    /// it back, lost it.
    pub acknowledged: BTreeMap<String, u64>,
    /// Receiver side: grants given back (vendor key id → serial, and from when the donor
    /// may hear of it: once the stations of the ended leases stopped) the donor has not yet
    /// confirmed hearing about.
    pub returned_pending: BTreeMap<String, (u64, i64)>,
}

/// The vendor key id of a key or received pool id (`KEY@DONOR` → `KEY`).
pub fn vendor_key_id(key_id: &str) -> &str {
    key_id.split('@').next().unwrap_or(key_id)
}

/// A received grant's renewal points: (issued at, lease until, usable until).
pub type GrantPoint = (i64, i64, i64);

/// The renewal points of every grant received from `donor`.
pub fn grant_points(ledger: &Ledger, donor: &str) -> Vec<GrantPoint> {
    ledger
        .received()
        .into_iter()
        .filter(|(_, r)| r.donor == donor)
        .map(|(_, r)| {
            let last = r.grant.last();
            (
                last.issued_at.as_millisecond(),
                last.lease_until.as_millisecond(),
                r.usable_until_ms,
            )
        })
        .collect()
}

/// What a link's tick calls for (see [`LinkMemory::on_tick`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkAction {
    /// Donor side: send the grants (license synchronization).
    Push,
    /// Receiver side: ask the donor to renew (with what was given back, and a usage report
    /// when [`LinkMemory::usage_due`]).
    RequestRenewal,
}

/// The roles this server plays on a link: it sends (donor), receives, or both (peers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Roles {
    pub send: bool,
    pub receive: bool,
}

impl LinkMemory {
    /// One tick of a link: what is due now, in order. Nothing while a failed attempt is
    /// recent ([`LinkMemory::resting`]); as donor the push ([`LinkMemory::push_due`]); as
    /// receiver the renewal request ([`LinkMemory::renewal_due`], on `grants`, the renewal
    /// points of what this server holds from the donor). The runtime carries the actions out
    /// and reports back (`on_renewed`, `on_released`, `acknowledge`).
    pub fn on_tick(
        &self,
        now_ms: i64,
        timing: &LinkTiming,
        connection: Connection,
        roles: Roles,
        grants: impl IntoIterator<Item = GrantPoint>,
    ) -> Vec<LinkAction> {
        let mut actions = Vec::new();
        if self.resting(now_ms, timing) {
            return actions;
        }
        if roles.send && self.push_due(now_ms, timing, connection) {
            actions.push(LinkAction::Push);
        }
        if roles.receive && self.renewal_due(now_ms, timing, connection, grants) {
            actions.push(LinkAction::RequestRenewal);
        }
        actions
    }

    /// Whether a failed attempt is recent enough to leave the link alone for now.
    pub fn resting(&self, now_ms: i64, timing: &LinkTiming) -> bool {
        self.last_failure_ms
            .is_some_and(|failed| now_ms - failed < timing.retry_ms)
    }

    /// Donor side: whether the push (license synchronization) is due: every `sync_period`,
    /// for a periodic connection at most every `reconnect_period`.
    pub fn push_due(&self, now_ms: i64, timing: &LinkTiming, connection: Connection) -> bool {
        let push_ms = match connection {
            Connection::Permanent => timing.sync_period_ms,
            Connection::Periodic { reconnect_ms } => timing.sync_period_ms.max(reconnect_ms),
        };
        self.last_push_ms
            .is_none_or(|last| now_ms - last >= push_ms)
    }

    /// Receiver side: whether to ask the donor for a renewal now. Never asked by this host,
    /// or a grant given back whose stations stopped (the donor should hear of it): now.
    /// Permanent connection: when a grant has less than half of its length (issue → lease
    /// end) left, when a usage report is due, and at least every `sync_period` (which also
    /// picks up donations whose push was lost). Periodic connection: every
    /// `reconnect_period`, and when a grant has less than `preliminary_renewal_interval` left.
    pub fn renewal_due(
        &self,
        now_ms: i64,
        timing: &LinkTiming,
        connection: Connection,
        grants: impl IntoIterator<Item = GrantPoint>,
    ) -> bool {
        let Some(last) = self.last_renew_ms else {
            return true;
        };
        if self
            .returned_pending
            .values()
            .any(|(_, from_ms)| *from_ms <= now_ms)
        {
            return true;
        }
        let since = now_ms - last;
        let mut grants = grants
            .into_iter()
            .filter(|(_, _, usable_until)| *usable_until > now_ms);
        match connection {
            Connection::Permanent => {
                since >= timing.sync_period_ms
                    || self.report_due(now_ms).unwrap_or(false)
                    || grants.any(|(issued, until, _)| until - now_ms < (until - issued) / 2)
            }
            Connection::Periodic { reconnect_ms } => {
                since >= reconnect_ms
                    || grants.any(|(_, _, usable_until)| {
                        usable_until - now_ms < timing.preliminary_renewal_ms
                    })
            }
        }
    }

    /// Receiver side: whether a usage report is due, once the donor said its period
    /// (`None` before).
    pub fn report_due(&self, now_ms: i64) -> Option<bool> {
        let period = self.report_period_ms?;
        Some(self.last_report_ms.is_none_or(|r| now_ms - r >= period))
    }

    /// Receiver side: whether a renewal request carries a usage report: every report period
    /// (the donor's, or `default_period_ms` before it said it).
    pub fn usage_due(&self, now_ms: i64, default_period_ms: i64) -> bool {
        let period = self.report_period_ms.unwrap_or(default_period_ms);
        self.last_report_ms
            .is_none_or(|last| now_ms - last >= period)
    }

    /// Receiver side: the renewal answer came; `returned` were sent with the request (the
    /// donor has heard of them), `reported` says whether a usage report went with it.
    pub fn on_renewed(&mut self, now_ms: i64, returned: &[Returned], reported: bool) {
        if reported {
            self.last_report_ms = Some(now_ms);
        }
        for r in returned {
            if self
                .returned_pending
                .get(&r.key_id)
                .map(|(serial, _)| *serial)
                == Some(r.serial)
            {
                self.returned_pending.remove(&r.key_id);
            }
        }
    }

    /// Receiver side: a grant of vendor key `key_id` was given back at `serial`; the donor may
    /// hear of it from `from_ms` (once the stations of its ended leases stopped). With an
    /// earlier release still pending, the highest serial is reported, and only once the
    /// stations of both have stopped.
    pub fn on_released(&mut self, key_id: &str, serial: u64, from_ms: i64) {
        let entry = self
            .returned_pending
            .entry(key_id.to_string())
            .or_insert((0, from_ms));
        *entry = (entry.0.max(serial), entry.1.max(from_ms));
    }

    /// Donor side: remembers which serial the receiver `to` holds of each donation.
    pub fn acknowledge(&mut self, ledger: &Ledger, to: &str, held: &[Held]) {
        let donations = ledger.donations();
        self.acknowledged.retain(|key_id, _| {
            donations
                .iter()
                .any(|d| d.to == to && &d.key_id == key_id && !d.outstanding.is_empty())
        });
        for h in held {
            if let Some(d) = donations
                .iter()
                .find(|d| d.to == to && vendor_key_id(&d.key_id) == h.key_id)
            {
                let entry = self.acknowledged.entry(d.key_id.clone()).or_insert(0);
                *entry = (*entry).max(h.serial);
            }
        }
    }

    /// Receiver side: the grants of `donor` this host no longer uses. Those it gave back
    /// whose stations stopped using them, and for each one it holds, the serials before it,
    /// unless an earlier grant still counts here (then nothing is confirmed until it lapses).
    pub fn returned_to(&self, ledger: &Ledger, donor: &str, now_ms: i64) -> Vec<Returned> {
        let mut returned: BTreeMap<String, u64> = self
            .returned_pending
            .iter()
            .filter(|(_, (_, from_ms))| *from_ms <= now_ms)
            .map(|(key_id, (serial, _))| (key_id.clone(), *serial))
            .collect();
        for view in ledger.keys(ledger.last_at_ms().max(now_ms)) {
            let Some(received) = view.received.as_ref() else {
                continue;
            };
            // Not while leases of a released grant still run: the donor counts them under
            // that grant until it hears of its return.
            if received.donor == donor
                && received.serial > 1
                && received.floor.is_empty()
                && view.ended_early == 0
            {
                let entry = returned.entry(view.key.payload.key_id.clone()).or_insert(0);
                *entry = (*entry).max(received.serial - 1);
            }
        }
        returned
            .into_iter()
            .map(|(key_id, serial)| Returned { key_id, serial })
            .collect()
    }

    /// Donor side: compares what receiver `to` says it holds with this donor's records.
    /// Consistent: it holds one of the grants this donor still counts for the donation
    /// (perhaps not yet the newest), or nothing where it never confirmed a grant, or where
    /// the grants it may still hold are about to end. Any other difference (a count or serial
    /// this donor never issued, a grant it does not know, a grant lost) is a mismatch, in
    /// words with both counts.
    pub fn compare_records(
        &self,
        ledger: &Ledger,
        to: &str,
        held: &[Held],
        now_ms: i64,
        timing: &LinkTiming,
    ) -> Vec<String> {
        let mut mismatches = Vec::new();
        let mut seen = BTreeSet::new();
        for donation in ledger.donations().iter().filter(|d| d.to == to) {
            let key_id = vendor_key_id(&donation.key_id).to_string();
            seen.insert(key_id.clone());
            let counted = donation.counted();
            let theirs = held.iter().find(|h| h.key_id == key_id);
            let consistent = match theirs {
                // One of the grants this donor counts; or an earlier one of its own, replaced
                // by a newer grant still on its way (an edited end date or count), giving no
                // more than this donor counts. A serial above the newest it issued is not its
                // own: that, or more licenses than counted, is a real mismatch.
                Some(h) => {
                    donation
                        .outstanding
                        .iter()
                        .any(|o| o.serial == h.serial && o.licenses == h.licenses)
                        || (h.serial < donation.serial && h.licenses <= counted)
                }
                // Ended: the receiver gives it back (and says so once its stations stopped).
                None if donation.ended || donation.donation_until_ms <= now_ms => true,
                None => !self
                    .acknowledged
                    .get(&donation.key_id)
                    .is_some_and(|serial| {
                        donation.outstanding.iter().any(|o| {
                            o.serial >= *serial && o.lease_until_ms - 2 * timing.skew_ms > now_ms
                        })
                    }),
            };
            if !consistent {
                let (their_licenses, their_serial) =
                    theirs.map_or((0, 0), |h| (h.licenses, h.serial));
                mismatches.push(format!(
                    "neighbour {to} reports {their_licenses} licenses of key {key_id} received (grant serial {their_serial}), this server counts {counted} donated (serial {})",
                    donation.serial
                ));
            }
        }
        for theirs in held.iter().filter(|h| !seen.contains(&h.key_id)) {
            mismatches.push(format!(
                "neighbour {to} reports {} licenses of key {} received (grant serial {}), this server counts 0 donated",
                theirs.licenses, theirs.key_id, theirs.serial
            ));
        }
        mismatches
    }
}

/// Receiver side: what this host holds from `donor` and can still use.
pub fn held_from(ledger: &Ledger, donor: &str, now_ms: i64) -> Vec<Held> {
    ledger
        .keys(ledger.last_at_ms().max(now_ms))
        .into_iter()
        .filter_map(|view| {
            let received = view.received.as_ref()?;
            (received.donor == donor && received.usable_until_ms > now_ms).then(|| Held {
                key_id: view.key.payload.key_id.clone(),
                serial: received.serial,
                licenses: received.licenses,
                in_use: view.in_use,
            })
        })
        .collect()
}

/// Donor side: the signed grants of every running donation to `to`, and whether the receiver
/// should give back the grants of ended ones. Read after the renewal committed: only committed
/// extensions are signed.
pub fn grants_for(
    ledger: &Ledger,
    to: &str,
    now_ms: i64,
    identity: &SecretKey,
) -> (Vec<Grant>, bool) {
    let mut grants = Vec::new();
    let mut returned_request = false;
    for donation in ledger.donations().iter().filter(|d| d.to == to) {
        if donation.outstanding.is_empty() {
            continue;
        }
        if donation.ended || donation.donation_until_ms <= now_ms {
            returned_request = true;
            continue;
        }
        if let Some((source, payload)) = ledger.grant_to_sign(&donation.key_id, to) {
            grants.push(Grant::issue(source, payload, identity));
        }
    }
    (grants, returned_request)
}

/// Donor side: the `GrantReturned` commands for what receiver `to` no longer uses. Only
/// serials this donor issued and still counts are taken back.
pub fn take_back(ledger: &Ledger, to: &str, returned: &[Returned]) -> Vec<Command> {
    let donations = ledger.donations();
    returned
        .iter()
        .filter_map(|item| {
            let donation = donations.iter().find(|d| {
                d.to == to
                    && vendor_key_id(&d.key_id) == item.key_id
                    && item.serial <= d.serial
                    && d.outstanding.iter().any(|o| o.serial <= item.serial)
            })?;
            Some(Command::GrantReturned {
                key_id: donation.key_id.clone(),
                to: to.to_string(),
                serial: item.serial,
            })
        })
        .collect()
}

/// Receiver side: the vendor key ids of the grants in a push or renewal answer (what it
/// keeps when the donor asks for the rest back).
pub fn kept(grants: &[Grant]) -> BTreeSet<String> {
    grants
        .iter()
        .filter_map(|g| g.links.last().map(|l| l.payload.key_id.clone()))
        .collect()
}

/// Receiver side, when the donor asks for ended donations back: each pool received from
/// `donor` whose vendor key is not in `keep`, with the neighbours it donated that pool to
/// further (called back first, with `EndDonation`, then the pool with `ReleaseGrant`).
pub fn to_release(
    ledger: &Ledger,
    donor: &str,
    keep: &BTreeSet<String>,
) -> Vec<(String, Vec<String>)> {
    let donations = ledger.donations();
    ledger
        .received()
        .into_iter()
        .filter(|(_, r)| r.donor == donor && !keep.contains(&r.grant.last().key_id))
        .map(|(pool, _)| {
            let onward = donations
                .iter()
                .filter(|d| d.key_id == pool && !d.ended)
                .map(|d| d.to.clone())
                .collect();
            (pool, onward)
        })
        .collect()
}

#[cfg(test)]
mod tests;
