use tessera_core::{
    Command, Ledger, LedgerConfig, LicenseKey, LicenseKeyPayload, Outcome, SecretKey, Stamped,
};

use super::*;

const BASE_MS: i64 = 1_800_000_000_000;
const HOUR_MS: i64 = 3_600_000;
const SKEW_MS: i64 = 30_000;

const TIMING: LinkTiming = LinkTiming {
    sync_period_ms: 10 * 60_000,
    preliminary_renewal_ms: 20 * 60_000,
    retry_ms: 10_000,
    skew_ms: SKEW_MS,
};

fn vendor() -> SecretKey {
    SecretKey::from_seed([9; 32])
}

struct Server {
    id: &'static str,
    secret: SecretKey,
    ledger: Ledger,
}

impl Server {
    fn new(id: &'static str, seed: u8) -> Server {
        let secret = SecretKey::from_seed([seed; 32]);
        let ledger = Ledger::new(LedgerConfig {
            trusted_vendors: vec![vendor().public_key()],
            server_id: Some(id.into()),
            server_public_key: Some(secret.public_key()),
            clock_skew_max_ms: SKEW_MS,
        });
        Server { id, secret, ledger }
    }

    fn apply(&mut self, at_ms: i64, command: Command) -> Outcome {
        self.ledger.apply(&Stamped { at_ms, command })
    }
}

/// A parent holding a 10-license key that donates 4 for an hour's renewal period to a
/// child, which accepted the grant.
fn donated() -> (Server, Server) {
    let mut parent = Server::new("parent", 11);
    let mut child = Server::new("child", 12);
    let key = LicenseKey::sign(
        LicenseKeyPayload {
            key_id: "k1".into(),
            customer: "acme".into(),
            components: vec!["cad".into()],
            licenses: 10,
            valid_from: jiff::Timestamp::from_millisecond(BASE_MS - 1000).unwrap(),
            valid_until: jiff::Timestamp::from_millisecond(BASE_MS + 1000 * HOUR_MS).unwrap(),
            server_id: None,
            renews: None,
            certified_server_required: false,
            max_borrow_days: 0,
            grace_minutes: 0,
            issued_at: jiff::Timestamp::from_millisecond(BASE_MS - 1000).unwrap(),
        },
        &vendor(),
    )
    .unwrap();
    parent.apply(BASE_MS, Command::ImportKey { key });
    let outcome = parent.apply(
        BASE_MS,
        Command::Donate {
            key_id: "k1".into(),
            to: "child".into(),
            receiver_public_key: child.secret.public_key().to_base64(),
            licenses: 4,
            until_ms: BASE_MS + 100 * HOUR_MS,
            renewal_period_ms: HOUR_MS,
        },
    );
    assert!(matches!(outcome, Outcome::Donated { .. }), "{outcome:?}");
    let (grants, returned_request) = grants_for(&parent.ledger, "child", BASE_MS, &parent.secret);
    assert_eq!((grants.len(), returned_request), (1, false));
    assert_eq!(kept(&grants), BTreeSet::from(["k1".to_string()]));
    for grant in grants {
        let outcome = child.apply(
            BASE_MS + 10,
            Command::AcceptGrant {
                grant: Box::new(grant),
            },
        );
        assert!(
            matches!(outcome, Outcome::GrantAccepted { .. }),
            "{outcome:?}"
        );
    }
    (parent, child)
}

