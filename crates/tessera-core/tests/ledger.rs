//! Ledger behaviour, and a property test of the ledger against a simple reference model.

use jiff::Timestamp;
use proptest::prelude::*;
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest, prop_state_machine};
use tessera_core::sync::{
    CertificatePayload, ServerCertificate, SyncError, SyncResponse, SyncResponsePayload,
};
use tessera_core::{
    Command, KeyError, Ledger, LedgerConfig, LedgerSnapshot, LicenseKey, LicenseKeyPayload,
    Outcome, Refusal, RenewalResult, SecretKey, Stamped,
};

#[path = "ledger/grants.rs"]
mod grants;
#[path = "ledger/pair.rs"]
mod pair;

const BASE_MS: i64 = 1_800_000_000_000;
const TTL_MS: i64 = 30_000;

fn vendor() -> SecretKey {
    SecretKey::from_seed([9; 32])
}

fn key(key_id: &str, components: &[&str], licenses: u32, until_ms: i64) -> LicenseKey {
    key_for(key_id, components, licenses, until_ms, None)
}

fn key_for(
    key_id: &str,
    components: &[&str],
    licenses: u32,
    until_ms: i64,
    server_id: Option<&str>,
) -> LicenseKey {
    LicenseKey::sign(
        LicenseKeyPayload {
            key_id: key_id.into(),
            customer: "acme".into(),
            components: components.iter().map(|c| c.to_string()).collect(),
            licenses,
            valid_from: Timestamp::from_millisecond(BASE_MS - 1000).unwrap(),
            valid_until: Timestamp::from_millisecond(until_ms).unwrap(),
            server_id: server_id.map(str::to_string),
            renews: None,
            certified_server_required: false,
            max_borrow_days: 0,
            grace_minutes: 0,
            issued_at: Timestamp::from_millisecond(BASE_MS - 1000).unwrap(),
        },
        &vendor(),
    )
    .unwrap()
}

fn ledger() -> Ledger {
    Ledger::new(LedgerConfig {
        trusted_vendors: vec![vendor().public_key()],
        server_id: Some("srv-1".into()),
        server_public_key: Some(server_identity().public_key()),
        clock_skew_max_ms: 0,
    })
}

fn server_identity() -> SecretKey {
    SecretKey::from_seed([5; 32])
}

fn at(at_ms: i64, command: Command) -> Stamped {
    Stamped { at_ms, command }
}

fn checkout(lease_id: &str, station: &str, component: &str) -> Command {
    Command::Checkout {
        lease_id: lease_id.into(),
        component: component.into(),
        station: station.into(),
        user: "ann".into(),
        host: "ws".into(),
        lease_ttl_ms: TTL_MS,
        borrow_ms: 0,
    }
}

fn import(ledger: &mut Ledger, key: LicenseKey) {
    let outcome = ledger.apply(&at(BASE_MS, Command::ImportKey { key }));
    assert!(
        matches!(outcome, Outcome::KeyImported { .. }),
        "{outcome:?}"
    );
}

