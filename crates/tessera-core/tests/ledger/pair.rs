//! A redundant pair's ledger: shares, each host alone within its share, and the merge.

use tessera_core::{Command, Ledger, LedgerSnapshot, Outcome, Share, Stamped};

use super::{BASE_MS, at, checkout, import, key, ledger, refusal};

const HOUR_MS: i64 = 3_600_000;

fn heartbeat(lease_id: &str) -> Command {
    Command::Heartbeat {
        lease_id: lease_id.into(),
        lease_ttl_ms: HOUR_MS,
    }
}

/// A pair's ledger with key `K` of `licenses` for `cad`, half of it the backup's.
fn pair(licenses: u32) -> Ledger {
    let mut ledger = ledger();
    import(
        &mut ledger,
        key("K", &["cad"], licenses, BASE_MS + 1000 * HOUR_MS),
    );
    let outcome = ledger.apply(&at(
        BASE_MS,
        Command::SetPairSplit {
            backup_percent: Some(50),
        },
    ));
    assert_eq!(
        outcome,
        Outcome::PairSplitSet {
            backup_percent: Some(50)
        }
    );
    ledger
}

/// A pair's ledger with `leases` leases (stations 0 to `leases` - 1) taken while paired.
fn pair_with(licenses: u32, leases: u32) -> Ledger {
    let mut ledger = pair(licenses);
    for n in 0..leases {
        assert!(ask(&mut ledger, BASE_MS, n));
    }
    ledger
}

/// The hosts lose each other: each serves alone from its copy of the committed ledger.
fn split(committed: &Ledger) -> (Ledger, Ledger) {
    let mut primary = committed.clone();
    primary.set_alone(Some(Share::Primary));
    let mut backup = committed.clone();
    backup.set_alone(Some(Share::Backup));
    (primary, backup)
}

/// Station `n` asks; true if it got a new lease `l{n}`.
fn ask(ledger: &mut Ledger, at_ms: i64, n: u32) -> bool {
    matches!(
        ledger.apply(&at(
            at_ms,
            checkout(&format!("l{n}"), &format!("ws{n}"), "cad")
        )),
        Outcome::LeaseGranted { created: true, .. }
    )
}

/// A lease paid by `share`.
fn lease_of(ledger: &Ledger, share: Share) -> String {
    ledger
        .leases()
        .into_iter()
        .find(|l| ledger.lease_share(&l.lease_id) == share)
        .expect("a lease of that share")
        .lease_id
}

fn shares(ledger: &Ledger) -> (usize, usize) {
    let leases = ledger.leases();
    let backup = leases
        .iter()
        .filter(|l| ledger.lease_share(&l.lease_id) == Share::Backup)
        .count();
    (leases.len() - backup, backup)
}

/// The pair is back: both hosts' states (of those that served alone) in one merge.
fn merge(ledger: &mut Ledger, at_ms: i64, alone: &[&Ledger]) -> Outcome {
    let outcome = ledger.apply(&Stamped {
        at_ms,
        command: Command::MergeAlone {
            states: alone
                .iter()
                .map(|host| host.alone_state().expect("a host that served alone"))
                .collect(),
        },
    });
    ledger.check_invariants().unwrap();
    outcome
}

#[test]
fn paired_leases_are_split_between_the_shares_as_configured() {
    let mut ledger = pair(10);
    for n in 0..6 {
        assert!(ask(&mut ledger, BASE_MS, n));
    }
    assert_eq!(shares(&ledger), (3, 3));
    // Paired, the primary issues from both shares: all ten.
    for n in 6..10 {
        assert!(ask(&mut ledger, BASE_MS, n));
    }
    assert!(!ask(&mut ledger, BASE_MS, 10));
    assert_eq!(shares(&ledger), (5, 5));
    // Another split moves leases across so each share stays within its size.
    ledger.apply(&at(
        BASE_MS + 1,
        Command::SetPairSplit {
            backup_percent: Some(30),
        },
    ));
    assert_eq!(shares(&ledger), (7, 3));
    ledger.check_invariants().unwrap();
    let restored = Ledger::restore(ledger.config().clone(), ledger.snapshot());
    assert_eq!(shares(&restored), (7, 3));
    let json = Ledger::restore_json(ledger.config().clone(), &ledger.snapshot_json()).unwrap();
    assert_eq!(json.snapshot(), ledger.snapshot());
}