#[test]
fn a_receiver_holds_what_the_donor_counts_and_the_records_agree() {
    let (parent, child) = donated();
    let held = held_from(&child.ledger, parent.id, BASE_MS + 20);
    assert_eq!(
        held,
        vec![Held {
            key_id: "k1".into(),
            serial: BASE_MS.cast_unsigned(),
            licenses: 4,
            in_use: 0
        }]
    );
    let mut memory = LinkMemory::default();
    assert!(
        memory
            .compare_records(&parent.ledger, child.id, &held, BASE_MS + 20, &TIMING)
            .is_empty()
    );
    memory.acknowledge(&parent.ledger, child.id, &held);
    assert_eq!(
        memory.acknowledged.get("k1"),
        Some(&BASE_MS.cast_unsigned())
    );
    // A receiver that held the grant and now says it holds nothing lost it.
    let lost = memory.compare_records(&parent.ledger, child.id, &[], BASE_MS + 30, &TIMING);
    assert_eq!(lost.len(), 1, "{lost:?}");
    // More licenses than counted, or a serial never issued, is a mismatch too.
    // (Serials are the donor's clock in ms.)
    let issued = BASE_MS.cast_unsigned();
    for (serial, licenses) in [(issued, 5), (issued + 7, 4)] {
        let claimed = [Held {
            serial,
            licenses,
            ..held[0].clone()
        }];
        let found =
            memory.compare_records(&parent.ledger, child.id, &claimed, BASE_MS + 30, &TIMING);
        assert!(
            found[0].contains(&format!("reports {licenses} licenses")),
            "{found:?}"
        );
    }
}

#[test]
fn a_grant_given_back_is_reported_once_its_stations_stopped_and_taken_back_by_the_donor() {
    let (mut parent, mut child) = donated();
    // The donation ends; the donor asks for the grant back with its next push.
    parent.apply(
        BASE_MS + 100,
        Command::EndDonation {
            key_id: "k1".into(),
            to: "child".into(),
        },
    );
    let (grants, returned_request) =
        grants_for(&parent.ledger, "child", BASE_MS + 100, &parent.secret);
    assert!(grants.is_empty() && returned_request);
    let release = to_release(&child.ledger, parent.id, &kept(&grants));
    assert_eq!(release, vec![("k1@parent".to_string(), Vec::new())]);
    let outcome = child.apply(
        BASE_MS + 200,
        Command::ReleaseGrant {
            key_id: "k1@parent".into(),
        },
    );
    let Outcome::GrantReleased { serial, .. } = outcome else {
        panic!("{outcome:?}")
    };
    let mut memory = LinkMemory {
        last_renew_ms: Some(BASE_MS),
        ..LinkMemory::default()
    };
    let stations_stop = BASE_MS + 5_000;
    memory.on_released("k1", serial, stations_stop);
    // A release at a lower serial still pending keeps the later stop: its stations count.
    let mut other = memory.clone();
    other.on_released("k1", serial - 1, stations_stop + 1_000);
    assert_eq!(
        other.returned_pending["k1"],
        (serial, stations_stop + 1_000)
    );
    // Not before its stations stopped.
    assert!(
        memory
            .returned_to(&child.ledger, parent.id, BASE_MS + 300)
            .is_empty()
    );
    assert!(!memory.renewal_due(BASE_MS + 300, &TIMING, Connection::Permanent, []));
    let returned = memory.returned_to(&child.ledger, parent.id, stations_stop);
    assert_eq!(
        returned,
        vec![Returned {
            key_id: "k1".into(),
            serial
        }]
    );
    assert!(memory.renewal_due(stations_stop, &TIMING, Connection::Permanent, []));
    // The donor takes back only what it issued.
    let commands = take_back(&parent.ledger, child.id, &returned);
    assert_eq!(commands.len(), 1);
    let forged = [Returned {
        key_id: "k1".into(),
        serial: BASE_MS.cast_unsigned() + 9,
    }];
    assert!(take_back(&parent.ledger, child.id, &forged).is_empty());
    for command in commands {
        let outcome = parent.apply(stations_stop, command);
        assert!(
            matches!(
                outcome,
                Outcome::GrantReturned {
                    licenses_back: 4,
                    ..
                }
            ),
            "{outcome:?}"
        );
    }
    // The donor's answer confirms it: no longer pending.
    memory.on_renewed(stations_stop, &returned, false);
    assert!(memory.returned_pending.is_empty());
}

