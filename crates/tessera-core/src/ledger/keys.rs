//! Keys: importing and removing them (the administrator's, or the vendor's revocation),
//! and allocating them to stations, station groups and neighbours.

use super::*;

impl Ledger {
    pub(super) fn import_key(&mut self, key: &LicenseKey, at: i64) -> Outcome {
        let refuse = |error: KeyError| Outcome::Refused {
            refusal: Refusal::KeyRejected { error },
        };
        let payload = match key.verify(&self.config.trusted_vendors) {
            Ok(payload) => payload,
            Err(error) => return refuse(error),
        };
        if self.sync.revoked.contains(&payload.key_id) {
            return refuse(KeyError::Revoked {
                key_id: payload.key_id.clone(),
            });
        }
        if payload.valid_until_ms() <= at {
            return refuse(KeyError::Expired {
                key_id: payload.key_id.clone(),
                valid_until: payload.valid_until.to_string(),
            });
        }
        if let Some(issued_to) = &payload.server_id
            && self.config.server_id.as_deref() != Some(issued_to.as_str())
        {
            return refuse(KeyError::OtherServer {
                key_id: payload.key_id.clone(),
                issued_to: issued_to.clone(),
                this_server: self
                    .config
                    .server_id
                    .clone()
                    .unwrap_or_else(|| "no server ID".into()),
            });
        }
        if let Some(pool) = self
            .keys
            .values()
            .find(|r| r.received.is_some() && r.key.key_id() == payload.key_id)
        {
            return invalid(format!(
                "this server already receives licenses of key {} from a neighbour ({}): importing the key as well would count them twice",
                payload.key_id, pool.id
            ));
        }
        if self.keys.contains_key(&payload.key_id) {
            return Outcome::Refused {
                refusal: Refusal::KeyAlreadyImported {
                    key_id: payload.key_id.clone(),
                },
            };
        }
        let key_id = payload.key_id.clone();
        self.sync
            .observe_vendor_time(payload.issued_at.as_millisecond());
        self.keys.insert(
            key_id.clone(),
            KeyRecord::new(
                key.clone(),
                KeyMeta {
                    stations: true,
                    ..KeyMeta::default()
                },
            ),
        );
        Outcome::KeyImported { key_id }
    }

    /// The administrator's removal: refused while a neighbour may still hold a grant of the
    /// key. Removing the key (and adding it again) would otherwise forget those donated seats
    /// while the neighbour keeps using them. End the donation first; its grants run out within
    /// a renewal period.
    pub(super) fn remove_key_by_admin(&mut self, key_id: &str, at: i64) -> Outcome {
        let donated_until = self
            .donations
            .iter()
            .filter(|((from, _), _)| from == key_id)
            .flat_map(|(_, donation)| donation.outstanding.iter())
            .map(|grant| grant.lease_until_ms)
            .filter(|until| *until > at)
            .max();
        if self.keys.contains_key(key_id)
            && let Some(until_ms) = donated_until
        {
            return Outcome::Refused {
                refusal: Refusal::KeyHasDonations {
                    key_id: key_id.into(),
                    until_ms,
                },
            };
        }
        self.remove_key(key_id)
    }

    /// Removes a key (the administrator's removal, checked above, or the vendor's revocation
    /// at sync, which always applies).
    pub(super) fn remove_key(&mut self, key_id: &str) -> Outcome {
        if !self.keys.contains_key(key_id) {
            return Outcome::Refused {
                refusal: Refusal::KeyNotFound {
                    key_id: key_id.into(),
                },
            };
        }
        // Borrowings run offline until their end: removing the key (and adding it again)
        // must not free their seats meanwhile.
        let borrowed_until = self
            .leases
            .values()
            .filter(|lease| lease.borrowed && &*lease.key_id == key_id)
            .map(|lease| lease.expires_at_ms)
            .max();
        if let Some(until_ms) = borrowed_until {
            return Outcome::Refused {
                refusal: Refusal::KeyHasBorrowings {
                    key_id: key_id.into(),
                    until_ms,
                },
            };
        }
        let leases_ended = self.end_leases_of(key_id);
        // Its donations go with it: receivers keep their grants until they run out.
        self.donations.retain(|(from, _), _| from != key_id);
        self.keys.remove(key_id);
        self.recount_donated();
        Outcome::KeyRemoved {
            key_id: key_id.into(),
            leases_ended,
        }
    }