#[test]
fn alone_each_host_issues_within_its_share_and_the_pair_never_exceeds_the_key() {
    let committed = pair_with(10, 4);
    // The hosts lose each other: each keeps serving from its copy, alone.
    let (mut primary, mut backup) = split(&committed);
    let on_primary = (10..20)
        .filter(|n| ask(&mut primary, BASE_MS + 10, *n))
        .count();
    let on_backup = (20..30)
        .filter(|n| ask(&mut backup, BASE_MS + 10, *n))
        .count();
    assert_eq!(
        (on_primary, on_backup),
        (3, 3),
        "5 each, 2 each already used"
    );
    assert_eq!(4 + on_primary + on_backup, 10);
    // Admin changes wait for the pair.
    let refused = refusal(primary.apply(&at(
        BASE_MS + 20,
        Command::ImportKey {
            key: key("K2", &["cam"], 5, BASE_MS + HOUR_MS),
        },
    )));
    assert!(
        refused.to_string().contains("cannot reach each other"),
        "{refused}"
    );
    // Back together: the merge, whichever host's state comes first, gives the ten leases,
    // none twice.
    let mut one = committed.clone();
    merge(&mut one, BASE_MS + 30, &[&primary, &backup]);
    let mut other = committed.clone();
    merge(&mut other, BASE_MS + 30, &[&backup, &primary]);
    assert_eq!(one.lease_count(), 10);
    assert_eq!(one.leases(), other.leases());
    assert_eq!(shares(&one), (5, 5));
    // A merge delivered twice changes nothing.
    let again = merge(&mut one, BASE_MS + 31, &[&primary, &backup]);
    assert!(
        matches!(
            again,
            Outcome::AloneMerged {
                leases_merged: 0,
                leases_removed: 0,
                leases_dropped: 0,
            }
        ),
        "{again:?}"
    );
    assert_eq!(one.leases(), other.leases());
}

#[test]
fn alone_a_host_takes_over_a_lease_of_the_other_share_only_with_a_license_of_its_own() {
    let mut committed = pair_with(4, 4);
    let backup_lease = lease_of(&committed, Share::Backup);
    // The primary alone, its share full: a station of the backup's share failing over to it
    // cannot be served.
    let mut primary = committed.clone();
    primary.set_alone(Some(Share::Primary));
    assert_eq!(
        refusal(primary.apply(&at(BASE_MS + 10, heartbeat(&backup_lease)))).code(),
        "no_licenses_available"
    );
    // Once a lease of its own share is checked in, it can: the lease is its share's now.
    let own = lease_of(&primary, Share::Primary);
    primary.apply(&at(BASE_MS + 20, Command::Checkin { lease_id: own }));
    assert!(matches!(
        primary.apply(&at(BASE_MS + 30, heartbeat(&backup_lease))),
        Outcome::LeaseRenewed { .. }
    ));
    assert_eq!(primary.lease_share(&backup_lease), Share::Primary);
    // The backup meanwhile no longer hears from that station: the lease runs out there.
    let mut backup = committed.clone();
    backup.set_alone(Some(Share::Backup));
    backup.apply(&at(BASE_MS + 31_000, Command::Expire));
    assert!(backup.lease(&backup_lease).is_none());
    // Merged: the lease renewed on the primary survives the backup's expiry of it.
    merge(&mut committed, BASE_MS + 40_000, &[&backup, &primary]);
    let lease = committed.lease(&backup_lease).expect("still held");
    assert!(lease.expires_at_ms > BASE_MS + HOUR_MS);
    assert!(committed.lease_count() <= 4);
}