#[test]
fn renewals_are_due_at_half_a_grant_a_sync_period_or_a_report_and_periodic_links_reconnect() {
    let (parent, child) = donated();
    let mut memory = LinkMemory::default();
    // Never asked by this host: now.
    assert!(memory.renewal_due(BASE_MS, &TIMING, Connection::Permanent, []));
    memory.last_renew_ms = Some(BASE_MS + 10);
    let points = grant_points(&child.ledger, parent.id);
    assert_eq!(points.len(), 1);
    let (issued, until, _) = points[0];
    let half = until - (until - issued) / 2;
    let permanent = |memory: &LinkMemory, now| {
        memory.renewal_due(now, &TIMING, Connection::Permanent, points.clone())
    };
    assert!(!permanent(&memory, BASE_MS + 60_000));
    assert!(permanent(&memory, BASE_MS + 10 + TIMING.sync_period_ms));
    memory.last_renew_ms = Some(half - 60_000);
    assert!(!permanent(&memory, half - 1_000));
    assert!(permanent(&memory, half + 1_000));
    // A usage report once the donor said its period.
    memory.last_renew_ms = Some(BASE_MS + 10);
    memory.report_period_ms = Some(5 * 60_000);
    memory.last_report_ms = Some(BASE_MS);
    assert!(!permanent(&memory, BASE_MS + 60_000));
    assert!(permanent(&memory, BASE_MS + 5 * 60_000));
    // Periodic: every reconnect period, or when a grant is about to lapse.
    let periodic = Connection::Periodic {
        reconnect_ms: 30 * 60_000,
    };
    assert!(!memory.renewal_due(BASE_MS + 20 * 60_000, &TIMING, periodic, points.clone()));
    assert!(memory.renewal_due(BASE_MS + 10 + 30 * 60_000, &TIMING, periodic, []));
    let (_, _, usable) = points[0];
    memory.last_renew_ms = Some(usable - 25 * 60_000);
    assert!(memory.renewal_due(usable - 19 * 60_000, &TIMING, periodic, points.clone()));
}

#[test]
fn pushes_follow_the_sync_period_and_a_failure_rests_the_link() {
    let mut memory = LinkMemory::default();
    assert!(memory.push_due(BASE_MS, &TIMING, Connection::Permanent));
    memory.last_push_ms = Some(BASE_MS);
    assert!(!memory.push_due(
        BASE_MS + TIMING.sync_period_ms - 1,
        &TIMING,
        Connection::Permanent
    ));
    assert!(memory.push_due(
        BASE_MS + TIMING.sync_period_ms,
        &TIMING,
        Connection::Permanent
    ));
    let periodic = Connection::Periodic {
        reconnect_ms: 3 * TIMING.sync_period_ms,
    };
    assert!(!memory.push_due(BASE_MS + TIMING.sync_period_ms, &TIMING, periodic));
    memory.last_failure_ms = Some(BASE_MS);
    assert!(memory.resting(BASE_MS + TIMING.retry_ms - 1, &TIMING));
    assert!(!memory.resting(BASE_MS + TIMING.retry_ms, &TIMING));
}

#[test]
fn a_tick_calls_for_each_role_what_is_due_and_nothing_while_a_failure_rests() {
    let both = Roles {
        send: true,
        receive: true,
    };
    let fresh = LinkMemory::default();
    assert_eq!(
        fresh.on_tick(BASE_MS, &TIMING, Connection::Permanent, both, []),
        [LinkAction::Push, LinkAction::RequestRenewal],
        "a link never used: push and ask at once"
    );
    let receive_only = Roles {
        send: false,
        receive: true,
    };
    assert_eq!(
        fresh.on_tick(BASE_MS, &TIMING, Connection::Permanent, receive_only, []),
        [LinkAction::RequestRenewal]
    );
    let done = LinkMemory {
        last_push_ms: Some(BASE_MS),
        last_renew_ms: Some(BASE_MS),
        ..LinkMemory::default()
    };
    let later = BASE_MS + TIMING.sync_period_ms - 1;
    assert!(
        done.on_tick(later, &TIMING, Connection::Permanent, both, [])
            .is_empty()
    );
    let failed = LinkMemory {
        last_failure_ms: Some(BASE_MS),
        ..LinkMemory::default()
    };
    assert!(
        failed
            .on_tick(
                BASE_MS + TIMING.retry_ms - 1,
                &TIMING,
                Connection::Permanent,
                both,
                []
            )
            .is_empty(),
        "a failure rests the link for its retry time"
    );
    assert_eq!(
        failed
            .on_tick(
                BASE_MS + TIMING.retry_ms,
                &TIMING,
                Connection::Permanent,
                both,
                []
            )
            .len(),
        2
    );
}
