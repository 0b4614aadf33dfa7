//! Reads: leases, keys, donations, received grants, usage reports, the next expiry.

use super::*;

impl Ledger {
    pub fn lease(&self, lease_id: &str) -> Option<LeaseView> {
        self.leases.get(lease_id).map(|lease| lease.view())
    }

    /// The leases a station holds (one per key at most), from the station index.
    pub fn station_leases(&self, station: &str) -> Vec<LeaseView> {
        self.by_station
            .get(station)
            .into_iter()
            .flatten()
            .filter_map(|(_, lease_id)| self.leases.get(&**lease_id))
            .map(|lease| lease.view())
            .collect()
    }

    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// Whether a lease passes `filter`; its component matches the components of the lease's
    /// key (the keys covering a matching component are found once, here).
    pub(super) fn lease_matcher<'f>(
        &'f self,
        filter: &'f LeaseFilter<'f>,
    ) -> impl Fn(&Lease) -> bool + 'f {
        let covering: Option<std::collections::HashSet<&str>> = filter.component.map(|pattern| {
            self.keys
                .values()
                .filter(|record| {
                    record
                        .components
                        .iter()
                        .any(|component| LeaseFilter::matches_text(pattern, component))
                })
                .map(|record| &*record.id)
                .collect()
        });
        let others = LeaseFilter {
            component: None,
            ..filter.clone()
        };
        move |lease: &Lease| {
            others.matches(lease)
                && (filter.matches(lease)
                    || covering
                        .as_ref()
                        .is_some_and(|keys| keys.contains(&*lease.key_id)))
        }
    }

    /// One page of the leases that `filter` matches, in lease-id order after `after`: at most
    /// `limit` of them, and how many match in all. Costs one pass over the leases and a
    /// bounded heap (no sort of them all), whatever the page.
    pub fn lease_page(
        &self,
        filter: &LeaseFilter<'_>,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<LeaseView>, usize) {
        let mut total = 0;
        let matches = self.lease_matcher(filter);
        // The `limit` smallest ids after the cursor: a max-heap keeps them.
        let mut page: std::collections::BinaryHeap<ById<'_>> = std::collections::BinaryHeap::new();
        for lease in self.leases.values() {
            if !matches(lease) {
                continue;
            }
            total += 1;
            if after.is_some_and(|after| &*lease.id <= after) || limit == 0 {
                continue;
            }
            if page.len() < limit {
                page.push(ById(lease));
            } else if page.peek().is_some_and(|largest| lease.id < largest.0.id) {
                page.pop();
                page.push(ById(lease));
            }
        }
        let page = page.into_sorted_vec();
        (
            page.into_iter().map(|lease| lease.0.view()).collect(),
            total,
        )
    }

    /// Leases sorted by key, then station (for stable listings).
    pub fn leases(&self) -> Vec<LeaseView> {
        let mut leases: Vec<&Lease> = self.leases.values().map(|lease| &**lease).collect();
        leases.sort_by(|a, b| (&a.key_id, &a.station).cmp(&(&b.key_id, &b.station)));
        leases.into_iter().map(Lease::view).collect()
    }

    /// What a status shows of the leases without listing them all: the first `limit` leases
    /// to expire, and per component its first `limit` holders to expire with their count. A
    /// lease holds a license of its key, which lets its station use every component the key
    /// covers: it is a holder of each of them. Walks the expiry index from the soonest and
    /// stops once every component has its holders (or after [`OVERVIEW_SCAN_MAX`] leases), so
    /// the cost does not grow with the number of leases.
    pub fn lease_overview(&self, limit: usize) -> LeaseOverview {
        let covers: HashMap<&str, &[Arc<str>]> = self
            .keys
            .values()
            .map(|record| (&*record.id, record.components.as_slice()))
            .collect();
        // Per component: how many leases hold it (the covering keys' counts), and the
        // holders found so far.
        let mut holders: BTreeMap<&str, (usize, Vec<LeaseView>)> = BTreeMap::new();
        for record in self.keys.values() {
            for component in &record.components {
                holders.entry(&**component).or_default().0 += record.in_use as usize;
            }
        }
        let mut wanted: usize = holders
            .values()
            .map(|(total, _)| (*total).min(limit))
            .sum::<usize>()
            + limit.min(self.leases.len());
        let mut leases = Vec::new();
        for (_, lease_id) in self.expiry.iter().take(OVERVIEW_SCAN_MAX) {
            if wanted == 0 {
                break;
            }
            let Some(lease) = self.leases.get(&**lease_id) else {
                continue;
            };
            if leases.len() < limit {
                leases.push(lease.view());
                wanted -= 1;
            }
            for component in covers.get(&*lease.key_id).copied().unwrap_or_default() {
                if let Some((total, found)) = holders.get_mut(&**component)
                    && found.len() < limit.min(*total)
                {
                    found.push(lease.view());
                    wanted -= 1;
                }
            }
        }
        LeaseOverview {
            total: self.leases.len(),
            leases,
            holders: holders
                .into_iter()
                .map(|(component, (total, found))| (component.to_string(), (found, total)))
                .collect(),
        }
    }

    pub fn keys(&self, at: i64) -> Vec<KeyView> {
        self.keys
            .values()
            .map(|record| KeyView {
                id: record.id.to_string(),
                key: record.key.clone(),
                state: key_state(record, at),
                licenses: record.licenses(at),
                in_use: record.in_use,
                ended_early: record.ended_early,
                donated: record.donated,
                // What stations can take now: nothing from a key that is not (yet or any
                // more) valid or is allocated to no station; alone, only this host's share.
                free: if !is_active(record, at)
                    || (!record.meta.stations && record.meta.groups.is_empty())
                {
                    0
                } else {
                    match self.pair.alone {
                        Some(share) => {
                            let left = self.share_free(record, at, share).max(0);
                            u32::try_from(left).unwrap_or(u32::MAX).min(record.free(at))
                        }
                        None => record.free(at),
                    }
                },
                alone_share: self.pair.alone.map(|share| {
                    let (primary, backup) = self.share_sizes(record, at);
                    match share {
                        Share::Primary => primary,
                        Share::Backup => backup,
                    }
                }),
                received: record.received.clone(),
                meta: record.meta.clone(),
            })
            .collect()
    }

    /// Every donation to a neighbour, by key then neighbour.
    /// The counters a sync request reports (see [`crate::sync::LedgerCounters`]).
    pub fn counters(&self) -> crate::sync::LedgerCounters {
        crate::sync::LedgerCounters {
            leases_issued: self.sync.leases_issued,
            as_of_ms: Some(self.last_at_ms),
            leases_held: self.leases.len() as u64,
            seats_donated: self.keys.values().map(|r| u64::from(r.donated)).sum(),
            keys: self.keys.len() as u64,
        }
    }

    pub fn donations(&self) -> Vec<Donation> {
        self.donations.values().cloned().collect()
    }

    pub fn donation(&self, key_id: &str, to: &str) -> Option<&Donation> {
        self.donations.get(&(key_id.to_string(), to.to_string()))
    }

    /// The latest usage report of each neighbour.
    pub fn usage_reports(&self) -> &BTreeMap<String, UsageReport> {
        &self.reports
    }

    /// What this server must sign to hand the latest grant of a donation to its neighbour:
    /// the chain it extends and the new link. `None` when there is nothing outstanding, or
    /// this server has no ID or key to sign as.
    pub fn grant_to_sign(&self, key_id: &str, to: &str) -> Option<(GrantSource<'_>, GrantPayload)> {
        let donation = self.donation(key_id, to)?;
        let latest = donation.outstanding.iter().max_by_key(|o| o.serial)?;
        let record = self.keys.get(key_id)?;
        let source = match &record.received {
            Some(received) => GrantSource::Received(&received.grant),
            None => GrantSource::Key {
                key: &record.key,
                certificate: self.sync.certificate.as_ref(),
            },
        };
        let components = record.components.iter().map(|c| c.to_string()).collect();
        // Within what the chain carries now: if the grant this one comes from was shortened
        // since, the document says the shorter (a receiver may use less, never more).
        let (mut lease_until_ms, mut donation_until_ms) =
            (latest.lease_until_ms, donation.donation_until_ms);
        if let Some(received) = &record.received {
            let parent = received.grant.last();
            lease_until_ms = lease_until_ms.min(parent.lease_until_ms());
            donation_until_ms = donation_until_ms.min(parent.donation_until_ms());
        }
        let payload = GrantPayload {
            key_id: record.key.payload.key_id.clone(),
            donor: self.config.server_id.clone()?,
            donor_public_key: self.config.server_public_key?.to_base64(),
            receiver: to.into(),
            receiver_public_key: donation.receiver_public_key.clone(),
            components,
            licenses: latest.licenses,
            serial: latest.serial,
            issued_at: jiff::Timestamp::from_millisecond(donation.renewed_at_ms).ok()?,
            lease_until: jiff::Timestamp::from_millisecond(lease_until_ms).ok()?,
            donation_until: jiff::Timestamp::from_millisecond(donation_until_ms).ok()?,
            prev_serial: donation
                .prev_serial
                .filter(|_| latest.serial == donation.serial),
        };
        Some((source, payload))
    }

    /// Received pools: (pool id, grant details), for reports and link checks.
    pub fn received(&self) -> Vec<(String, Received)> {
        self.keys
            .iter()
            .filter_map(|(id, r)| r.received.clone().map(|rc| (id.clone(), rc)))
            .collect()
    }

    /// The components a key (or received pool) covers: a lease of it lets its station use
    /// each of them. Empty for a key not here.
    pub fn key_components(&self, key_id: &str) -> Vec<String> {
        self.keys.get(key_id).map_or_else(Vec::new, |record| {
            record.components.iter().map(|c| c.to_string()).collect()
        })
    }

    pub fn key(&self, key_id: &str) -> Option<&LicenseKey> {
        self.keys.get(key_id).map(|record| &record.key)
    }

    /// The grant chain a received pool serves from (`None`: not a received pool).
    pub fn received_grant(&self, pool: &str) -> Option<&Grant> {
        self.keys
            .get(pool)
            .and_then(|record| record.received.as_ref())
            .map(|received| &received.grant)
    }

    pub fn sync_state(&self) -> &SyncState {
        &self.sync
    }

    /// When the next lease or grant runs out, so the primary knows when to propose `Expire`.
    pub fn next_expiry_ms(&self) -> Option<i64> {
        let lease = self.expiry.first().map(|(at, _)| *at);
        let grant = (self.grant_due_ms != i64::MAX).then_some(self.grant_due_ms);
        // A renewal allocated in advance takes over at its start: an entry is due then.
        let takeover = self
            .keys
            .values()
            .filter(|record| record.meta.stations || record.in_use > 0)
            .filter_map(|record| self.pending_renewal(record))
            .map(key_start_ms)
            .min();
        [lease, grant, takeover].into_iter().flatten().min()
    }
}