#[test]
fn a_station_served_on_both_hosts_keeps_one_lease() {
    let mut committed = pair(4);
    let (mut primary, mut backup) = split(&committed);
    primary.apply(&at(BASE_MS + 10, checkout("a", "ws-1", "cad")));
    backup.apply(&at(BASE_MS + 20, checkout("b", "ws-1", "cad")));
    merge(&mut committed, BASE_MS + 30, &[&primary, &backup]);
    let leases = committed.leases();
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].lease_id, "b", "the one renewed last");
}

/// Random station traffic on both hosts alone, over many seeds: each host stays within its
/// share, the distinct leases of both never exceed the key, and the merge keeps every lease
/// that was live on either side, once.
#[test]
fn random_traffic_alone_never_exceeds_the_key_and_merges_without_loss() {
    for seed in 1..=200u64 {
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut next = |bound: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % bound
        };
        let licenses = 1 + next(12) as u32;
        let percent = next(101) as u8;
        let mut committed = ledger();
        import(
            &mut committed,
            key("K", &["cad"], licenses, BASE_MS + 1000 * HOUR_MS),
        );
        committed.apply(&at(
            BASE_MS,
            Command::SetPairSplit {
                backup_percent: Some(percent),
            },
        ));
        for n in 0..next(licenses as u64 + 1) as u32 {
            ask(&mut committed, BASE_MS, n);
        }
        let mut hosts = [committed.clone(), committed.clone()];
        hosts[0].set_alone(Some(Share::Primary));
        hosts[1].set_alone(Some(Share::Backup));
        let mut t = BASE_MS;
        for step in 0..60 {
            t += next(20_000) as i64;
            let h = next(2) as usize;
            let station = format!("ws{}", next(24));
            // A station heartbeats or checks in the lease it holds on either host (failing
            // over to this one), or asks for one.
            let held = [h, 1 - h].into_iter().find_map(|i| {
                hosts[i]
                    .leases()
                    .into_iter()
                    .find(|l| l.station == station)
                    .map(|l| l.lease_id)
            });
            let command = match (next(4), held) {
                (2, Some(lease_id)) => Command::Heartbeat {
                    lease_id,
                    lease_ttl_ms: 30_000,
                },
                (3, Some(lease_id)) => Command::Checkin { lease_id },
                _ => checkout(&format!("h{h}-{step}"), &station, "cad"),
            };
            let host = &mut hosts[h];
            host.apply(&at(t, command));
            host.check_invariants().unwrap();
            let mut live: Vec<String> = hosts
                .iter()
                .flat_map(|h| h.leases())
                .filter(|l| l.expires_at_ms > t)
                .map(|l| l.station)
                .collect();
            live.sort();
            live.dedup();
            assert!(
                live.len() as u32 <= licenses,
                "seed {seed}: {} stations hold a license of a key of {licenses} ({percent} % backup)",
                live.len()
            );
        }
        let live: Vec<(String, String, i64)> = hosts
            .iter()
            .flat_map(|h| h.leases())
            .filter(|l| l.expires_at_ms > t)
            .map(|l| (l.lease_id, l.station, l.expires_at_ms))
            .collect();
        let order = next(2) as usize;
        merge(&mut committed, t, &[&hosts[order], &hosts[1 - order]]);
        assert!(committed.lease_count() as u32 <= licenses, "seed {seed}");
        for (lease_id, station, expires_at_ms) in live {
            let kept = committed
                .leases()
                .into_iter()
                .find(|l| l.station == station)
                .unwrap_or_else(|| panic!("seed {seed}: the lease of {station} was lost"));
            if kept.lease_id == lease_id {
                assert!(
                    kept.expires_at_ms >= expires_at_ms,
                    "seed {seed}: shortened"
                );
            }
        }
        let snapshot: LedgerSnapshot = committed.snapshot();
        assert_eq!(
            Ledger::restore(committed.config().clone(), snapshot.clone()).snapshot(),
            snapshot
        );
    }
}

