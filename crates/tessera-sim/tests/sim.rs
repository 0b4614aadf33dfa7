//! The network simulation on a fixed set of seeds (CI), proof that its checks catch broken
//! rules, determinism, and minimal reproductions, with two ledgers each, of the issues the
//! simulation found in the ledger's rules (now fixed: they guard against their return).
//!
//! More seeds: `TESSERA_SIM_SEEDS=1..40 cargo test -p tessera-sim --release`.

use jiff::Timestamp;
use tessera_core::{
    Command, Grant, Ledger, LedgerConfig, LicenseKey, LicenseKeyPayload, Outcome, Refusal,
    SecretKey, Stamped,
};
use tessera_sim::pair::{self, PairBroken, PairConfig};
use tessera_sim::{BrokenRule, HeldRule, SimConfig, SimReport, Violation, simulate, try_simulate};

fn seeds(default: std::ops::RangeInclusive<u64>) -> Vec<u64> {
    match std::env::var("TESSERA_SIM_SEEDS") {
        Ok(range) => {
            let (a, b) = range
                .split_once("..")
                .expect("TESSERA_SIM_SEEDS=A..B (B excluded)");
            (a.parse().expect("A")..b.parse().expect("B")).collect()
        }
        Err(_) => default.collect(),
    }
}

