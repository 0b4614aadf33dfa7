//! Snapshots: the ledger as stored and restored (JSON with leases as rows), and the
//! checks a restore makes.

use super::*;

/// A signed object the ledger or its log holds that does not verify (checked at every start,
/// and by `tessera doctor`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unverified {
    /// The object: "license key K", "received pool K (grant from D)", "import of license key
    /// K", …
    pub what: String,
    /// Why it does not verify.
    pub why: String,
    /// Its vendor key is not on the trust list (the list changed, or another vendor's key):
    /// the way out is trusting that key again, not restoring a backup.
    pub untrusted_vendor: bool,
}

impl std::fmt::Display for Unverified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.what, self.why)
    }
}

impl Ledger {
    pub fn snapshot(&self) -> LedgerSnapshot {
        let mut leases: Vec<LeaseView> = self.leases.values().map(|lease| lease.view()).collect();
        leases.sort_by(|a, b| a.lease_id.cmp(&b.lease_id));
        LedgerSnapshot {
            last_at_ms: self.last_at_ms,
            keys: self.snapshot_keys(),
            leases,
            sync: self.sync.clone(),
            groups: self.groups.clone(),
            donations: self.donations(),
            reports: self.reports.clone(),
            accepted_serials: self.accepted_serials.clone(),
            issued_serials: self.issued_serials.clone(),
            ended_early: self.ended_early.clone(),
            pair_backup_percent: self.pair.backup_percent,
            backup_leases: self
                .pair
                .backup_leases
                .iter()
                .map(|id| id.to_string())
                .collect(),
            pair_merged_epochs: self.pair.merged_epochs.clone(),
            borrowed_leases: self.borrowed_lease_ids(),
        }
    }