fn refusal(outcome: Outcome) -> Refusal {
    match outcome {
        Outcome::Refused { refusal } => refusal,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn checkout_when_pool_exhausted_is_refused() {
    let mut ledger = ledger();
    import(&mut ledger, key("k1", &["cad"], 1, BASE_MS + 1_000_000));
    ledger.apply(&at(BASE_MS, checkout("l1", "ws-1", "cad")));
    let refused = refusal(ledger.apply(&at(BASE_MS, checkout("l2", "ws-2", "cad"))));
    assert_eq!(refused.code(), "no_licenses_available");
    assert_eq!(ledger.lease_count(), 1);
}

#[test]
fn the_same_station_asking_again_gets_its_lease_back() {
    let mut ledger = ledger();
    import(
        &mut ledger,
        key("k1", &["cad", "cam"], 1, BASE_MS + 1_000_000),
    );
    let first = ledger.apply(&at(BASE_MS, checkout("l1", "ws-1", "cad")));
    let again = ledger.apply(&at(BASE_MS + 5, checkout("l2", "ws-1", "cam")));
    match (first, again) {
        (
            Outcome::LeaseGranted {
                lease: a,
                created: true,
            },
            Outcome::LeaseGranted {
                lease: b,
                created: false,
            },
        ) => {
            assert_eq!(a.lease_id, b.lease_id);
            assert_eq!(b.components, vec!["cad".to_string(), "cam".to_string()]);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(ledger.lease_count(), 1);
}

#[test]
fn the_key_that_ends_first_is_used_first() {
    let mut ledger = ledger();
    import(&mut ledger, key("late", &["cad"], 1, BASE_MS + 2_000_000));
    import(&mut ledger, key("soon", &["cad"], 1, BASE_MS + 1_000_000));
    let Outcome::LeaseGranted { lease, .. } =
        ledger.apply(&at(BASE_MS, checkout("l1", "a", "cad")))
    else {
        panic!()
    };
    assert_eq!(lease.key_id, "soon");
}

#[test]
fn a_lease_ends_exactly_at_its_expiry_and_never_outlives_its_key() {
    let mut ledger = ledger();
    import(&mut ledger, key("k1", &["cad"], 1, BASE_MS + 10_000));
    let Outcome::LeaseGranted { lease, .. } =
        ledger.apply(&at(BASE_MS, checkout("l1", "a", "cad")))
    else {
        panic!()
    };
    assert_eq!(
        lease.expires_at_ms,
        BASE_MS + 10_000,
        "capped at the key's end"
    );
    ledger.apply(&at(BASE_MS + 9_999, Command::Expire));
    assert_eq!(ledger.lease_count(), 1);
    let outcome = ledger.apply(&at(BASE_MS + 10_000, Command::Expire));
    assert_eq!(outcome, Outcome::Expired { leases_ended: 1 });
    let heartbeat = Command::Heartbeat {
        lease_id: "l1".into(),
        lease_ttl_ms: TTL_MS,
    };
    assert_eq!(
        refusal(ledger.apply(&at(BASE_MS + 10_001, heartbeat))).code(),
        "lease_not_found"
    );
}

const DAY_MS: i64 = 24 * 3600 * 1000;

/// `key(..)` allowing borrowing for `days`.
fn borrowing_key(key_id: &str, licenses: u32, until_ms: i64, days: u32) -> LicenseKey {
    let payload = LicenseKeyPayload {
        max_borrow_days: days,
        ..key(key_id, &["cad"], licenses, until_ms).payload
    };
    LicenseKey::sign(payload, &vendor()).unwrap()
}

fn borrow(lease_id: &str, station: &str, days: i64) -> Command {
    let Command::Checkout {
        lease_id,
        component,
        station,
        user,
        host,
        lease_ttl_ms,
        ..
    } = checkout(lease_id, station, "cad")
    else {
        unreachable!("checkout() makes a Checkout")
    };
    Command::Checkout {
        lease_id,
        component,
        station,
        user,
        host,
        lease_ttl_ms,
        borrow_ms: days * DAY_MS,
    }
}

#[test]
fn a_borrowed_license_runs_without_heartbeats_until_its_end_and_counts_like_any_lease() {
    let mut ledger = ledger();
    import(
        &mut ledger,
        borrowing_key("k1", 2, BASE_MS + 30 * DAY_MS, 7),
    );
    let Outcome::LeaseGranted { lease, .. } = ledger.apply(&at(BASE_MS, borrow("l1", "a", 3)))
    else {
        panic!()
    };
    assert_eq!(lease.expires_at_ms, BASE_MS + 3 * DAY_MS);
    // No heartbeat for two days: still held, and counted.
    ledger.apply(&at(BASE_MS + 2 * DAY_MS, Command::Expire));
    assert_eq!(ledger.lease_count(), 1);
    ledger.apply(&at(BASE_MS + 2 * DAY_MS, checkout("l2", "b", "cad")));
    let refused = refusal(ledger.apply(&at(BASE_MS + 2 * DAY_MS, checkout("l3", "c", "cad"))));
    assert_eq!(refused.code(), "no_licenses_available");
    // A heartbeat (the station came back online) never cuts the borrowing short.
    let heartbeat = Command::Heartbeat {
        lease_id: "l1".into(),
        lease_ttl_ms: TTL_MS,
    };
    let Outcome::LeaseRenewed { lease, .. } =
        ledger.apply(&at(BASE_MS + 2 * DAY_MS + 1, heartbeat))
    else {
        panic!()
    };
    assert_eq!(lease.expires_at_ms, BASE_MS + 3 * DAY_MS);
    // It ends by itself at its end.
    ledger.apply(&at(BASE_MS + 3 * DAY_MS, Command::Expire));
    assert!(ledger.lease("l1").is_none());
    ledger.check_invariants().unwrap();
}

#[test]
fn returning_a_borrowed_license_early_gives_the_seat_back() {
    let mut ledger = ledger();
    import(
        &mut ledger,
        borrowing_key("k1", 1, BASE_MS + 30 * DAY_MS, 7),
    );
    ledger.apply(&at(BASE_MS, borrow("l1", "a", 7)));
    let refused = refusal(ledger.apply(&at(BASE_MS + DAY_MS, checkout("l2", "b", "cad"))));
    assert_eq!(refused.code(), "no_licenses_available");
    let returned = ledger.apply(&at(
        BASE_MS + DAY_MS,
        Command::Checkin {
            lease_id: "l1".into(),
        },
    ));
    assert!(
        matches!(returned, Outcome::LeaseReleased { .. }),
        "{returned:?}"
    );
    let again = ledger.apply(&at(BASE_MS + DAY_MS, checkout("l2", "b", "cad")));
    assert!(matches!(again, Outcome::LeaseGranted { .. }), "{again:?}");
}

#[test]
fn a_borrowing_the_key_does_not_allow_is_refused_and_changes_nothing() {
    let mut ledger = ledger();
    import(&mut ledger, key("k0", &["cad"], 5, BASE_MS + 30 * DAY_MS));
    let refused = refusal(ledger.apply(&at(BASE_MS, borrow("l1", "a", 1))));
    assert_eq!(refused.code(), "borrow_not_allowed");
    assert!(refused.to_string().contains("max_borrow_days"), "{refused}");
    let mut ledger = self::ledger();
    import(
        &mut ledger,
        borrowing_key("k1", 5, BASE_MS + 30 * DAY_MS, 7),
    );
    let refused = refusal(ledger.apply(&at(BASE_MS, borrow("l1", "a", 8))));
    assert_eq!(refused.code(), "borrow_not_allowed");
    assert!(refused.to_string().contains("at most 7 days"), "{refused}");
    assert_eq!(ledger.lease_count(), 0);
    // Past any key's limit: not even proposed as valid.
    let refused = refusal(ledger.apply(&at(BASE_MS, borrow("l1", "a", 400))));
    assert_eq!(refused.code(), "invalid_request");
}

#[test]
fn a_lease_of_a_key_with_grace_keeps_its_seat_through_the_grace() {
    let mut ledger = ledger();
    let payload = LicenseKeyPayload {
        grace_minutes: 10,
        ..key("k1", &["cad"], 1, BASE_MS + 30 * DAY_MS).payload
    };
    import(&mut ledger, LicenseKey::sign(payload, &vendor()).unwrap());
    let Outcome::LeaseGranted { lease, .. } =
        ledger.apply(&at(BASE_MS, checkout("l1", "a", "cad")))
    else {
        panic!()
    };
    // The station's application may run until then without a server: the seat stays taken.
    assert_eq!(lease.expires_at_ms, BASE_MS + TTL_MS + 10 * 60_000);
    ledger.apply(&at(BASE_MS + 5 * 60_000, Command::Expire));
    let refused = refusal(ledger.apply(&at(BASE_MS + 5 * 60_000, checkout("l2", "b", "cad"))));
    assert_eq!(refused.code(), "no_licenses_available");
    let heartbeat = Command::Heartbeat {
        lease_id: "l1".into(),
        lease_ttl_ms: TTL_MS,
    };
    let Outcome::LeaseRenewed { lease, .. } = ledger.apply(&at(BASE_MS + 6 * 60_000, heartbeat))
    else {
        panic!()
    };
    assert_eq!(
        lease.expires_at_ms,
        BASE_MS + 6 * 60_000 + TTL_MS + 10 * 60_000
    );
    ledger.apply(&at(lease.expires_at_ms, Command::Expire));
    assert_eq!(ledger.lease_count(), 0);
}

#[test]
fn an_administrator_can_neither_take_back_a_borrowing_nor_remove_its_key_until_it_ends() {
    let mut ledger = ledger();
    import(
        &mut ledger,
        borrowing_key("k1", 1, BASE_MS + 30 * DAY_MS, 7),
    );
    ledger.apply(&at(BASE_MS, borrow("l1", "a", 7)));
    assert!(ledger.lease("l1").unwrap().borrowed);
    // Freeing the seat while the laptop runs offline would give one license to two stations.
    let release = Command::ForceRelease {
        lease_id: "l1".into(),
    };
    let refused = refusal(ledger.apply(&at(BASE_MS + 1, release.clone())));
    assert_eq!(refused.code(), "lease_borrowed");
    let remove = Command::RemoveKey {
        key_id: "k1".into(),
    };
    let refused = refusal(ledger.apply(&at(BASE_MS + 1, remove.clone())));
    assert_eq!(refused.code(), "key_has_borrowings");
    // Also after a restart (the flag is in the snapshot, both ways of restoring it).
    let config = ledger.config().clone();
    let mut restored = Ledger::restore_json(config.clone(), &ledger.snapshot_json()).unwrap();
    assert_eq!(
        refusal(restored.apply(&at(BASE_MS + 2, release.clone()))).code(),
        "lease_borrowed"
    );
    let mut restored = Ledger::restore(config, ledger.snapshot());
    assert_eq!(
        refusal(restored.apply(&at(BASE_MS + 2, remove.clone()))).code(),
        "key_has_borrowings"
    );
    assert_eq!(ledger.snapshot().leases, restored.snapshot().leases);
    // Its holder returns it early; then the key can go.
    let returned = ledger.apply(&at(
        BASE_MS + 3,
        Command::Checkin {
            lease_id: "l1".into(),
        },
    ));
    assert!(
        matches!(returned, Outcome::LeaseReleased { .. }),
        "{returned:?}"
    );
    let removed = ledger.apply(&at(BASE_MS + 4, remove));
    assert!(matches!(removed, Outcome::KeyRemoved { .. }), "{removed:?}");
}

#[test]
fn a_borrowing_never_outlives_its_key() {
    let mut ledger = ledger();
    import(&mut ledger, borrowing_key("k1", 1, BASE_MS + 2 * DAY_MS, 7));
    let Outcome::LeaseGranted { lease, .. } = ledger.apply(&at(BASE_MS, borrow("l1", "a", 5)))
    else {
        panic!()
    };
    assert_eq!(lease.expires_at_ms, BASE_MS + 2 * DAY_MS);
}

#[test]
fn time_stamped_before_the_last_entry_is_applied_at_the_last_time() {
    let mut ledger = ledger();
    import(&mut ledger, key("k1", &["cad"], 1, BASE_MS + 1_000_000));
    ledger.apply(&at(BASE_MS + 100_000, Command::Expire));
    let Outcome::LeaseGranted { lease, .. } =
        ledger.apply(&at(BASE_MS, checkout("l1", "a", "cad")))
    else {
        panic!()
    };
    assert_eq!(lease.issued_at_ms, BASE_MS + 100_000);
    assert_eq!(ledger.last_at_ms(), BASE_MS + 100_000);
}

#[test]
fn keys_that_are_expired_for_another_server_or_duplicated_are_refused_and_change_nothing() {
    let mut ledger = ledger();
    let expired = key("old", &["cad"], 1, BASE_MS - 1);
    assert!(matches!(
        refusal(ledger.apply(&at(BASE_MS, Command::ImportKey { key: expired }))),
        Refusal::KeyRejected {
            error: KeyError::Expired { .. }
        }
    ));
    let other = key_for("other", &["cad"], 1, BASE_MS + 1000, Some("srv-2"));
    assert_eq!(
        refusal(ledger.apply(&at(BASE_MS, Command::ImportKey { key: other }))).code(),
        "key_other_server"
    );
    let mine = key_for("mine", &["cad"], 1, BASE_MS + 1000, Some("srv-1"));
    import(&mut ledger, mine.clone());
    assert_eq!(
        refusal(ledger.apply(&at(BASE_MS, Command::ImportKey { key: mine }))).code(),
        "key_already_imported"
    );
    assert_eq!(ledger.keys(BASE_MS).len(), 1);
}

#[test]
fn removing_a_key_ends_its_leases() {
    let mut ledger = ledger();
    import(&mut ledger, key("k1", &["cad"], 2, BASE_MS + 1_000_000));
    ledger.apply(&at(BASE_MS, checkout("l1", "a", "cad")));
    ledger.apply(&at(BASE_MS, checkout("l2", "b", "cad")));
    let outcome = ledger.apply(&at(
        BASE_MS,
        Command::RemoveKey {
            key_id: "k1".into(),
        },
    ));
    assert_eq!(
        outcome,
        Outcome::KeyRemoved {
            key_id: "k1".into(),
            leases_ended: 2
        }
    );
    assert_eq!(ledger.lease_count(), 0);
}

#[test]
fn a_snapshot_restores_the_same_ledger() {
    let mut ledger = ledger();
    import(&mut ledger, key("k1", &["cad"], 2, BASE_MS + 1_000_000));
    ledger.apply(&at(BASE_MS, checkout("l1", "a", "cad")));
    let restored = Ledger::restore(ledger.config().clone(), ledger.snapshot());
    assert_eq!(restored.snapshot(), ledger.snapshot());
    let streamed: LedgerSnapshot = serde_json::from_slice(&ledger.snapshot_json()).unwrap();
    assert_eq!(
        streamed,
        ledger.snapshot(),
        "the streamed JSON is the same document"
    );
    restored.check_invariants().unwrap();
    let from_json = Ledger::restore_json(ledger.config().clone(), &ledger.snapshot_json()).unwrap();
    assert_eq!(
        from_json.snapshot(),
        ledger.snapshot(),
        "restoring from JSON bytes is the same"
    );
    from_json.check_invariants().unwrap();
}

/// A key that no longer verifies is named at start: as untrusted when its vendor left the
/// trust list (the way out is trusting it again), not when the key was edited.
#[test]
fn a_key_that_does_not_verify_says_whether_its_vendor_is_untrusted_or_it_was_edited() {
    let mut ledger = ledger();
    let k1 = key("k1", &["cad"], 2, BASE_MS + 1_000_000);
    import(&mut ledger, k1.clone());
    assert!(ledger.unverified_keys().is_empty());
    let import_k1 = Command::ImportKey { key: k1.clone() };
    assert!(ledger.unverified_command(&import_k1).is_none());

    let other_vendor = LedgerConfig {
        trusted_vendors: vec![SecretKey::from_seed([8; 32]).public_key()],
        ..ledger.config().clone()
    };
    let untrusted = Ledger::restore(other_vendor, ledger.snapshot());
    let found = untrusted.unverified_keys();
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].untrusted_vendor, "{found:?}");
    assert_eq!(found[0].what, "license key k1");
    let found = untrusted.unverified_command(&import_k1).unwrap();
    assert!(
        found.untrusted_vendor && found.to_string().contains("does not trust"),
        "{found}"
    );

    let mut edited: serde_json::Value = serde_json::to_value(&k1).unwrap();
    edited["payload"]["licenses"] = serde_json::json!(500);
    let edited: LicenseKey = serde_json::from_value(edited).unwrap();
    let found = ledger
        .unverified_command(&Command::ImportKey { key: edited })
        .unwrap();
    assert!(!found.untrusted_vendor, "{found}");
    assert!(found.to_string().contains("invalid signature"), "{found}");
}

// ---- synchronization with the vendor ----

fn response(
    server_id: &str,
    sequence: u64,
    nonce: &str,
    at_ms: i64,
    keys: Vec<LicenseKey>,
    revoked: Vec<String>,
) -> SyncResponse {
    response_with_renewals(server_id, sequence, nonce, at_ms, keys, revoked, vec![])
}

fn response_with_renewals(
    server_id: &str,
    sequence: u64,
    nonce: &str,
    at_ms: i64,
    keys: Vec<LicenseKey>,
    revoked: Vec<String>,
    renewals: Vec<LicenseKey>,
) -> SyncResponse {
    let at = Timestamp::from_millisecond(at_ms).unwrap();
    let certificate = ServerCertificate::sign(
        CertificatePayload {
            server_id: server_id.into(),
            customer: "acme".into(),
            public_key: server_identity().public_key().to_base64(),
            issued_at: at,
            valid_until: Timestamp::from_millisecond(at_ms + 366 * 86_400_000).unwrap(),
        },
        &vendor(),
    );
    SyncResponse::sign(
        SyncResponsePayload {
            server_id: server_id.into(),
            request_nonce: nonce.into(),
            sequence,
            issued_at: at,
            certificate,
            keys,
            revoked,
            renewals,
            countersigned: None,
        },
        &vendor(),
    )
}

/// Begins a sync; returns the request's sequence, which the vendor's answer must carry.
fn begin_sync(ledger: &mut Ledger, at_ms: i64, nonce: &str) -> u64 {
    match ledger.apply(&at(
        at_ms,
        Command::BeginSync {
            nonce: nonce.into(),
        },
    )) {
        Outcome::SyncBegun { sequence, .. } => sequence,
        other => panic!("{other:?}"),
    }
}

fn complete(ledger: &mut Ledger, at_ms: i64, response: SyncResponse) -> Outcome {
    ledger.apply(&at(
        at_ms,
        Command::CompleteSync {
            response: Box::new(response),
        },
    ))
}

#[test]
fn keys_bound_to_the_server_issue_only_under_a_valid_certificate() {
    let mut ledger = ledger();
    let bound = key_for(
        "bound",
        &["cad"],
        2,
        BASE_MS + 800 * 86_400_000,
        Some("srv-1"),
    );
    import(&mut ledger, bound.clone());
    let refused = refusal(ledger.apply(&at(BASE_MS, checkout("l1", "a", "cad"))));
    assert_eq!(
        refused,
        Refusal::ServerNotSynchronized { deadline_ms: None }
    );
    let sequence = begin_sync(&mut ledger, BASE_MS, "n1");
    let synced = complete(
        &mut ledger,
        BASE_MS,
        response("srv-1", sequence, "n1", BASE_MS, vec![bound], vec![]),
    );
    assert!(
        matches!(synced, Outcome::Synced { sequence: s, .. } if s == sequence),
        "{synced:?}"
    );
    assert!(matches!(
        ledger.apply(&at(BASE_MS, checkout("l1", "a", "cad"))),
        Outcome::LeaseGranted { .. }
    ));
    let deadline = BASE_MS + 366 * 86_400_000;
    let late = refusal(ledger.apply(&at(deadline, checkout("l2", "b", "cad"))));
    assert_eq!(
        late,
        Refusal::ServerNotSynchronized {
            deadline_ms: Some(deadline)
        }
    );
    assert!(late.to_string().contains("tessera sync"), "{late}");
}

#[test]
fn a_replayed_stale_foreign_or_edited_sync_response_is_refused_and_changes_nothing() {
    let mut ledger = ledger();
    let new_key = key_for(
        "new",
        &["cad"],
        2,
        BASE_MS + 800 * 86_400_000,
        Some("srv-1"),
    );
    let first_sequence = begin_sync(&mut ledger, BASE_MS, "n1");
    let first = response(
        "srv-1",
        first_sequence,
        "n1",
        BASE_MS,
        vec![new_key.clone()],
        vec![],
    );
    assert!(matches!(
        complete(&mut ledger, BASE_MS, first.clone()),
        Outcome::Synced { .. }
    ));
    let before = ledger.snapshot();
    let replayed = refusal(complete(&mut ledger, BASE_MS + 1, first));
    assert!(
        matches!(
            replayed,
            Refusal::SyncRejected {
                error: SyncError::NotAwaited { .. }
            }
        ),
        "{replayed}"
    );
    let second = begin_sync(&mut ledger, BASE_MS + 2, "n2");
    assert!(second > first_sequence);
    let foreign = response("srv-9", second, "n2", BASE_MS, vec![], vec![]);
    assert!(matches!(
        refusal(complete(&mut ledger, BASE_MS + 3, foreign)),
        Refusal::SyncRejected {
            error: SyncError::OtherServer { .. }
        }
    ));
    let mut edited = response("srv-1", second, "n2", BASE_MS, vec![], vec!["new".into()]);
    edited.payload.revoked.clear();
    assert!(matches!(
        refusal(complete(&mut ledger, BASE_MS + 4, edited)),
        Refusal::SyncRejected {
            error: SyncError::BadSignature { .. }
        }
    ));
    assert_eq!(ledger.snapshot().keys, before.keys);
    assert_eq!(ledger.sync_state().completed_sequence, first_sequence);
    let revoke = response("srv-1", second, "n2", BASE_MS, vec![], vec!["new".into()]);
    assert!(matches!(
        complete(&mut ledger, BASE_MS + 5, revoke),
        Outcome::Synced { .. }
    ));
    assert!(ledger.keys(BASE_MS).is_empty(), "the revoked key is gone");
}

/// T8: the vendor's time floor is the highest time the vendor signed (a sync response, its
/// certificate, an imported key), whatever the entry's own time; it never goes down, and it
/// is kept in snapshots.
#[test]
fn the_vendors_time_floor_is_the_highest_signed_time_seen() {
    let day = 86_400_000;
    let mut ledger = ledger();
    assert_eq!(ledger.vendor_time_ms(), None);
    import(&mut ledger, key("k1", &["cad"], 1, BASE_MS + 30 * day));
    assert_eq!(
        ledger.vendor_time_ms(),
        Some(BASE_MS - 1000),
        "the key's issued-at"
    );
    // The server's clock says BASE_MS, 40 days behind the authority's.
    let sequence = begin_sync(&mut ledger, BASE_MS, "n1");
    let answer = response("srv-1", sequence, "n1", BASE_MS + 40 * day, vec![], vec![]);
    assert!(matches!(
        complete(&mut ledger, BASE_MS + 1, answer),
        Outcome::Synced { .. }
    ));
    assert_eq!(ledger.vendor_time_ms(), Some(BASE_MS + 40 * day));
    assert_eq!(
        ledger.last_at_ms(),
        BASE_MS + 1,
        "the entries' time is untouched"
    );
    // A later, older signed time (a key issued long ago) does not lower it.
    import(&mut ledger, key("k2", &["cam"], 1, BASE_MS + 50 * day));
    assert_eq!(ledger.vendor_time_ms(), Some(BASE_MS + 40 * day));
    let restored = Ledger::restore_json(ledger.config().clone(), &ledger.snapshot_json()).unwrap();
    assert_eq!(restored.vendor_time_ms(), Some(BASE_MS + 40 * day));
    let restored = Ledger::restore(ledger.config().clone(), ledger.snapshot());
    assert_eq!(restored.vendor_time_ms(), Some(BASE_MS + 40 * day));
}

#[test]
fn the_sync_chain_is_kept_in_the_ledger_and_its_snapshots() {
    let mut ledger = ledger();
    let begun = |ledger: &mut Ledger, at_ms: i64, nonce: &str| match ledger.apply(&at(
        at_ms,
        Command::BeginSync {
            nonce: nonce.into(),
        },
    )) {
        Outcome::SyncBegun {
            sequence,
            last_response,
            pending_since,
            ..
        } => (sequence, last_response, pending_since),
        other => panic!("{other:?}"),
    };
    // Before any sync: no last response; pending since this very request.
    let (first, last, pending) = begun(&mut ledger, BASE_MS, "n1");
    assert_eq!((last, pending), (None, Some(first)));
    // Its answer is lost: the retry is pending since the first request still.
    let (retry, last, pending) = begun(&mut ledger, BASE_MS + 1, "n2");
    assert!(retry > first);
    assert_eq!((last, pending), (None, Some(first)));
    let answer = response("srv-1", retry, "n2", BASE_MS, vec![], vec![]);
    let hash = answer.chain_hash();
    // The authority refused once meanwhile: blocked, until a sync succeeds.
    ledger.apply(&at(
        BASE_MS + 2,
        Command::BlockSync {
            code: "server_cloned".into(),
            message: "a copy".into(),
        },
    ));
    assert_eq!(
        ledger
            .sync_state()
            .blocked
            .as_ref()
            .map(|b| b.code.as_str()),
        Some("server_cloned")
    );
    let snapshot_json = ledger.snapshot_json();
    let restored = Ledger::restore_json(ledger.config().clone(), &snapshot_json).unwrap();
    assert_eq!(restored.sync_state(), ledger.sync_state());
    assert!(matches!(
        complete(&mut ledger, BASE_MS + 3, answer),
        Outcome::Synced { .. }
    ));
    let sync = ledger.sync_state();
    assert_eq!(sync.last_response.as_deref(), Some(hash.as_str()));
    assert_eq!((sync.pending_since, sync.blocked.clone()), (None, None));
    let (next, last, pending) = begun(&mut ledger, BASE_MS + 4, "n3");
    assert_eq!((last, pending), (Some(hash.clone()), Some(next)));
    // Both ways of restoring keep it; a snapshot written before the chain loads without it.
    let restored = Ledger::restore(ledger.config().clone(), ledger.snapshot());
    assert_eq!(restored.sync_state(), ledger.sync_state());
    let restored = Ledger::restore_json(ledger.config().clone(), &ledger.snapshot_json()).unwrap();
    assert_eq!(restored.sync_state(), ledger.sync_state());
    let mut old: serde_json::Value = serde_json::from_slice(&ledger.snapshot_json()).unwrap();
    let sync_json = old["sync"].as_object_mut().unwrap();
    for field in ["last_response", "pending_since", "blocked"] {
        sync_json.remove(field);
    }
    let old =
        Ledger::restore_json(ledger.config().clone(), &serde_json::to_vec(&old).unwrap()).unwrap();
    assert_eq!(old.sync_state().last_response, None);
    assert_eq!(old.sync_state().completed_sequence, retry);
}

// ---- automatic key renewal ----

fn renewal(
    key_id: &str,
    renews: &str,
    components: &[&str],
    licenses: u32,
    from_ms: i64,
) -> LicenseKey {
    LicenseKey::sign(
        LicenseKeyPayload {
            key_id: key_id.into(),
            customer: "acme".into(),
            components: components.iter().map(|c| c.to_string()).collect(),
            licenses,
            valid_from: Timestamp::from_millisecond(from_ms).unwrap(),
            valid_until: Timestamp::from_millisecond(from_ms + 365 * 86_400_000).unwrap(),
            server_id: Some("srv-1".into()),
            renews: Some(renews.into()),
            certified_server_required: false,
            max_borrow_days: 0,
            grace_minutes: 0,
            issued_at: Timestamp::from_millisecond(BASE_MS - 1000).unwrap(),
        },
        &vendor(),
    )
    .unwrap()
}

/// A synced ledger holding `old` (bound to srv-1) and the given renewal keys from the vendor.
fn synced_with_renewals(old: LicenseKey, renewals: Vec<LicenseKey>) -> Ledger {
    let mut ledger = ledger();
    let sequence = begin_sync(&mut ledger, BASE_MS, "n1");
    let answer = response_with_renewals(
        "srv-1",
        sequence,
        "n1",
        BASE_MS,
        vec![old],
        vec![],
        renewals,
    );
    assert!(matches!(
        complete(&mut ledger, BASE_MS, answer),
        Outcome::Synced { .. }
    ));
    ledger
}

fn renewed(outcome: Outcome) -> Vec<(String, RenewalResult)> {
    match outcome {
        Outcome::KeysRenewed { renewed, .. } => renewed,
        other => panic!("expected KeysRenewed, got {other:?}"),
    }
}

#[test]
fn an_equal_or_better_renewal_takes_over_every_lease_and_the_old_key_goes() {
    let old = key_for("old", &["cad"], 2, BASE_MS + 10 * 86_400_000, Some("srv-1"));
    let new = renewal("new", "old", &["cad", "cam"], 3, BASE_MS - 1000);
    let mut ledger = synced_with_renewals(old, vec![new]);
    let Outcome::LeaseGranted { lease, .. } =
        ledger.apply(&at(BASE_MS, checkout("l1", "a", "cad")))
    else {
        panic!()
    };
    let to_branch = Command::AllocateKeyToNeighbours {
        key_id: "old".into(),
        neighbours: vec!["branch-1".into()],
    };
    ledger.apply(&at(BASE_MS, to_branch));
    let outcome = ledger.apply(&at(BASE_MS + 1, Command::RenewKeys));
    assert!(
        matches!(
            outcome,
            Outcome::KeysRenewed {
                leases_moved: 1,
                leases_ended: 0,
                ..
            }
        ),
        "{outcome:?}"
    );
    assert_eq!(ledger.lease(&lease.lease_id).unwrap().key_id, "new");
    assert!(
        ledger.key("old").is_none(),
        "the old key is removed once unused"
    );
    let new_meta = ledger
        .keys(BASE_MS)
        .into_iter()
        .find(|k| k.key.key_id() == "new")
        .unwrap()
        .meta;
    assert!(
        new_meta.stations && new_meta.neighbours.contains("branch-1"),
        "allocated to every object of the old key"
    );
    assert!(matches!(
        ledger.apply(&at(BASE_MS + 2, checkout("l2", "b", "cam"))),
        Outcome::LeaseGranted { .. }
    ));
    assert!(
        renewed(ledger.apply(&at(BASE_MS + 3, Command::RenewKeys))).is_empty(),
        "done once"
    );
}

#[test]
fn a_renewal_with_fewer_licenses_or_components_is_added_but_not_allocated() {
    let old = key_for(
        "old",
        &["cad", "cam"],
        5,
        BASE_MS + 10 * 86_400_000,
        Some("srv-1"),
    );
    let new = renewal("new", "old", &["cad"], 3, BASE_MS - 1000);
    let mut ledger = synced_with_renewals(old, vec![new]);
    let results = renewed(ledger.apply(&at(BASE_MS, Command::RenewKeys)));
    let [(old_id, RenewalResult::NotAllocated { reason, .. })] = &results[..] else {
        panic!("{results:?}")
    };
    assert_eq!(old_id, "old");
    assert!(
        reason.contains("does not license cam") && reason.contains("3 licenses"),
        "{reason}"
    );
    let Outcome::LeaseGranted { lease, .. } =
        ledger.apply(&at(BASE_MS, checkout("l1", "a", "cad")))
    else {
        panic!()
    };
    assert_eq!(lease.key_id, "old", "the unallocated renewal serves nobody");
    ledger.apply(&at(
        BASE_MS,
        Command::AllocateKey {
            key_id: "old".into(),
            stations: false,
        },
    ));
    ledger.apply(&at(
        BASE_MS,
        Command::AllocateKey {
            key_id: "new".into(),
            stations: true,
        },
    ));
    let Outcome::LeaseGranted { lease, .. } =
        ledger.apply(&at(BASE_MS, checkout("l2", "b", "cad")))
    else {
        panic!()
    };
    assert_eq!(lease.key_id, "new", "allocated by hand, it serves");
}

#[test]
fn a_renewal_valid_later_takes_over_when_the_old_key_expires() {
    let old_until = BASE_MS + 10 * 86_400_000;
    let old = key_for("old", &["cad"], 2, old_until, Some("srv-1"));
    let new = renewal("new", "old", &["cad"], 2, old_until);
    let mut ledger = synced_with_renewals(old, vec![new]);
    renewed(ledger.apply(&at(BASE_MS, Command::RenewKeys)));
    let Outcome::LeaseGranted { lease, .. } =
        ledger.apply(&at(BASE_MS, checkout("l1", "a", "cad")))
    else {
        panic!()
    };
    assert_eq!(lease.key_id, "old");
    ledger.apply(&at(old_until, Command::Expire));
    assert!(ledger.key("old").is_none());
    let Outcome::LeaseGranted { lease, .. } =
        ledger.apply(&at(old_until, checkout("l2", "a", "cad")))
    else {
        panic!()
    };
    assert_eq!(lease.key_id, "new");
}

#[test]
fn when_a_manually_used_renewal_lacks_room_the_extra_stations_lose_their_license() {
    let old = key_for("old", &["cad"], 2, BASE_MS + 10 * 86_400_000, Some("srv-1"));
    let mut ledger = synced_with_renewals(old, vec![]);
    ledger.apply(&at(BASE_MS, checkout("l1", "a", "cad")));
    ledger.apply(&at(BASE_MS, checkout("l2", "b", "cad")));
    // The administrator added the renewal key by hand and a station already uses it.
    import(
        &mut ledger,
        renewal("new", "old", &["cad"], 2, BASE_MS - 1000),
    );
    ledger.apply(&at(BASE_MS, checkout("l3", "c", "cad")));
    let outcome = ledger.apply(&at(BASE_MS + 1, Command::RenewKeys));
    assert!(
        matches!(
            outcome,
            Outcome::KeysRenewed {
                leases_moved: 1,
                leases_ended: 1,
                ..
            }
        ),
        "{outcome:?}"
    );
    assert!(
        ledger.key("old").is_none(),
        "removed anyway, as the manual says"
    );
    assert_eq!(ledger.lease_count(), 2);
}

#[test]
fn a_key_allocated_to_a_station_group_serves_only_its_members() {
    let mut ledger = ledger();
    import(&mut ledger, key("k1", &["cad"], 5, BASE_MS + 1_000_000));
    ledger.apply(&at(
        BASE_MS,
        Command::AllocateKey {
            key_id: "k1".into(),
            stations: false,
        },
    ));
    let set = Command::SetStationGroup {
        group: "design".into(),
        stations: vec!["ws-1".into()],
    };
    assert!(matches!(
        ledger.apply(&at(BASE_MS, set)),
        Outcome::StationGroupSet { stations: 1, .. }
    ));
    let allocate = Command::AllocateKeyToGroups {
        key_id: "k1".into(),
        groups: vec!["design".into()],
    };
    ledger.apply(&at(BASE_MS, allocate));
    assert!(matches!(
        ledger.apply(&at(BASE_MS, checkout("l1", "ws-1", "cad"))),
        Outcome::LeaseGranted { .. }
    ));
    let outsider = refusal(ledger.apply(&at(BASE_MS, checkout("l2", "ws-2", "cad"))));
    assert_eq!(outsider.code(), "component_not_licensed");
    let restored = Ledger::restore(ledger.config().clone(), ledger.snapshot());
    assert_eq!(
        restored.station_groups(),
        ledger.station_groups(),
        "groups survive snapshots"
    );
    let bad = Command::SetStationGroup {
        group: "no spaces".into(),
        stations: vec!["a".into()],
    };
    assert_eq!(
        refusal(ledger.apply(&at(BASE_MS, bad))).code(),
        "invalid_request"
    );
}

// ---- property test against a reference model ----

/// The reference: the same rules written the plain way, with linear scans.
#[derive(Clone, Debug)]
struct Model {
    now_ms: i64,
    next_lease: u32,
    /// (key id, components, licenses, valid until)
    keys: Vec<(&'static str, Vec<&'static str>, u32, i64)>,
    leases: Vec<ModelLease>,
    expected: Expected,
}

#[derive(Clone, Debug, PartialEq)]
struct ModelLease {
    lease_id: String,
    station: u8,
    key_id: &'static str,
    expires_at_ms: i64,
}

#[derive(Clone, Debug, PartialEq)]
enum Expected {
    Nothing,
    Granted { lease_id: String, created: bool },
    Renewed { lease_id: String },
    Released { lease_id: String },
    Refused(&'static str),
    Expired(u32),
}

#[derive(Clone, Debug)]
enum Step {
    Checkout {
        station: u8,
        component: &'static str,
    },
    Heartbeat {
        lease: u32,
    },
    Checkin {
        lease: u32,
    },
    Advance {
        ms: i64,
    },
    Expire,
}

const COMPONENTS: [&str; 3] = ["cad", "cam", "sim"];

impl Model {
    fn end_due(&mut self) -> u32 {
        let before = self.leases.len();
        let now = self.now_ms;
        self.leases.retain(|lease| lease.expires_at_ms > now);
        (before - self.leases.len()) as u32
    }

    fn key_until(&self, key_id: &str) -> i64 {
        self.keys.iter().find(|k| k.0 == key_id).unwrap().3
    }
}

impl ReferenceStateMachine for Model {
    type State = Model;
    type Transition = Step;

    fn init_state() -> BoxedStrategy<Model> {
        Just(Model {
            now_ms: BASE_MS,
            next_lease: 0,
            keys: vec![
                ("k1", vec!["cad"], 2, BASE_MS + 50_000),
                ("k2", vec!["cad", "cam"], 3, BASE_MS + 200_000),
                ("k3", vec!["cam"], 1, BASE_MS + 120_000),
            ],
            leases: vec![],
            expected: Expected::Nothing,
        })
        .boxed()
    }

    fn transitions(state: &Model) -> BoxedStrategy<Step> {
        let issued = state.next_lease.max(1);
        prop_oneof![
            4 => (0u8..5, 0usize..3).prop_map(|(station, c)| Step::Checkout { station, component: COMPONENTS[c] }),
            2 => (0..issued).prop_map(|lease| Step::Heartbeat { lease }),
            2 => (0..issued).prop_map(|lease| Step::Checkin { lease }),
            2 => (0i64..40_000).prop_map(|ms| Step::Advance { ms }),
            1 => Just(Step::Expire),
        ]
        .boxed()
    }

    fn apply(mut state: Model, step: &Step) -> Model {
        if let Step::Advance { ms } = step {
            state.now_ms += ms;
            state.expected = Expected::Nothing;
            return state;
        }
        let ended = state.end_due();
        let now = state.now_ms;
        state.expected = match step {
            Step::Checkout { station, component } => {
                let covering: Vec<_> = state
                    .keys
                    .iter()
                    .filter(|k| k.3 > now && k.1.contains(component))
                    .cloned()
                    .collect();
                let held = state
                    .leases
                    .iter_mut()
                    .filter_map(|lease| {
                        let key = covering.iter().find(|k| k.0 == lease.key_id)?;
                        (lease.station == *station).then_some(((key.3, key.0), lease))
                    })
                    .min_by_key(|(order, _)| *order)
                    .map(|(_, lease)| lease);
                if covering.is_empty() {
                    Expected::Refused("component_not_licensed")
                } else if let Some(lease) = held {
                    let until = covering.iter().find(|k| k.0 == lease.key_id).unwrap().3;
                    lease.expires_at_ms = lease.expires_at_ms.max((now + TTL_MS).min(until));
                    Expected::Granted {
                        lease_id: lease.lease_id.clone(),
                        created: false,
                    }
                } else {
                    let mut free: Vec<_> = covering
                        .iter()
                        .filter(|k| {
                            (state.leases.iter().filter(|l| l.key_id == k.0).count() as u32) < k.2
                        })
                        .collect();
                    free.sort_by_key(|k| (k.3, k.0));
                    match free.first() {
                        None => Expected::Refused("no_licenses_available"),
                        Some(chosen) => {
                            let lease_id = format!("L{}", state.next_lease);
                            state.next_lease += 1;
                            state.leases.push(ModelLease {
                                lease_id: lease_id.clone(),
                                station: *station,
                                key_id: chosen.0,
                                expires_at_ms: (now + TTL_MS).min(chosen.3),
                            });
                            Expected::Granted {
                                lease_id,
                                created: true,
                            }
                        }
                    }
                }
            }
            Step::Heartbeat { lease } => {
                let lease_id = format!("L{lease}");
                let until = state
                    .leases
                    .iter()
                    .find(|l| l.lease_id == lease_id)
                    .map(|l| state.key_until(l.key_id));
                match until {
                    None => Expected::Refused("lease_not_found"),
                    Some(until) => {
                        let lease = state
                            .leases
                            .iter_mut()
                            .find(|l| l.lease_id == lease_id)
                            .unwrap();
                        lease.expires_at_ms = lease.expires_at_ms.max((now + TTL_MS).min(until));
                        Expected::Renewed { lease_id }
                    }
                }
            }
            Step::Checkin { lease } => {
                let lease_id = format!("L{lease}");
                match state.leases.iter().position(|l| l.lease_id == lease_id) {
                    None => Expected::Refused("lease_not_found"),
                    Some(position) => {
                        state.leases.remove(position);
                        Expected::Released { lease_id }
                    }
                }
            }
            Step::Expire => Expected::Expired(ended),
            Step::Advance { .. } => unreachable!(),
        };
        state
    }
}

struct LedgerUnderTest {
    ledger: Ledger,
    now_ms: i64,
    next_lease: u32,
}

impl StateMachineTest for LedgerUnderTest {
    type SystemUnderTest = LedgerUnderTest;
    type Reference = Model;

    fn init_test(model: &Model) -> LedgerUnderTest {
        let mut ledger = ledger();
        for (key_id, components, licenses, until) in &model.keys {
            import(&mut ledger, key(key_id, components, *licenses, *until));
        }
        LedgerUnderTest {
            ledger,
            now_ms: model.now_ms,
            next_lease: 0,
        }
    }

    fn apply(mut sut: LedgerUnderTest, model: &Model, step: Step) -> LedgerUnderTest {
        let command = match step {
            Step::Advance { ms } => {
                sut.now_ms += ms;
                return sut;
            }
            Step::Checkout { station, component } => checkout(
                &format!("L{}", sut.next_lease),
                &format!("ws-{station}"),
                component,
            ),
            Step::Heartbeat { lease } => Command::Heartbeat {
                lease_id: format!("L{lease}"),
                lease_ttl_ms: TTL_MS,
            },
            Step::Checkin { lease } => Command::Checkin {
                lease_id: format!("L{lease}"),
            },
            Step::Expire => Command::Expire,
        };
        let outcome = sut.ledger.apply(&at(sut.now_ms, command));
        let got = match outcome {
            Outcome::LeaseGranted { lease, created } => {
                if created {
                    sut.next_lease += 1;
                }
                Expected::Granted {
                    lease_id: lease.lease_id,
                    created,
                }
            }
            Outcome::LeaseRenewed { lease } => Expected::Renewed {
                lease_id: lease.lease_id,
            },
            Outcome::LeaseReleased { lease } => Expected::Released {
                lease_id: lease.lease_id,
            },
            Outcome::Expired { leases_ended } => Expected::Expired(leases_ended),
            Outcome::Refused { refusal } => Expected::Refused(refusal.code()),
            other => panic!("unexpected outcome {other:?}"),
        };
        assert_eq!(got, model.expected);
        sut
    }

    fn check_invariants(sut: &LedgerUnderTest, model: &Model) {
        sut.ledger.check_invariants().unwrap();
        let mut expected: Vec<(String, String, i64)> = model
            .leases
            .iter()
            .filter(|l| l.expires_at_ms > sut.ledger.last_at_ms())
            .map(|l| (l.lease_id.clone(), l.key_id.to_string(), l.expires_at_ms))
            .collect();
        expected.sort();
        let mut actual: Vec<(String, String, i64)> = sut
            .ledger
            .leases()
            .into_iter()
            .filter(|l| l.expires_at_ms > sut.ledger.last_at_ms())
            .map(|l| (l.lease_id.clone(), l.key_id.clone(), l.expires_at_ms))
            .collect();
        actual.sort();
        assert_eq!(actual, expected, "no lease lost or duplicated");
        for key in sut.ledger.keys(sut.now_ms) {
            assert!(
                key.in_use <= key.key.payload.licenses,
                "never more leases than licenses"
            );
        }
    }
}

prop_state_machine! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
    #[test]
    fn ledger_matches_the_reference_model(sequential 1..60 => LedgerUnderTest);
}

#[test]
fn a_borrowing_ends_when_the_servers_certificate_does() {
    // The application checks a bound key's borrowing offline against this server's
    // certificate: a borrowing past it would hold a seat nobody can use.
    let payload = LicenseKeyPayload {
        max_borrow_days: 7,
        ..key_for("bound", &["cad"], 1, BASE_MS + 800 * DAY_MS, Some("srv-1")).payload
    };
    let bound = LicenseKey::sign(payload, &vendor()).unwrap();
    let mut ledger = synced_with_renewals(bound, vec![]);
    let deadline = ledger.sync_state().deadline_ms().unwrap();
    assert_eq!(deadline, BASE_MS + 366 * DAY_MS);
    let Outcome::LeaseGranted { lease, .. } =
        ledger.apply(&at(deadline - 2 * DAY_MS, borrow("l1", "a", 7)))
    else {
        panic!()
    };
    assert_eq!(lease.expires_at_ms, deadline);
}