    /// Ends every lease of a key (or received pool); returns how many.
    pub(super) fn end_leases_of(&mut self, key_id: &str) -> u32 {
        let doomed: Vec<Arc<str>> = self
            .leases
            .values()
            .filter(|lease| &*lease.key_id == key_id)
            .map(|lease| lease.id.clone())
            .collect();
        for lease_id in &doomed {
            self.remove_lease(lease_id);
        }
        doomed.len() as u32
    }

    pub(super) fn allocate_key(&mut self, key_id: &str, stations: bool) -> Outcome {
        let Some(record) = self.keys.get_mut(key_id) else {
            return Outcome::Refused {
                refusal: Refusal::KeyNotFound {
                    key_id: key_id.into(),
                },
            };
        };
        record.meta.stations = stations;
        Outcome::KeyAllocated {
            key_id: key_id.into(),
            stations,
        }
    }

    /// Whether a key serves this station: allocated to all stations, or to a group of it.
    pub(super) fn allocated_to(&self, record: &KeyRecord, station: &str) -> bool {
        record.meta.stations
            || record.meta.groups.iter().any(|group| {
                self.groups
                    .get(group)
                    .is_some_and(|members| members.contains(station))
            })
    }

    pub(super) fn allocate_key_to_groups(&mut self, key_id: &str, groups: &[String]) -> Outcome {
        if let Some(bad) = groups.iter().find(|g| !is_name(g)) {
            return invalid(format!("group {bad:?} is not a valid name"));
        }
        let Some(record) = self.keys.get_mut(key_id) else {
            return Outcome::Refused {
                refusal: Refusal::KeyNotFound {
                    key_id: key_id.into(),
                },
            };
        };
        record.meta.groups = groups.iter().cloned().collect();
        Outcome::KeyAllocatedToGroups {
            key_id: key_id.into(),
            groups: record.meta.groups.iter().cloned().collect(),
        }
    }

    pub(super) fn allocate_key_to_neighbours(
        &mut self,
        key_id: &str,
        neighbours: &[String],
    ) -> Outcome {
        if let Some(bad) = neighbours.iter().find(|n| !is_name(n)) {
            return invalid(format!("neighbour {bad:?} is not a valid server ID"));
        }
        let Some(record) = self.keys.get_mut(key_id) else {
            return Outcome::Refused {
                refusal: Refusal::KeyNotFound {
                    key_id: key_id.into(),
                },
            };
        };
        record.meta.neighbours = neighbours.iter().cloned().collect();
        Outcome::KeyAllocatedToNeighbours {
            key_id: key_id.into(),
            neighbours: record.meta.neighbours.iter().cloned().collect(),
        }
    }

    pub(super) fn set_station_group(&mut self, group: &str, stations: &[String]) -> Outcome {
        if !is_name(group) {
            return invalid(format!("group {group:?} is not a valid name"));
        }
        if stations.len() > STATIONS_PER_GROUP_MAX {
            return invalid(format!(
                "a group holds at most {STATIONS_PER_GROUP_MAX} stations"
            ));
        }
        if stations
            .iter()
            .any(|s| s.is_empty() || s.chars().count() > FREE_TEXT_LENGTH_MAX)
        {
            return invalid(format!(
                "station names have 1 to {FREE_TEXT_LENGTH_MAX} characters"
            ));
        }
        if stations.is_empty() {
            self.groups.remove(group);
        } else {
            self.groups
                .insert(group.to_string(), stations.iter().cloned().collect());
        }
        Outcome::StationGroupSet {
            group: group.into(),
            stations: self.groups.get(group).map_or(0, |m| m.len() as u32),
        }
    }

    pub fn station_groups(&self) -> &BTreeMap<String, BTreeSet<String>> {
        &self.groups
    }
}