/// Runs the configurations on two threads (the runs are independent and each is
/// deterministic), in seed order.
fn run_all(configs: Vec<SimConfig>) -> Vec<Result<SimReport, Violation>> {
    let threads = 2;
    let mut results: Vec<Option<Result<SimReport, Violation>>> = vec![None; configs.len()];
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let mine: Vec<(usize, SimConfig)> = configs
                    .iter()
                    .cloned()
                    .enumerate()
                    .filter(|(n, _)| n % threads == t)
                    .collect();
                scope.spawn(move || {
                    mine.into_iter()
                        .map(|(n, config)| (n, try_simulate(config)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for handle in handles {
            for (n, result) in handle.join().expect("a simulation thread") {
                results[n] = Some(result);
            }
        }
    });
    results.into_iter().map(|r| r.expect("every run")).collect()
}

/// Fails with every failed seed, each with its reproduction line.
fn all_pass(results: &[Result<SimReport, Violation>]) -> Vec<SimReport> {
    let failures: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(|v| v.to_string()))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    results.iter().filter_map(|r| r.clone().ok()).collect()
}

/// The CI network: 100 servers, 90 days, every fault, eight seeds. The stations' view of
/// leases (a lease counts until its station hears it ended), with the no-double-count check.
#[test]
fn a_hundred_servers_never_over_issue_and_converge_after_healing() {
    let configs = seeds(1..=8).into_iter().map(SimConfig::ci).collect();
    for report in all_pass(&run_all(configs)) {
        println!("{}", report.summary());
        let seed = report.seed;
        assert!(
            report.donations > 100 && report.grants_accepted > 1000,
            "seed {seed}: {report:?}"
        );
        assert!(
            report.partitions > 50 && report.crashes > 50 && report.replays > 50,
            "seed {seed}: the faults happened: {report:?}"
        );
        assert!(
            report.releases > 0 && report.licenses_returned > 0 && report.leases_revoked > 0,
            "seed {seed}: donations ended and came back: {report:?}"
        );
        let periods = report.convergence_sync_periods.unwrap_or_else(|| {
            panic!(
                "seed {seed} did not converge after the faults stopped: {:?}",
                report.disagreement
            )
        });
        assert!(
            periods <= 2,
            "seed {seed}: {periods} sync periods to converge"
        );
    }
}

/// A small network where demand exceeds supply: every license is used, never more.
#[test]
fn a_saturated_network_uses_every_license_and_never_more() {
    let mut configs: Vec<SimConfig> = seeds(1..=12)
        .into_iter()
        .map(SimConfig::contended)
        .collect();
    // The ledgers' view, weaker, on a few: it must hold as well.
    configs.extend(seeds(1..=2).into_iter().map(|seed| SimConfig {
        held_rule: HeldRule::Ledger,
        ..SimConfig::contended(seed)
    }));
    let reports = all_pass(&run_all(configs));
    for report in &reports {
        println!("{}", report.summary());
        assert!(
            report.convergence_sync_periods.is_some(),
            "seed {}: {:?}",
            report.seed,
            report.disagreement
        );
    }
    let saturated = reports
        .iter()
        .filter(|r| r.peak_held["K-CAD"] == (20, 20))
        .count();
    assert!(
        saturated * 2 >= reports.len(),
        "demand reaches the key's licenses in most seeds: {saturated} of {}",
        reports.len()
    );
}

/// Each deliberately broken rule is caught by the no-double-count check at once; the timing
/// rules also by the safety property alone (leases held ≤ licenses) for some seed. (Reporting
/// a released grant returned at once needs demand at the wrong moment to show as an excess;
/// the double count shows it every time.)
#[test]
fn broken_rules_are_caught() {
    for rule in [
        BrokenRule::NoSkewMargin,
        BrokenRule::SignBeforeCommit,
        BrokenRule::ReturnAtOnce,
    ] {
        // Returning at once needs a released grant while its stations still run, which
        // seeds 1 and 2 do not have (since the simulated primary runs the server's expiry
        // schedule, time beacon included, seeds 3, 4, 6, 8, 11 and 12 of 2 to 12 have one).
        let seed = if rule == BrokenRule::ReturnAtOnce {
            3
        } else {
            1
        };
        let double_count = try_simulate(SimConfig {
            broken: Some(rule),
            ..SimConfig::contended(seed)
        })
        .expect_err("the no-double-count check catches it on the first seed with a release");
        assert!(
            double_count.to_string().contains("DOUBLE COUNT"),
            "{double_count}"
        );
        if rule == BrokenRule::ReturnAtOnce {
            continue;
        }
        let configs = (1..=8)
            .map(|seed| SimConfig {
                check_double_count: false,
                broken: Some(rule),
                ..SimConfig::contended(seed)
            })
            .collect();
        let caught: Vec<Violation> = run_all(configs)
            .into_iter()
            .filter_map(Result::err)
            .collect();
        let first = caught
            .first()
            .unwrap_or_else(|| panic!("{rule:?} went unnoticed by the safety check"));
        let text = first.to_string();
        assert!(
            text.contains("SAFETY") && text.contains("leases held by stations"),
            "{text}"
        );
        assert!(
            text.contains(&format!("--broken {}", rule.flag()))
                && text.contains(&format!("--seed {}", first.seed)),
            "a failure names its seed and the command replaying it: {text}"
        );
    }
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let small = |seed| SimConfig {
        servers: 30,
        days: 12,
        fault_days: 9,
        ..SimConfig::ci(seed)
    };
    let a = try_simulate(small(5));
    let b = try_simulate(small(5));
    let c = try_simulate(small(6));
    let show = |r: &Result<SimReport, Violation>| match r {
        Ok(report) => format!("{report:?}"),
        Err(violation) => violation.to_string(),
    };
    assert_eq!(show(&a), show(&b));
    assert_ne!(show(&a), show(&c));
}

#[test]
#[should_panic(expected = "reproduce: cargo run -p tessera-sim --release -- --seed 1")]
fn simulate_panics_with_the_seed_and_the_command_line() {
    simulate(SimConfig {
        broken: Some(BrokenRule::SignBeforeCommit),
        ..SimConfig::contended(1)
    });
}

// ---- minimal reproductions with two ledgers, no simulation ----

const T0: i64 = 1_800_000_000_000;
const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;
const SKEW: i64 = 30 * MINUTE;
const TTL: i64 = 2 * HOUR;

fn vendor() -> SecretKey {
    SecretKey::from_seed([0x5E; 32])
}

struct Node {
    id: &'static str,
    secret: SecretKey,
    ledger: Ledger,
}

impl Node {
    fn new(id: &'static str, seed: u8) -> Node {
        let secret = SecretKey::from_seed([seed; 32]);
        let ledger = Ledger::new(LedgerConfig {
            trusted_vendors: vec![vendor().public_key()],
            server_id: Some(id.into()),
            server_public_key: Some(secret.public_key()),
            clock_skew_max_ms: SKEW,
        });
        Node { id, secret, ledger }
    }

    fn at(&mut self, at_ms: i64, command: Command) -> Outcome {
        self.ledger.apply(&Stamped { at_ms, command })
    }

    fn grant_for(&self, key_id: &str, to: &str) -> Grant {
        let (source, payload) = self.ledger.grant_to_sign(key_id, to).expect("a grant");
        Grant::issue(source, payload, &self.secret)
    }

    fn checkout(&mut self, at_ms: i64, lease_id: &str) -> Outcome {
        self.at(
            at_ms,
            Command::Checkout {
                lease_id: lease_id.into(),
                component: "cad".into(),
                station: format!("{lease_id}-station"),
                user: "u".into(),
                host: "h".into(),
                lease_ttl_ms: TTL,
                borrow_ms: 0,
            },
        )
    }
}

fn donor_and_receiver(licenses: u32) -> (Node, Node) {
    let mut donor = Node::new("donor", 1);
    let receiver = Node::new("receiver", 2);
    let key = LicenseKey::sign(
        LicenseKeyPayload {
            key_id: "K".into(),
            customer: "c".into(),
            components: vec!["cad".into()],
            licenses,
            valid_from: Timestamp::from_millisecond(T0 - HOUR).unwrap(),
            valid_until: Timestamp::from_millisecond(T0 + 90 * 24 * HOUR).unwrap(),
            server_id: None,
            renews: None,
            certified_server_required: false,
            max_borrow_days: 0,
            grace_minutes: 0,
            issued_at: Timestamp::from_millisecond(T0 - HOUR).unwrap(),
        },
        &vendor(),
    )
    .unwrap();
    assert!(matches!(
        donor.at(T0 - HOUR, Command::ImportKey { key }),
        Outcome::KeyImported { .. }
    ));
    (donor, receiver)
}

fn donate(donor: &mut Node, receiver: &Node, at_ms: i64, licenses: u32) {
    let outcome = donor.at(
        at_ms,
        Command::Donate {
            key_id: "K".into(),
            to: receiver.id.into(),
            receiver_public_key: receiver.secret.public_key().to_base64(),
            licenses,
            until_ms: T0 + 30 * 24 * HOUR,
            renewal_period_ms: 48 * HOUR,
        },
    );
    assert!(matches!(outcome, Outcome::Donated { .. }), "{outcome:?}");
}

fn accept(receiver: &mut Node, at_ms: i64, grant: Grant) {
    let outcome = receiver.at(
        at_ms,
        Command::AcceptGrant {
            grant: Box::new(grant),
        },
    );
    assert!(
        matches!(outcome, Outcome::GrantAccepted { .. }),
        "{outcome:?}"
    );
}

fn told_expiry(outcome: Outcome) -> i64 {
    match outcome {
        Outcome::LeaseGranted { lease, .. } | Outcome::LeaseRenewed { lease } => {
            lease.expires_at_ms
        }
        other => panic!("no lease: {other:?}"),
    }
}

/// Seeds 54, 69, 98 of `--contended` ran into this: `ReleaseGrant` ends the receiver's leases
/// in its ledger at once, but its station, told at its checkout that its lease runs for two
/// hours, keeps working until its next heartbeat. So the release says until when its
/// stations may still run, and the receiver reports the grant returned only after that
/// (the server and the simulation do; `--broken return-at-once` shows the difference).
#[test]
fn a_released_grant_is_not_reused_while_its_stations_still_run() {
    let (mut donor, mut receiver) = donor_and_receiver(1);
    donate(&mut donor, &receiver, T0, 1);
    accept(&mut receiver, T0 + MINUTE, donor.grant_for("K", "receiver"));
    let told = told_expiry(receiver.checkout(T0 + 2 * MINUTE, "r1"));
    // The donor's administrator ends the donation; the push asks for it back.
    assert!(matches!(
        donor.at(
            T0 + 10 * MINUTE,
            Command::EndDonation {
                key_id: "K".into(),
                to: "receiver".into()
            }
        ),
        Outcome::DonationEnded { .. }
    ));
    let (serial, stations_until_ms) = match receiver.at(
        T0 + 11 * MINUTE,
        Command::ReleaseGrant {
            key_id: "K@donor".into(),
        },
    ) {
        Outcome::GrantReleased {
            serial,
            leases_ended,
            stations_until_ms,
            ..
        } => {
            assert_eq!(leases_ended, 1);
            (serial, stations_until_ms)
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(stations_until_ms, told);
    // Until then the donor still counts the license (the grant's lease runs longer).
    let outcome = donor.checkout(told - MINUTE, "d1");
    assert!(
        matches!(
            outcome,
            Outcome::Refused {
                refusal: Refusal::NoLicensesAvailable { .. }
            }
        ),
        "{outcome:?}"
    );
    // Reported after it, the return frees the license at once.
    let back = donor.at(
        told + MINUTE,
        Command::GrantReturned {
            key_id: "K".into(),
            to: "receiver".into(),
            serial,
        },
    );
    assert!(matches!(
        back,
        Outcome::GrantReturned {
            licenses_back: 1,
            ..
        }
    ));
    told_expiry(donor.checkout(told + MINUTE, "d1"));
}

/// Seed 149 of `--contended --held ledger` ran into this: a donor lowers a donation; the
/// receiver may still use the earlier, larger grant until it lapses, and leases it granted
/// meanwhile used to be capped at the end of the current, smaller grant, not of the larger
/// one they rest on. Now a lease runs past the larger grant's end only if it fits in what is
/// left after it.
#[test]
fn leases_resting_on_a_lapsed_larger_grant_do_not_outlive_it() {
    let (mut donor, mut receiver) = donor_and_receiver(2);
    donate(&mut donor, &receiver, T0, 2);
    let end = T0 + 48 * HOUR; // the larger grant's lease end
    accept(&mut receiver, T0 + MINUTE, donor.grant_for("K", "receiver"));
    // Lowered to one license, then renewed as usual: the current grant runs to T0 + 72 h.
    donate(&mut donor, &receiver, T0 + HOUR, 1);
    accept(
        &mut receiver,
        T0 + HOUR + MINUTE,
        donor.grant_for("K", "receiver"),
    );
    assert!(matches!(
        donor.at(
            T0 + 24 * HOUR,
            Command::RenewDonations {
                to: "receiver".into()
            }
        ),
        Outcome::DonationsRenewed { .. }
    ));
    accept(
        &mut receiver,
        T0 + 24 * HOUR + MINUTE,
        donor.grant_for("K", "receiver"),
    );
    // Two stations take leases shortly before the larger grant lapses: one fits in the
    // current grant and runs its full time, the other ends with the larger grant.
    let told: Vec<i64> = ["r1", "r2"]
        .into_iter()
        .map(|lease| told_expiry(receiver.checkout(end - SKEW - 10 * MINUTE, lease)))
        .collect();
    assert_eq!(told, vec![end - SKEW - 10 * MINUTE + TTL, end - SKEW]);
    // The receiver crashes now and applies nothing until after the donor's lapse; the donor
    // counts the larger grant until `end + skew`, then one license: one lease each.
    let now = end + SKEW + MINUTE;
    let live = receiver
        .ledger
        .leases()
        .iter()
        .filter(|lease| lease.expires_at_ms > now)
        .count();
    assert_eq!(live, 1);
    told_expiry(donor.checkout(now, "d1"));
    let outcome = donor.checkout(now, "d2");
    assert!(
        matches!(
            outcome,
            Outcome::Refused {
                refusal: Refusal::NoLicensesAvailable { .. }
            }
        ),
        "{outcome:?}"
    );
}

/// Seed 21 of `--contended --return after-leases-run-out` ran into this: when a lowered
/// donation's larger grant lapsed at the receiver (`end − skew`, its clock), its ledger ended
/// the newest lease at once although that station was told its lease runs longer, and the
/// donor took the license back at `end + skew` (its clock) — with the receiver's clock 24
/// minutes behind, 36 minutes later, before the station's next heartbeat. Now no lease is
/// ended: the one that does not fit after the larger grant was told it ends with it.
#[test]
fn licenses_of_a_lapsed_larger_grant_are_not_reused_while_its_stations_still_run() {
    let behind = 24 * MINUTE; // receiver clock = donor clock − 24 min
    let (mut donor, mut receiver) = donor_and_receiver(2);
    donate(&mut donor, &receiver, T0, 2);
    let end = T0 + 48 * HOUR; // the first grant's lease end
    accept(
        &mut receiver,
        T0 - behind + MINUTE,
        donor.grant_for("K", "receiver"),
    );
    // The donor lowers the donation to one license: a new, smaller grant.
    donate(&mut donor, &receiver, T0 + HOUR, 1);
    accept(
        &mut receiver,
        T0 + HOUR - behind + MINUTE,
        donor.grant_for("K", "receiver"),
    );
    // Two stations take their leases just before the larger grant lapses at the receiver.
    let last_heartbeat = end - SKEW - MINUTE;
    let told: Vec<i64> = ["r1", "r2"]
        .into_iter()
        .map(|lease| told_expiry(receiver.checkout(last_heartbeat, lease)))
        .collect();
    assert_eq!(told[1], end - SKEW, "told it ends with the larger grant");
    receiver.at(end - SKEW + MINUTE, Command::Expire);
    assert_eq!(receiver.ledger.lease_count(), 1);
    // When the donor's ledger stops counting the larger grant (`end + skew`, its clock), the
    // receiver's clock reads `end + skew − 24 min`: past what station r2 was told.
    let donor_now = end + SKEW + MINUTE;
    let receiver_now = donor_now - behind;
    assert!(told[1] < receiver_now && told[0] > receiver_now);
    told_expiry(donor.checkout(donor_now, "d1"));
    assert!(matches!(
        donor.checkout(donor_now, "d2"),
        Outcome::Refused {
            refusal: Refusal::NoLicensesAvailable { .. }
        }
    ));
}

/// Seed 148 of `--contended --held ledger` never converged because of this (no safety issue,
/// the licenses were lost to both sides): a server holding one vendor key from two donors
/// donates to the same neighbour first from one pool, later from the other. The donor numbers
/// grant serials per source pool (`K@A` and `K@B` to `R`), the receiver checks replays per
/// `K@DONOR`: the second source's serials started again at 1, below what the receiver
/// accepted, and every grant of the new donation was refused as a replay. Serials are now
/// numbered per (vendor key, receiver).
#[test]
fn a_second_source_of_the_same_key_is_not_refused_as_a_replay() {
    let (mut a, _) = donor_and_receiver(10);
    let mut b = Node::new("b", 3);
    let mut d = Node::new("d", 4);
    let r = Node::new("r", 5);
    let donate_pool = |from: &mut Node, pool: &str, to: &Node, at_ms: i64, licenses: u32| {
        let outcome = from.at(
            at_ms,
            Command::Donate {
                key_id: pool.into(),
                to: to.id.into(),
                receiver_public_key: to.secret.public_key().to_base64(),
                licenses,
                until_ms: T0 + 20 * 24 * HOUR,
                renewal_period_ms: 48 * HOUR,
            },
        );
        assert!(matches!(outcome, Outcome::Donated { .. }), "{outcome:?}");
    };
    // `a` holds the key and donates to `b` and `d`; `b` re-donates to `d`: `d` holds the
    // key from two donors, as pools K@donor and K@b.
    donate_pool(&mut a, "K", &b, T0, 4);
    donate_pool(&mut a, "K", &d, T0, 4);
    accept(&mut b, T0 + MINUTE, a.grant_for("K", "b"));
    accept(&mut d, T0 + MINUTE, a.grant_for("K", "d"));
    donate_pool(&mut b, "K@donor", &d, T0 + 2 * MINUTE, 2);
    accept(&mut d, T0 + 3 * MINUTE, b.grant_for("K@donor", "d"));
    // `d` donates to `r` from K@donor, renews it twice (serials 1 to 3), then ends it; `r`
    // gives it back and `d` takes it back: the donation is gone.
    let mut r = r;
    donate_pool(&mut d, "K@donor", &r, T0 + 4 * MINUTE, 1);
    accept(&mut r, T0 + 5 * MINUTE, d.grant_for("K@donor", "r"));
    for n in 1..=2 {
        d.at(T0 + n * HOUR, Command::RenewDonations { to: "r".into() });
        accept(&mut r, T0 + n * HOUR + MINUTE, d.grant_for("K@donor", "r"));
    }
    d.at(
        T0 + 3 * HOUR,
        Command::EndDonation {
            key_id: "K@donor".into(),
            to: "r".into(),
        },
    );
    let serial = match r.at(
        T0 + 3 * HOUR + MINUTE,
        Command::ReleaseGrant {
            key_id: "K@d".into(),
        },
    ) {
        Outcome::GrantReleased { serial, .. } => serial,
        other => panic!("{other:?}"),
    };
    d.at(
        T0 + 3 * HOUR + 2 * MINUTE,
        Command::GrantReturned {
            key_id: "K@donor".into(),
            to: "r".into(),
            serial,
        },
    );
    assert!(d.ledger.donation("K@donor", "r").is_none());
    // Later `d` donates to `r` again, now from its other pool of the same key.
    donate_pool(&mut d, "K@b", &r, T0 + 4 * HOUR, 1);
    let grant = d.grant_for("K@b", "r");
    let outcome = r.at(
        T0 + 4 * HOUR + MINUTE,
        Command::AcceptGrant {
            grant: Box::new(grant),
        },
    );
    assert!(
        matches!(outcome, Outcome::GrantAccepted { .. }),
        "a new donation from another pool of the same key is refused: {outcome:?}"
    );
}

// ---- the redundant pair ----

/// A pair through splits with stations on both sides, kill -9 of either host, lost
/// replication and merges: never more stations holding a license than the key has, and after
/// every merge every lease a station was told it holds is still there.
#[test]
fn a_pair_never_over_issues_nor_loses_an_acknowledged_lease() {
    let mut merges = 0;
    let mut alone = 0;
    for seed in seeds(1..=30) {
        let report = pair::run(PairConfig::ci(seed)).unwrap_or_else(|v| panic!("{v}"));
        merges += report.merges;
        alone += report.served_alone;
        assert_eq!(report.peak_held, 10, "seed {seed}: demand reaches the key");
    }
    assert!(
        merges > 300 && alone > 50_000,
        "{merges} merges, {alone} served alone"
    );
}

/// Each deliberately broken pair rule is caught, with its seed and command line.
#[test]
fn broken_pair_rules_are_caught() {
    for (rule, seed, what) in [
        (PairBroken::FullCapacityAlone, 1, "SAFETY"),
        (PairBroken::MergePrimaryOnly, 1, "lost it"),
        // Rarer: the entry the backup did not know was committed must be a checkout, and
        // the primary must die before the backup learns the commit.
        (PairBroken::IgnoreLogTail, 105, "SAFETY"),
    ] {
        let violation = pair::run(PairConfig {
            broken: Some(rule),
            ..PairConfig::ci(seed)
        })
        .expect_err("caught");
        let text = violation.to_string();
        assert!(text.contains(what), "{rule:?}: {text}");
        assert!(
            text.contains(&format!("--pair --seed {seed} --broken {}", rule.flag())),
            "{text}"
        );
    }
}

/// The domain's real consensus (openraft, SQLite store, ledger, Raft RPCs over HTTP) on
/// turmoil's network: hosts killed and restarted, links cut; no seed may over-issue or lose
/// an acknowledged lease, and every host converges.
#[test]
#[cfg(feature = "domain")]
fn a_domain_on_a_simulated_network_never_over_issues_nor_loses_an_acknowledged_lease() {
    use tessera_sim::domain::{DomainConfig, run};
    for seed in 1..4 {
        let report = run(DomainConfig::ci(seed)).unwrap_or_else(|violation| panic!("{violation}"));
        assert!(report.checkouts > 100 && report.refused > 0, "{report:?}");
    }
    let five = DomainConfig {
        hosts: 5,
        ..DomainConfig::ci(11)
    };
    run(five).unwrap_or_else(|violation| panic!("{violation}"));
}

/// The checks can fail: a restarted primary that takes its leadership back without an
/// election (openraft's leader restore, what Tessera ran before) splits the log once a crash
/// has dropped its unflushed tail: two hosts hold different entries under one log id. The
/// simulated store loses what was appended but not flushed, so the simulation finds it by
/// itself. (openraft's election timeouts are not seeded, so a seed does not always replay the
/// same elections: the test asks for one catch in ten seeds, where about six are caught.)
#[test]
#[cfg(feature = "domain")]
fn the_domain_simulation_catches_a_restored_leader_splitting_the_log() {
    use tessera_sim::domain::{DomainConfig, run};
    let violations: Vec<String> = (1..=10)
        .filter_map(|seed| {
            run(DomainConfig {
                broken_leader_restore: true,
                ..DomainConfig::ci(seed)
            })
            .err()
        })
        .collect();
    assert!(!violations.is_empty(), "no seed of ten caught it");
    assert!(
        violations
            .iter()
            .any(|v| v.contains("different entries under log id")),
        "{violations:?}"
    );
}

/// The checks can fail: a backup that answers checkouts from its own replica is caught.
#[test]
#[cfg(feature = "domain")]
fn the_domain_simulation_catches_a_backup_issuing_from_its_replica() {
    use tessera_sim::domain::{DomainConfig, run};
    let caught = (1..4)
        .filter(|&seed| {
            run(DomainConfig {
                broken_backup_answers: true,
                ..DomainConfig::ci(seed)
            })
            .is_err()
        })
        .count();
    assert_eq!(caught, 3, "caught in {caught} of 3 seeds");
}

// ---- the campaign ----

/// CI's slice of the campaign (`scripts/campaign.sh` runs 10,000 schedules): every class —
/// pairs, contended networks, the CI network, 3- and 5-host domains — with seeds that differ
/// from the other tests', through the same plan and runner as the long one.
#[test]
#[cfg(feature = "domain")]
fn a_slice_of_the_campaign_passes_in_every_class() {
    use tessera_sim::campaign::{Schedule, plan, run};
    let plan = plan(20, 5_000);
    for class in ["pair", "contended network", "network", "domain"] {
        assert!(
            plan.iter().any(|s| s.class() == class),
            "{class} is in the plan"
        );
    }
    assert!(
        plan.iter()
            .any(|s| matches!(s, Schedule::Domain { hosts: 5, .. }))
    );
    let outcome = run(&plan, 2, |_| {});
    assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
    assert_eq!(outcome.schedules(), 20, "{}", outcome.summary());
    // A failure names the command that replays it alone.
    assert_eq!(
        Schedule::Contended(9).replay(),
        "cargo run -p tessera-sim --release -- --contended --seed 9"
    );
}