#[test]
fn a_checkout_never_acknowledged_does_not_come_back_to_life_at_the_merge() {
    let mut committed = pair(4);
    assert!(ask(&mut committed, BASE_MS, 0));
    // The primary appended a checkout the backup never received, so it was never committed
    // nor acknowledged; then the hosts lost each other. The primary's copy applies its whole
    // log, the backup's what it has.
    let tail = at(BASE_MS + 5, checkout("zombie", "ws-z", "cad"));
    let mut primary = committed.clone();
    primary.apply(&tail);
    assert_eq!(primary.lease_share("zombie"), Share::Backup);
    primary.set_alone(Some(Share::Primary));
    let mut backup = committed.clone();
    backup.set_alone(Some(Share::Backup));
    assert!(ask(&mut primary, BASE_MS + 10, 1));
    assert!(!ask(&mut primary, BASE_MS + 10, 2), "its share is full");
    assert!(ask(&mut backup, BASE_MS + 10, 3));
    assert!(ask(&mut backup, BASE_MS + 10, 4));
    // Back together, the log's tail commits first, then the merge: the backup, authority over
    // its share, does not hold the zombie, so it ends and every acknowledged lease stays.
    committed.apply(&tail);
    let outcome = merge(&mut committed, BASE_MS + 20, &[&primary, &backup]);
    assert!(
        matches!(
            outcome,
            Outcome::AloneMerged {
                leases_dropped: 0,
                ..
            }
        ),
        "{outcome:?}"
    );
    let mut stations: Vec<String> = committed.leases().into_iter().map(|l| l.station).collect();
    stations.sort();
    assert_eq!(stations, ["ws0", "ws1", "ws3", "ws4"]);
}

#[test]
fn a_host_that_never_served_alone_keeps_its_share_as_the_log_has_it() {
    let mut committed = pair_with(4, 4);
    // The backup was down: only the primary served alone, and one of its stations left.
    let mut primary = committed.clone();
    primary.set_alone(Some(Share::Primary));
    let own = lease_of(&primary, Share::Primary);
    primary.apply(&at(BASE_MS + 10, Command::Checkin { lease_id: own }));
    merge(&mut committed, BASE_MS + 20, &[&primary]);
    assert_eq!(committed.lease_count(), 3);
    assert_eq!(shares(&committed).1 + shares(&committed).0, 3);
    // A state per share at most.
    let twice = committed.apply(&at(
        BASE_MS + 30,
        Command::MergeAlone {
            states: vec![
                primary.alone_state().unwrap(),
                primary.alone_state().unwrap(),
            ],
        },
    ));
    assert_eq!(refusal(twice).code(), "invalid_request");
}

#[test]
fn the_ledger_remembers_which_alone_epoch_of_each_share_it_merged() {
    let committed = pair_with(10, 2);
    let (_, mut backup) = split(&committed);
    assert!(ask(&mut backup, BASE_MS + 10, 50));
    let mut state = backup.alone_state().unwrap();
    state.epoch = 7;
    let mut merged = committed.clone();
    assert_eq!(merged.merged_epoch(Share::Backup), 0);
    let outcome = merged.apply(&at(
        BASE_MS + 20,
        Command::MergeAlone {
            states: vec![state.clone()],
        },
    ));
    assert!(
        matches!(outcome, Outcome::AloneMerged { .. }),
        "{outcome:?}"
    );
    assert_eq!(merged.merged_epoch(Share::Backup), 7);
    assert_eq!(merged.merged_epoch(Share::Primary), 0);
    // An older state merged later does not lower it; snapshots keep it.
    state.epoch = 3;
    merged.apply(&at(
        BASE_MS + 30,
        Command::MergeAlone {
            states: vec![state],
        },
    ));
    assert_eq!(merged.merged_epoch(Share::Backup), 7);
    let restored = Ledger::restore_json(merged.config().clone(), &merged.snapshot_json()).unwrap();
    assert_eq!(restored.merged_epoch(Share::Backup), 7);
    let restored = Ledger::restore(merged.config().clone(), merged.snapshot());
    assert_eq!(restored.merged_epoch(Share::Backup), 7);
}