    /// The snapshot as JSON, written straight from the ledger: the same document as
    /// `serde_json::to_vec(&self.snapshot())`, without building a million `LeaseView`s first.
    pub fn snapshot_json(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct SnapshotRef<'a> {
            last_at_ms: i64,
            keys: Vec<StoredKey>,
            #[serde(serialize_with = "compact_rows")]
            leases: Vec<&'a Lease>,
            groups: &'a BTreeMap<String, BTreeSet<String>>,
            sync: &'a SyncState,
            donations: Vec<&'a Donation>,
            reports: &'a BTreeMap<String, UsageReport>,
            accepted_serials: &'a BTreeMap<String, u64>,
            issued_serials: &'a BTreeMap<String, u64>,
            ended_early: &'a BTreeMap<String, Vec<i64>>,
            pair_backup_percent: Option<u8>,
            backup_leases: Vec<&'a str>,
            pair_merged_epochs: &'a BTreeMap<Share, u64>,
            borrowed_leases: Vec<String>,
        }
        fn compact_rows<S: serde::Serializer>(
            leases: &[&Lease],
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            serializer.collect_seq(leases.iter().map(|l| {
                (
                    &*l.id,
                    &*l.key_id,
                    l.components.iter().map(|c| &**c).collect::<Vec<&str>>(),
                    &*l.station,
                    &*l.user,
                    &*l.host,
                    l.issued_at_ms,
                    l.renewed_at_ms,
                    l.expires_at_ms,
                )
            }))
        }
        let mut leases: Vec<&Lease> = self.leases.values().map(|lease| &**lease).collect();
        leases.sort_by(|a, b| a.id.cmp(&b.id));
        let snapshot = SnapshotRef {
            last_at_ms: self.last_at_ms,
            keys: self.snapshot_keys(),
            leases,
            groups: &self.groups,
            sync: &self.sync,
            donations: self.donations.values().collect(),
            reports: &self.reports,
            accepted_serials: &self.accepted_serials,
            issued_serials: &self.issued_serials,
            ended_early: &self.ended_early,
            pair_backup_percent: self.pair.backup_percent,
            backup_leases: self.pair.backup_leases.iter().map(|id| &**id).collect(),
            pair_merged_epochs: &self.pair.merged_epochs,
            borrowed_leases: self.borrowed_lease_ids(),
        };
        serde_json::to_vec(&snapshot).expect("the ledger serializes")
    }

    /// The ids of the borrowed leases, sorted.
    fn borrowed_lease_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .leases
            .values()
            .filter(|lease| lease.borrowed)
            .map(|lease| lease.id.to_string())
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Checks the signed object a command carries (a key, a neighbour's grant, a vendor's sync
    /// response) as its apply will, without the time: the refusal its apply would give for a
    /// signature, format or chain that does not verify. The server checks every such command
    /// before it proposes it, so none that fails enters the log.
    pub fn verify_command(&self, command: &Command) -> Result<(), Refusal> {
        let trusted = &self.config.trusted_vendors;
        match command {
            Command::ImportKey { key } => key
                .verify(trusted)
                .map(drop)
                .map_err(|error| Refusal::KeyRejected { error }),
            Command::AcceptGrant { grant } => match (
                self.config.server_id.as_deref(),
                self.config.server_public_key.as_ref(),
            ) {
                (Some(server_id), Some(server_key)) => grant
                    .verify_signed(trusted, server_id, server_key)
                    .map(drop)
                    .map_err(|error| Refusal::GrantRejected { error }),
                // Refused on apply for want of an identity, whatever the grant.
                _ => Ok(()),
            },
            Command::CompleteSync { response } => response
                .verify(trusted)
                .map(drop)
                .map_err(|error| Refusal::SyncRejected { error }),
            _ => Ok(()),
        }
    }

    /// Why a logged command carries a signed object that does not verify against the trusted
    /// vendor keys, or `None`. Such commands are verified before they are proposed
    /// ([`Ledger::verify_command`]), so one in the log that does not verify was edited on disk,
    /// or its vendor left the trust list: replaying it would make a key or a received pool
    /// silently vanish (or, edited the other way, appear). Checked over the whole stored log
    /// at every start.
    pub fn unverified_command(&self, command: &Command) -> Option<Unverified> {
        let what = match command {
            Command::ImportKey { key } => format!("import of license key {}", key.key_id()),
            Command::AcceptGrant { grant } => match grant.links.last() {
                Some(link) => format!(
                    "grant of key {} from {} (serial {})",
                    link.payload.key_id, link.payload.donor, link.payload.serial
                ),
                None => "a grant without links".to_string(),
            },
            Command::CompleteSync { .. } => "a vendor sync response".to_string(),
            _ => return None,
        };
        self.verify_command(command)
            .err()
            .map(|refusal| Unverified {
                what,
                why: refusal.to_string(),
                untrusted_vendor: refusal.is_untrusted_vendor(),
            })
    }

    /// The keys this ledger holds (its own, received pools', and renewal keys held for
    /// sync), the grants it received and its vendor certificate that do not verify against
    /// the trusted vendor keys (and, for grants, this server's identity), with why: a
    /// snapshot or log edited on disk, or a vendor key removed from the trust list. Checked
    /// at every start.
    pub fn unverified_keys(&self) -> Vec<Unverified> {
        let trusted = &self.config.trusted_vendors;
        let held = self
            .keys
            .values()
            .map(|record| (record.id.to_string(), &record.key));
        let renewals = self
            .sync
            .renewals
            .iter()
            .map(|(renews, key)| (format!("{} (renewal of {renews})", key.key_id()), key));
        let mut found: Vec<Unverified> = held
            .chain(renewals)
            .filter_map(|(id, key)| {
                key.verify(trusted).err().map(|error| Unverified {
                    what: format!("license key {id}"),
                    why: error.to_string(),
                    untrusted_vendor: error.is_untrusted_vendor(),
                })
            })
            .collect();
        if let (Some(server_id), Some(server_key)) = (
            self.config.server_id.as_deref(),
            self.config.server_public_key.as_ref(),
        ) {
            for record in self.keys.values() {
                if let Some(received) = &record.received
                    && let Err(error) = received.grant.verify_signed(trusted, server_id, server_key)
                {
                    let untrusted_vendor = matches!(
                        error,
                        GrantError::BadKey {
                            untrusted_vendor: true,
                            ..
                        }
                    );
                    found.push(Unverified {
                        what: format!(
                            "received pool {} (grant from {})",
                            record.id, received.donor
                        ),
                        why: error.to_string(),
                        untrusted_vendor,
                    });
                }
            }
        }
        if let Some(certificate) = &self.sync.certificate
            && let Err(error) = certificate.verify(trusted)
        {
            found.push(Unverified {
                what: format!(
                    "vendor certificate of server {}",
                    certificate.payload.server_id
                ),
                why: error.to_string(),
                untrusted_vendor: error.is_untrusted_vendor(),
            });
        }
        found
    }

    fn snapshot_keys(&self) -> Vec<StoredKey> {
        self.keys
            .values()
            .map(|r| StoredKey {
                key: r.key.clone(),
                meta: r.meta.clone(),
                received: r.received.clone(),
            })
            .collect()
    }

    /// Rebuilds a ledger from a snapshot this server wrote itself (keys are not verified
    /// again: they were verified when their import was applied).
    pub fn restore(config: LedgerConfig, snapshot: LedgerSnapshot) -> Ledger {
        let mut ledger = Ledger::new(config);
        ledger.restore_header(RestoredHeader {
            last_at_ms: snapshot.last_at_ms,
            sync: snapshot.sync,
            groups: snapshot.groups,
            keys: snapshot.keys,
            donations: snapshot.donations,
            reports: snapshot.reports,
            accepted_serials: snapshot.accepted_serials,
            issued_serials: snapshot.issued_serials,
            ended_early: snapshot.ended_early,
            pair_backup_percent: snapshot.pair_backup_percent,
            pair_merged_epochs: snapshot.pair_merged_epochs,
        });
        ledger.reserve_leases(snapshot.leases.len());
        let mut expiry = Vec::with_capacity(snapshot.leases.len());
        for lease in &snapshot.leases {
            ledger.insert_restored(
                &mut expiry,
                RestoredLease {
                    id: &lease.lease_id,
                    key_id: &lease.key_id,
                    components: &lease.components,
                    station: &lease.station,
                    user: &lease.user,
                    host: &lease.host,
                    times_ms: (lease.issued_at_ms, lease.renewed_at_ms, lease.expires_at_ms),
                },
            );
        }
        ledger.finish_restore(expiry, &snapshot.backup_leases, &snapshot.borrowed_leases);
        ledger
    }

    /// Rebuilds a ledger straight from snapshot JSON, borrowing the lease strings from the
    /// bytes instead of building a `LeaseView` per lease first: the restart path.
    pub fn restore_json(config: LedgerConfig, bytes: &[u8]) -> serde_json::Result<Ledger> {
        #[derive(Deserialize)]
        struct Text<'a>(#[serde(borrow)] std::borrow::Cow<'a, str>);
        type Row<'a> = (
            Text<'a>,
            Text<'a>,
            Vec<Text<'a>>,
            Text<'a>,
            Text<'a>,
            Text<'a>,
            i64,
            i64,
            i64,
        );
        #[derive(Deserialize)]
        struct SnapshotIn<'a> {
            last_at_ms: i64,
            keys: Vec<StoredKey>,
            #[serde(borrow)]
            leases: Vec<Row<'a>>,
            #[serde(default)]
            groups: BTreeMap<String, BTreeSet<String>>,
            #[serde(default)]
            sync: SyncState,
            #[serde(default)]
            donations: Vec<Donation>,
            #[serde(default)]
            reports: BTreeMap<String, UsageReport>,
            #[serde(default)]
            accepted_serials: BTreeMap<String, u64>,
            #[serde(default)]
            issued_serials: BTreeMap<String, u64>,
            #[serde(default)]
            ended_early: BTreeMap<String, Vec<i64>>,
            #[serde(default)]
            pair_backup_percent: Option<u8>,
            #[serde(default)]
            backup_leases: Vec<String>,
            #[serde(default)]
            pair_merged_epochs: BTreeMap<Share, u64>,
            #[serde(default)]
            borrowed_leases: Vec<String>,
        }
        let snapshot: SnapshotIn<'_> = serde_json::from_slice(bytes)?;
        let mut ledger = Ledger::new(config);
        ledger.restore_header(RestoredHeader {
            last_at_ms: snapshot.last_at_ms,
            sync: snapshot.sync,
            groups: snapshot.groups,
            keys: snapshot.keys,
            donations: snapshot.donations,
            reports: snapshot.reports,
            accepted_serials: snapshot.accepted_serials,
            issued_serials: snapshot.issued_serials,
            ended_early: snapshot.ended_early,
            pair_backup_percent: snapshot.pair_backup_percent,
            pair_merged_epochs: snapshot.pair_merged_epochs,
        });
        ledger.reserve_leases(snapshot.leases.len());
        let mut expiry = Vec::with_capacity(snapshot.leases.len());
        for row in &snapshot.leases {
            let components: SmallVec<[&str; 2]> = row.2.iter().map(|c| &*c.0).collect();
            ledger.insert_restored(
                &mut expiry,
                RestoredLease {
                    id: &row.0.0,
                    key_id: &row.1.0,
                    components: &components,
                    station: &row.3.0,
                    user: &row.4.0,
                    host: &row.5.0,
                    times_ms: (row.6, row.7, row.8),
                },
            );
        }
        ledger.finish_restore(expiry, &snapshot.backup_leases, &snapshot.borrowed_leases);
        Ok(ledger)
    }

    fn restore_header(&mut self, header: RestoredHeader) {
        self.last_at_ms = header.last_at_ms;
        self.sync = header.sync;
        self.groups = header.groups;
        for key in header.keys {
            let id = match &key.received {
                Some(received) => received_pool_id(key.key.key_id(), &received.donor),
                None => key.key.payload.key_id.clone(),
            };
            self.keys.insert(
                id.clone(),
                KeyRecord::with_id(&id, key.key, key.meta, key.received),
            );
        }
        self.donations = header
            .donations
            .into_iter()
            .map(|d| ((d.key_id.clone(), d.to.clone()), d))
            .collect();
        self.reports = header.reports;
        self.accepted_serials = header.accepted_serials;
        self.issued_serials = header.issued_serials;
        self.ended_early = header.ended_early;
        self.pair.backup_percent = header.pair_backup_percent;
        self.pair.merged_epochs = header.pair_merged_epochs;
        self.recount_ended_early();
        self.recount_donated();
    }

    fn reserve_leases(&mut self, count: usize) {
        self.leases.reserve(count);
        self.by_station.reserve(count);
    }

    /// Builds the expiry index in one sorted bulk load, and checks the restored counts.
    fn finish_restore(
        &mut self,
        mut expiry: Vec<(i64, Arc<str>)>,
        backup_leases: &[String],
        borrowed_leases: &[String],
    ) {
        expiry.sort_unstable();
        self.expiry = expiry.into_iter().collect();
        for lease_id in borrowed_leases {
            if let Some(lease) = self.leases.get_mut(lease_id.as_str()) {
                lease.borrowed = true;
            }
        }
        for lease_id in backup_leases {
            if let Some(id) = self
                .leases
                .get(lease_id.as_str())
                .map(|lease| lease.id.clone())
            {
                self.tag(&id, Share::Backup);
            }
        }
        for (key_id, record) in &self.keys {
            assert!(
                record.used() <= record.licenses(self.last_at_ms),
                "snapshot over-issues key {key_id}"
            );
        }
    }

    /// Like `insert_lease`, with the expiry index entry collected for a bulk load.
    fn insert_restored<S: AsRef<str>>(
        &mut self,
        expiry: &mut Vec<(i64, Arc<str>)>,
        lease: RestoredLease<'_, S>,
    ) {
        let record = &self.keys[lease.key_id];
        let station = self
            .by_station
            .get_key_value(lease.station)
            .map(|(station, _)| station.clone())
            .unwrap_or_else(|| Arc::from(lease.station));
        let (issued_at_ms, renewed_at_ms, expires_at_ms) = lease.times_ms;
        let lease = Lease {
            id: Arc::from(lease.id),
            key_id: record.id.clone(),
            components: lease
                .components
                .iter()
                .filter_map(|c| record.component(c.as_ref()).cloned())
                .collect(),
            station,
            user: lease.user.into(),
            host: lease.host.into(),
            issued_at_ms,
            renewed_at_ms,
            expires_at_ms,
            borrowed: false,
        };
        self.keys
            .get_mut(&*lease.key_id)
            .expect("lease's key exists")
            .in_use += 1;
        self.by_station
            .entry(lease.station.clone())
            .or_default()
            .push((lease.key_id.clone(), lease.id.clone()));
        expiry.push((lease.expires_at_ms, lease.id.clone()));
        self.leases.insert(lease.id.clone(), Box::new(lease));
    }
}
