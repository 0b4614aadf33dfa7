//! Donations between servers: grants, their chain back to the vendor, renewal, lapse and
//! the refusals of forged, inflated, expired and replayed grants.

use tessera_core::grant::{Grant, GrantError, GrantPayload};
use tessera_core::{
    Command, Ledger, LedgerConfig, LicenseKey, Outcome, PublicKey, Refusal, SecretKey, Stamped,
};

use super::{BASE_MS, checkout, key, refusal, vendor};

const HOUR_MS: i64 = 3_600_000;
const SKEW_MS: i64 = 30_000;

/// A server in a test network: its ledger and identity.
struct Server {
    id: String,
    secret: SecretKey,
    ledger: Ledger,
}

impl Server {
    fn new(id: &str, seed: u8) -> Server {
        let secret = SecretKey::from_seed([seed; 32]);
        let ledger = Ledger::new(LedgerConfig {
            trusted_vendors: vec![vendor().public_key()],
            server_id: Some(id.into()),
            server_public_key: Some(secret.public_key()),
            clock_skew_max_ms: SKEW_MS,
        });
        Server {
            id: id.into(),
            secret,
            ledger,
        }
    }

    fn public(&self) -> PublicKey {
        self.secret.public_key()
    }

    fn apply(&mut self, at_ms: i64, command: Command) -> Outcome {
        self.ledger.apply(&Stamped { at_ms, command })
    }

    fn donate(&mut self, at_ms: i64, key_id: &str, to: &Server, licenses: u32, until_ms: i64) {
        let outcome = self.apply(
            at_ms,
            Command::Donate {
                key_id: key_id.into(),
                to: to.id.clone(),
                receiver_public_key: to.public().to_base64(),
                licenses,
                until_ms,
                renewal_period_ms: HOUR_MS,
            },
        );
        assert!(matches!(outcome, Outcome::Donated { .. }), "{outcome:?}");
    }

    /// The signed grant this server hands to `to` for its donation of `key_id`.
    fn grant(&self, key_id: &str, to: &str) -> Grant {
        let (source, payload) = self.ledger.grant_to_sign(key_id, to).expect("outstanding");
        Grant::issue(source, payload, &self.secret)
    }

    fn accept(&mut self, at_ms: i64, grant: Grant) -> Outcome {
        self.apply(
            at_ms,
            Command::AcceptGrant {
                grant: Box::new(grant),
            },
        )
    }

    fn view(&self, id: &str) -> tessera_core::KeyView {
        self.ledger
            .keys(self.ledger.last_at_ms())
            .into_iter()
            .find(|k| k.id == id)
            .unwrap_or_else(|| panic!("{} has no key {id}", self.id))
    }

    fn checkouts(&mut self, at_ms: i64, count: usize) -> usize {
        (0..count)
            .filter(|n| {
                let lease = format!("{}-l{n}-{at_ms}", self.id);
                let station = format!("{}-ws{n}-{at_ms}", self.id);
                matches!(
                    self.apply(at_ms, checkout(&lease, &station, "cad")),
                    Outcome::LeaseGranted { created: true, .. }
                )
            })
            .count()
    }
}

fn network() -> (Server, Server, LicenseKey) {
    let mut parent = Server::new("parent", 11);
    let child = Server::new("child", 12);
    let k = key("k1", &["cad"], 10, BASE_MS + 1000 * HOUR_MS);
    parent.apply(BASE_MS, Command::ImportKey { key: k.clone() });
    (parent, child, k)
}

#[test]
fn donated_licenses_leave_the_donor_pool_and_serve_the_receiver() {
    let (mut parent, mut child, _) = network();
    parent.donate(BASE_MS, "k1", &child, 4, BASE_MS + 100 * HOUR_MS);
    let view = parent.view("k1");
    assert_eq!((view.licenses, view.donated), (10, 4));
    assert!(view.meta.neighbours.contains("child"));
    assert_eq!(parent.checkouts(BASE_MS, 7), 6, "the donor keeps 6");

    let outcome = child.accept(BASE_MS + 10, parent.grant("k1", "child"));
    let Outcome::GrantAccepted {
        key_id, licenses, ..
    } = outcome
    else {
        panic!("{outcome:?}")
    };
    assert_eq!((key_id.as_str(), licenses), ("k1@parent", 4));
    assert_eq!(child.checkouts(BASE_MS + 10, 5), 4, "the child uses the 4");
    let lease = &child.ledger.leases()[0];
    assert_eq!(lease.key_id, "k1@parent");
    assert!(
        lease.expires_at_ms <= BASE_MS + HOUR_MS - SKEW_MS,
        "no lease outlives the grant less the clock skew"
    );
}

#[test]
fn more_than_free_cannot_be_donated_and_nothing_changes() {
    let (mut parent, child, _) = network();
    assert_eq!(parent.checkouts(BASE_MS, 8), 8);
    let outcome = parent.apply(
        BASE_MS,
        Command::Donate {
            key_id: "k1".into(),
            to: "child".into(),
            receiver_public_key: child.public().to_base64(),
            licenses: 3,
            until_ms: BASE_MS + HOUR_MS,
            renewal_period_ms: HOUR_MS,
        },
    );
    assert_eq!(
        refusal(outcome),
        Refusal::NotEnoughLicenses {
            key_id: "k1".into(),
            requested: 3,
            free: 2
        }
    );
    assert!(parent.ledger.donations().is_empty());
    let beyond_key = parent.apply(
        BASE_MS,
        Command::Donate {
            key_id: "k1".into(),
            to: "child".into(),
            receiver_public_key: child.public().to_base64(),
            licenses: 1,
            until_ms: BASE_MS + 2000 * HOUR_MS,
            renewal_period_ms: HOUR_MS,
        },
    );
    assert_eq!(refusal(beyond_key).code(), "donation_refused");
}

#[test]
fn a_grant_not_renewed_returns_to_the_donor_after_its_lease_and_the_skew() {
    let (mut parent, mut child, _) = network();
    parent.donate(BASE_MS, "k1", &child, 4, BASE_MS + 100 * HOUR_MS);
    child.accept(BASE_MS, parent.grant("k1", "child"));
    // The child stops issuing from the grant SKEW before its end: a lease taken just
    // before is cut there.
    let child_end = BASE_MS + HOUR_MS - SKEW_MS;
    assert_eq!(child.checkouts(child_end - 10_000, 1), 1);
    assert_eq!(child.ledger.leases()[0].expires_at_ms, child_end);
    child.apply(child_end - 1, Command::Expire);
    assert_eq!(child.ledger.lease_count(), 1);
    child.apply(child_end, Command::Expire);
    assert_eq!(child.ledger.lease_count(), 0, "its leases ended with it");
    assert_eq!(
        refusal(child.apply(child_end, checkout("late", "ws-late", "cad"))).code(),
        "component_not_licensed"
    );
    // The donor takes them back SKEW after.
    let back = BASE_MS + HOUR_MS + SKEW_MS;
    assert_eq!(parent.ledger.next_expiry_ms(), Some(back));
    parent.apply(back - 1, Command::Expire);
    assert_eq!(parent.view("k1").donated, 4);
    parent.apply(back, Command::Expire);
    assert_eq!(
        parent.view("k1").donated,
        0,
        "licenses back in the free pool"
    );
    assert_eq!(parent.checkouts(back, 10), 10);
    // The donation itself stays until its end date: a returning child renews it.
    assert_eq!(parent.ledger.donations().len(), 1);
}

#[test]
fn a_donor_rebuilt_on_an_empty_ledger_donates_again_to_a_receiver_of_the_lost_one() {
    let (mut parent, mut child, k) = network();
    parent.donate(BASE_MS, "k1", &child, 4, BASE_MS + 100 * HOUR_MS);
    child.accept(BASE_MS, parent.grant("k1", "child"));
    let renew_at = BASE_MS + HOUR_MS / 2;
    parent.apply(renew_at, Command::RenewDonations { to: "child".into() });
    child.accept(renew_at, parent.grant("k1", "child"));
    // The parent's disk is lost. It starts again with its identity and an empty ledger
    // once nothing the lost ledger granted can be in use (docs/operations.md).
    let restart = renew_at + HOUR_MS + SKEW_MS + 1000;
    let mut rebuilt = Server::new("parent", 11);
    rebuilt.apply(restart, Command::ImportKey { key: k });
    rebuilt.donate(restart, "k1", &child, 4, BASE_MS + 100 * HOUR_MS);
    let outcome = child.accept(restart, rebuilt.grant("k1", "child"));
    assert!(
        matches!(outcome, Outcome::GrantAccepted { licenses: 4, .. }),
        "not refused as a replay of the lost ledger's grants: {outcome:?}"
    );
    assert_eq!(child.checkouts(restart, 5), 4);
}

#[test]
fn renewal_extends_the_grant_with_a_higher_serial_and_leases_continue() {
    let (mut parent, mut child, _) = network();
    parent.donate(BASE_MS, "k1", &child, 4, BASE_MS + 100 * HOUR_MS);
    let first = parent.grant("k1", "child");
    child.accept(BASE_MS, first.clone());
    let renew_at = BASE_MS + HOUR_MS / 2;
    let outcome = parent.apply(renew_at, Command::RenewDonations { to: "child".into() });
    let Outcome::DonationsRenewed { donations, .. } = outcome else {
        panic!("{outcome:?}")
    };
    let serial = donations[0].serial;
    assert!(serial > first.last().serial);
    assert_eq!(donations[0].lease_until_ms, renew_at + HOUR_MS);
    let grant = parent.grant("k1", "child");
    assert_eq!(grant.last().serial, serial);
    child.accept(renew_at, grant);
    assert_eq!(child.view("k1@parent").received.unwrap().serial, serial);
    // A lease taken just before the first grant's end now runs its full time.
    let old_end = BASE_MS + HOUR_MS - SKEW_MS;
    assert_eq!(child.checkouts(old_end - 1000, 1), 1);
    assert!(child.ledger.leases()[0].expires_at_ms > old_end);
}

/// T10 on the receiver: each grant names the serial the donor's ledger issued before it on
/// the link. A serial held in between was never issued by the donor's ledger (signed with
/// its key outside it); a serial before it is only a grant the receiver missed.
#[test]
fn a_receiver_names_a_serial_the_donors_chain_skips_but_not_a_gap() {
    let unknown = |outcome: Outcome| match outcome {
        Outcome::GrantAccepted {
            unknown_to_donor, ..
        } => unknown_to_donor,
        other => panic!("{other:?}"),
    };
    let (mut parent, mut child, _) = network();
    parent.donate(BASE_MS, "k1", &child, 4, BASE_MS + 100 * HOUR_MS);
    let first = parent.grant("k1", "child");
    assert_eq!(first.last().prev_serial, None, "the link's first grant");
    assert_eq!(unknown(child.accept(BASE_MS, first.clone())), None);

    // Forged with the parent's own key: 9 licenses, a serial after the real one.
    let (source, mut payload) = parent.ledger.grant_to_sign("k1", "child").unwrap();
    payload.serial += 5_000;
    payload.licenses = 9;
    let forged_serial = payload.serial;
    let forged = Grant::issue(source, payload, &parent.secret);
    assert_eq!(unknown(child.accept(BASE_MS + 10, forged)), None);
    assert_eq!(child.view("k1@parent").received.unwrap().licenses, 9);

    // The parent's next real grant follows the first one: the forged serial is named.
    let renew_at = BASE_MS + HOUR_MS / 2;
    parent.apply(renew_at, Command::RenewDonations { to: "child".into() });
    let second = parent.grant("k1", "child");
    assert_eq!(second.last().prev_serial, Some(first.last().serial));
    assert_eq!(
        unknown(child.accept(renew_at, second.clone())),
        Some(forged_serial)
    );
    assert_eq!(child.view("k1@parent").received.unwrap().licenses, 4);

    // A grant the child never got (the third) is a gap: the fourth is accepted quietly.
    parent.apply(
        renew_at + 1000,
        Command::RenewDonations { to: "child".into() },
    );
    parent.apply(
        renew_at + 2000,
        Command::RenewDonations { to: "child".into() },
    );
    let fourth = parent.grant("k1", "child");
    assert!(fourth.last().prev_serial > Some(second.last().serial));
    assert_eq!(unknown(child.accept(renew_at + 2000, fourth)), None);
}

#[test]
fn forged_inflated_foreign_expired_and_replayed_grants_are_refused() {
    let (mut parent, mut child, _) = network();
    parent.donate(BASE_MS, "k1", &child, 4, BASE_MS + 100 * HOUR_MS);
    let genuine = parent.grant("k1", "child");

    let mut inflated = genuine.clone();
    inflated.links[0].payload.licenses = 9;
    assert!(matches!(
        refusal(child.accept(BASE_MS, inflated)),
        Refusal::GrantRejected {
            error: GrantError::BadSignature { link: 1 }
        }
    ));

    // Signed by someone else claiming to be the parent.
    let impostor = SecretKey::from_seed([66; 32]);
    let mut payload: GrantPayload = genuine.last().clone();
    payload.licenses = 10;
    let (source, _) = parent.ledger.grant_to_sign("k1", "child").unwrap();
    let forged = Grant::issue(source, payload.clone(), &impostor);
    assert_eq!(
        refusal(child.accept(BASE_MS, forged)).code(),
        "grant_bad_signature"
    );

    // A child re-granting more than it received, even when correctly signed.
    let grandchild = Server::new("grandchild", 13);
    let mut regrant = genuine.last().clone();
    regrant.donor = "child".into();
    regrant.donor_public_key = child.public().to_base64();
    regrant.receiver = "grandchild".into();
    regrant.receiver_public_key = grandchild.public().to_base64();
    regrant.licenses = 5;
    let inflated_chain = Grant::issue(
        tessera_core::GrantSource::Received(&genuine),
        regrant,
        &child.secret,
    );
    let mut grandchild = grandchild;
    assert!(matches!(
        refusal(grandchild.accept(BASE_MS, inflated_chain)),
        Refusal::GrantRejected {
            error: GrantError::Inflated {
                link: 2,
                licenses: 5,
                allowed: 4,
                ..
            }
        }
    ));

    // A grant for another server.
    assert_eq!(
        refusal(grandchild.accept(BASE_MS, genuine.clone())).code(),
        "grant_other_receiver"
    );

    // Expired (within the clock skew counts as expired for the receiver).
    assert_eq!(
        refusal(child.accept(BASE_MS + HOUR_MS - SKEW_MS, genuine.clone())).code(),
        "grant_expired"
    );

    // Replayed: the first serial after the renewal's was accepted.
    parent.apply(BASE_MS + 10, Command::RenewDonations { to: "child".into() });
    let renewed = parent.grant("k1", "child");
    assert!(renewed.last().serial > genuine.last().serial);
    child.accept(BASE_MS + 10, renewed.clone());
    assert_eq!(
        refusal(child.accept(BASE_MS + 20, genuine)).code(),
        "grant_replayed"
    );
    assert_eq!(
        child.view("k1@parent").received.unwrap().serial,
        renewed.last().serial
    );
}

#[test]
fn a_child_donates_further_within_its_grant_and_the_chain_verifies() {
    let (mut parent, mut child, _) = network();
    let mut grandchild = Server::new("grandchild", 13);
    parent.donate(BASE_MS, "k1", &child, 4, BASE_MS + 100 * HOUR_MS);
    child.accept(BASE_MS, parent.grant("k1", "child"));
    let too_many = child.apply(
        BASE_MS,
        Command::Donate {
            key_id: "k1@parent".into(),
            to: "grandchild".into(),
            receiver_public_key: grandchild.public().to_base64(),
            licenses: 5,
            until_ms: BASE_MS + 10 * HOUR_MS,
            renewal_period_ms: HOUR_MS,
        },
    );
    assert_eq!(refusal(too_many).code(), "not_enough_licenses");
    child.donate(BASE_MS, "k1@parent", &grandchild, 3, BASE_MS + 10 * HOUR_MS);
    let regrant = child.grant("k1@parent", "grandchild");
    assert_eq!(regrant.links.len(), 2);
    // The re-grant ends early enough that the child gets it back before its own grant ends.
    assert!(regrant.last().lease_until_ms() <= BASE_MS + HOUR_MS - 2 * SKEW_MS);
    let Outcome::GrantAccepted { key_id, .. } = grandchild.accept(BASE_MS, regrant) else {
        panic!()
    };
    assert_eq!(key_id, "k1@child");
    assert_eq!(grandchild.checkouts(BASE_MS, 4), 3);
    assert_eq!(child.checkouts(BASE_MS, 4), 1, "the child keeps 1 of its 4");
    assert_eq!(parent.checkouts(BASE_MS, 10), 6);
    // A child cannot release a grant it re-donated from.
    assert_eq!(
        refusal(child.apply(
            BASE_MS,
            Command::ReleaseGrant {
                key_id: "k1@parent".into()
            }
        ))
        .code(),
        "invalid_request"
    );
}

#[test]
fn lowering_a_donation_frees_licenses_only_when_the_larger_grant_is_gone() {
    let (mut parent, mut child, _) = network();
    let mut grandchild = Server::new("grandchild", 13);
    parent.donate(BASE_MS, "k1", &child, 4, BASE_MS + 100 * HOUR_MS);
    let first_serial = parent.grant("k1", "child").last().serial;
    child.accept(BASE_MS, parent.grant("k1", "child"));
    child.donate(
        BASE_MS,
        "k1@parent",
        &grandchild,
        2,
        BASE_MS + 100 * HOUR_MS,
    );
    grandchild.accept(BASE_MS, child.grant("k1@parent", "grandchild"));
    assert_eq!(child.checkouts(BASE_MS, 4), 2);
    parent.donate(BASE_MS + 1000, "k1", &child, 1, BASE_MS + 100 * HOUR_MS);
    assert_eq!(
        parent.view("k1").donated,
        4,
        "the child may still use the 4-license grant"
    );
    // The child accepts the smaller grant (even below what it donated further) and keeps
    // the larger one until it lapses: nothing ends now.
    let Outcome::GrantAccepted { leases_ended, .. } =
        child.accept(BASE_MS + 1000, parent.grant("k1", "child"))
    else {
        panic!()
    };
    assert_eq!(leases_ended, 0);
    let pool = child.view("k1@parent");
    assert_eq!((pool.licenses, pool.received.unwrap().licenses), (4, 1));
    // A renewal of the re-grant meanwhile ends before the larger grant lapses.
    let old_end = BASE_MS + HOUR_MS - SKEW_MS;
    child.apply(
        BASE_MS + 2000,
        Command::RenewDonations {
            to: "grandchild".into(),
        },
    );
    let regrant = child.ledger.donation("k1@parent", "grandchild").unwrap();
    assert!(regrant.lease_until_ms <= old_end - SKEW_MS);
    // When it lapses the pool is down to the new grant: the re-grants lapsed with it, and
    // the leases taken beyond the new grant ran out with it (they were capped at its end).
    assert_eq!(
        child.checkouts(old_end - 20_000, 4),
        2,
        "4, less the 2 donated further"
    );
    let expiries: Vec<i64> = child
        .ledger
        .leases()
        .iter()
        .map(|l| l.expires_at_ms)
        .collect();
    assert_eq!(
        expiries.iter().filter(|e| **e == old_end).count(),
        1,
        "one fits in the new grant; the other ends with the larger one"
    );
    child.apply(old_end, Command::Expire);
    let pool = child.view("k1@parent");
    assert_eq!((pool.licenses, pool.donated, pool.in_use), (1, 0, 1));
    child.ledger.check_invariants().unwrap();
    // The child says it holds only the second grant now: the parent counts 1.
    parent.apply(
        BASE_MS + 2000,
        Command::GrantReturned {
            key_id: "k1".into(),
            to: "child".into(),
            serial: first_serial,
        },
    );
    assert_eq!(parent.view("k1").donated, 1);
}

#[test]
fn a_released_grant_comes_back_once_its_stations_stop_and_cannot_be_replayed() {
    let (mut parent, mut child, _) = network();
    parent.donate(BASE_MS, "k1", &child, 4, BASE_MS + 100 * HOUR_MS);
    let grant = parent.grant("k1", "child");
    child.accept(BASE_MS, grant.clone());
    child.checkouts(BASE_MS, 2);
    let Outcome::GrantReleased {
        serial,
        leases_ended,
        stations_until_ms,
        ..
    } = child.apply(
        BASE_MS + 5,
        Command::ReleaseGrant {
            key_id: "k1@parent".into(),
        },
    )
    else {
        panic!()
    };
    assert_eq!((serial, leases_ended), (grant.last().serial, 2));
    // Their stations hear of it at their next heartbeat at best: they may use the licenses
    // until the expiry they were told, so the return is reported only after it.
    assert_eq!(stations_until_ms, BASE_MS + 30_000);
    parent.apply(
        BASE_MS + 5,
        Command::EndDonation {
            key_id: "k1".into(),
            to: "child".into(),
        },
    );
    parent.apply(
        BASE_MS + 6,
        Command::GrantReturned {
            key_id: "k1".into(),
            to: "child".into(),
            serial,
        },
    );
    assert_eq!(parent.view("k1").donated, 0);
    assert!(parent.ledger.donations().is_empty(), "ended and returned");
    // Played back, the same grant would double the licenses: refused as already used.
    assert_eq!(
        refusal(child.accept(BASE_MS + 7, grant)).code(),
        "grant_replayed"
    );
}

#[test]
fn leases_that_ended_early_count_against_the_pool_if_it_comes_back() {
    let (mut parent, mut child, _) = network();
    parent.donate(BASE_MS, "k1", &child, 4, BASE_MS + 100 * HOUR_MS);
    child.accept(BASE_MS, parent.grant("k1", "child"));
    assert_eq!(child.checkouts(BASE_MS, 3), 3);
    child.apply(
        BASE_MS + 5,
        Command::ReleaseGrant {
            key_id: "k1@parent".into(),
        },
    );
    // Donated again before the old grant came back: the parent counts the larger of the
    // two grants, so the child's three stations still running count in the new pool.
    parent.donate(BASE_MS + 10, "k1", &child, 4, BASE_MS + 100 * HOUR_MS);
    assert_eq!(parent.view("k1").donated, 4);
    child.accept(BASE_MS + 10, parent.grant("k1", "child"));
    let pool = child.view("k1@parent");
    assert_eq!((pool.in_use, pool.ended_early), (0, 3));
    assert_eq!(child.checkouts(BASE_MS + 20, 4), 1);
    child.ledger.check_invariants().unwrap();
    // Once they ran out, the pool is whole again.
    child.apply(BASE_MS + 30_000, Command::Expire);
    assert_eq!(child.view("k1@parent").ended_early, 0);
    assert_eq!(child.checkouts(BASE_MS + 30_000, 4), 3);
}

#[test]
fn leases_resting_on_an_earlier_larger_grant_run_out_with_it_and_none_ends_early() {
    let (mut parent, mut child, _) = network();
    parent.donate(BASE_MS, "k1", &child, 3, BASE_MS + 100 * HOUR_MS);
    child.accept(BASE_MS, parent.grant("k1", "child"));
    assert_eq!(child.checkouts(BASE_MS, 3), 3);
    // Lowered to one license: the new grant runs an hour from now, the larger one ends
    // first.
    parent.donate(BASE_MS + 1000, "k1", &child, 1, BASE_MS + 100 * HOUR_MS);
    child.accept(BASE_MS + 1000, parent.grant("k1", "child"));
    let old_end = BASE_MS + HOUR_MS - SKEW_MS;
    let new_end = BASE_MS + 1000 + HOUR_MS - SKEW_MS;
    // Every station asks for two hours: one lease fits in the new grant, the others end
    // with the larger one, and each station is told so.
    let mut told: Vec<i64> = child
        .ledger
        .leases()
        .iter()
        .map(|lease| {
            let outcome = child.apply(
                BASE_MS + 2000,
                Command::Heartbeat {
                    lease_id: lease.lease_id.clone(),
                    lease_ttl_ms: 2 * HOUR_MS,
                },
            );
            let Outcome::LeaseRenewed { lease } = outcome else {
                panic!("{outcome:?}")
            };
            lease.expires_at_ms
        })
        .collect();
    told.sort();
    assert_eq!(told, vec![old_end, old_end, new_end]);
    // A station checking in frees a license now, and one taken in its place ends with the
    // larger grant too.
    let capped = child
        .ledger
        .leases()
        .into_iter()
        .find(|l| l.expires_at_ms == old_end)
        .unwrap();
    child.apply(
        BASE_MS + 3000,
        Command::Checkin {
            lease_id: capped.lease_id,
        },
    );
    assert_eq!(child.checkouts(BASE_MS + 3000, 2), 1);
    let beyond = child
        .ledger
        .leases()
        .into_iter()
        .map(|lease| {
            let outcome = child.apply(
                BASE_MS + 4000,
                Command::Heartbeat {
                    lease_id: lease.lease_id,
                    lease_ttl_ms: 2 * HOUR_MS,
                },
            );
            let Outcome::LeaseRenewed { lease } = outcome else {
                panic!("{outcome:?}")
            };
            lease.expires_at_ms
        })
        .filter(|expires| *expires > old_end)
        .count();
    assert_eq!(beyond, 1);
    child.ledger.check_invariants().unwrap();
    // Nothing ends before the expiry its station was told: at the larger grant's end the
    // capped leases run out, the pool is down to one license, and it is in use.
    child.apply(old_end - 1, Command::Expire);
    assert_eq!(child.ledger.lease_count(), 3);
    child.apply(old_end, Command::Expire);
    let pool = child.view("k1@parent");
    assert_eq!((pool.licenses, pool.in_use), (1, 1));
}

#[test]
fn a_shorter_grant_never_cuts_a_lease_short() {
    let (mut parent, mut child, _) = network();
    parent.donate(BASE_MS, "k1", &child, 2, BASE_MS + 100 * HOUR_MS);
    child.accept(BASE_MS, parent.grant("k1", "child"));
    child.checkouts(BASE_MS, 1);
    let lease = child.ledger.leases()[0].lease_id.clone();
    let Outcome::LeaseRenewed { lease: told } = child.apply(
        BASE_MS + 1000,
        Command::Heartbeat {
            lease_id: lease.clone(),
            lease_ttl_ms: HOUR_MS / 2,
        },
    ) else {
        panic!()
    };
    // The administrator moves the donation's end date to ten minutes from now.
    parent.donate(BASE_MS + 2000, "k1", &child, 2, BASE_MS + HOUR_MS / 6);
    child.accept(BASE_MS + 2000, parent.grant("k1", "child"));
    assert_eq!(
        child.ledger.lease(&lease).unwrap().expires_at_ms,
        told.expires_at_ms,
        "the earlier grant still counts at the parent: the lease keeps its expiry"
    );
    // Its station's next heartbeat gets no more than the new grant (nothing past its end):
    // the lease keeps the expiry it was told, and then ends.
    let Outcome::LeaseRenewed { lease: again } = child.apply(
        BASE_MS + 3000,
        Command::Heartbeat {
            lease_id: lease,
            lease_ttl_ms: 2 * HOUR_MS,
        },
    ) else {
        panic!()
    };
    assert_eq!(again.expires_at_ms, told.expires_at_ms);
    let new_end = BASE_MS + HOUR_MS / 6 - SKEW_MS;
    assert!(child.checkouts(new_end - 1000, 1) == 1);
    assert!(
        child
            .ledger
            .leases()
            .iter()
            .all(|l| l.expires_at_ms <= told.expires_at_ms)
    );
    // Past the end date, its next heartbeat tells the station the lease is over: it ends.
    let outcome = child.apply(
        new_end + 1000,
        Command::Heartbeat {
            lease_id: told.lease_id.clone(),
            lease_ttl_ms: HOUR_MS,
        },
    );
    assert_eq!(refusal(outcome).code(), "lease_not_found");
    assert_eq!(child.ledger.lease_count(), 0);
    child.ledger.check_invariants().unwrap();
    child.ledger.check_invariants().unwrap();
}

#[test]
fn one_donation_of_a_key_to_a_neighbour_at_a_time_and_serials_per_key() {
    // The site holds k1 from hq directly and through the branch: two pools of one key.
    let (mut hq, mut branch, _) = network();
    let mut site = Server::new("site", 13);
    let mut shop = Server::new("shop", 14);
    hq.donate(BASE_MS, "k1", &branch, 4, BASE_MS + 100 * HOUR_MS);
    branch.accept(BASE_MS, hq.grant("k1", "child"));
    hq.donate(BASE_MS, "k1", &site, 2, BASE_MS + 100 * HOUR_MS);
    site.accept(BASE_MS, hq.grant("k1", "site"));
    branch.donate(BASE_MS, "k1@parent", &site, 2, BASE_MS + 50 * HOUR_MS);
    site.accept(BASE_MS, branch.grant("k1@parent", "site"));
    site.donate(BASE_MS, "k1@parent", &shop, 1, BASE_MS + 50 * HOUR_MS);
    shop.accept(BASE_MS, site.grant("k1@parent", "shop"));
    site.apply(
        BASE_MS + 1000,
        Command::RenewDonations { to: "shop".into() },
    );
    let renewed = site.grant("k1@parent", "shop").last().serial;
    shop.accept(BASE_MS + 1000, site.grant("k1@parent", "shop"));
    // The shop keeps one pool of k1 from the site: a second donation of k1 is refused.
    let refused = refusal(site.apply(
        BASE_MS + 2000,
        Command::Donate {
            key_id: "k1@child".into(),
            to: "shop".into(),
            receiver_public_key: shop.public().to_base64(),
            licenses: 1,
            until_ms: BASE_MS + 50 * HOUR_MS,
            renewal_period_ms: HOUR_MS,
        },
    ));
    assert_eq!(refused.code(), "donation_refused");
    assert!(
        refused.to_string().contains("one donation of a key"),
        "{refused}"
    );
    // Once the first donation is over, the other pool may donate, numbered after it.
    site.apply(
        BASE_MS + 3000,
        Command::EndDonation {
            key_id: "k1@parent".into(),
            to: "shop".into(),
        },
    );
    site.apply(
        BASE_MS + 3000,
        Command::GrantReturned {
            key_id: "k1@parent".into(),
            to: "shop".into(),
            serial: renewed,
        },
    );
    site.donate(BASE_MS + 4000, "k1@child", &shop, 1, BASE_MS + 50 * HOUR_MS);
    let grant = site.grant("k1@child", "shop");
    let serial = grant.last().serial;
    assert!(
        serial > renewed,
        "numbered after the first donation's grants"
    );
    assert!(matches!(
        shop.accept(BASE_MS + 4000, grant),
        Outcome::GrantAccepted { serial: accepted, .. } if accepted == serial
    ));
}

#[test]
fn the_donation_end_date_ends_the_grant_and_can_be_moved() {
    let (mut parent, mut child, _) = network();
    parent.donate(BASE_MS, "k1", &child, 4, BASE_MS + 100 * HOUR_MS);
    // Moved earlier: the new grant ends at the new date.
    let end = BASE_MS + HOUR_MS / 4;
    parent.donate(BASE_MS + 1, "k1", &child, 4, end);
    let grant = parent.grant("k1", "child");
    assert_eq!(grant.last().ends_at_ms(), end);
    child.accept(BASE_MS + 1, grant);
    child.checkouts(BASE_MS + 1, 4);
    child.apply(end - SKEW_MS, Command::Expire);
    assert_eq!(child.ledger.lease_count(), 0);
    // The parent counts the first (longer) grant until it lapses.
    parent.apply(end + SKEW_MS, Command::Expire);
    assert_eq!(parent.view("k1").donated, 4);
    parent.apply(BASE_MS + HOUR_MS + SKEW_MS, Command::Expire);
    assert_eq!(parent.view("k1").donated, 0);
    assert!(parent.ledger.donations().is_empty(), "past its end date");
}

#[test]
fn snapshots_keep_donations_received_grants_and_serials() {
    let (mut parent, mut child, _) = network();
    parent.donate(BASE_MS, "k1", &child, 4, BASE_MS + 100 * HOUR_MS);
    child.accept(BASE_MS, parent.grant("k1", "child"));
    child.checkouts(BASE_MS, 2);
    for server in [&parent, &child] {
        let config = server.ledger.config().clone();
        let restored = Ledger::restore_json(config, &server.ledger.snapshot_json()).unwrap();
        restored.check_invariants().unwrap();
        assert_eq!(restored.snapshot(), server.ledger.snapshot());
        assert_eq!(restored.next_expiry_ms(), server.ledger.next_expiry_ms());
    }
    let config = child.ledger.config().clone();
    child.ledger = Ledger::restore(config, child.ledger.snapshot());
    assert_eq!(child.view("k1@parent").in_use, 2);
    assert_eq!(parent.view("k1").donated, 4);
}

#[test]
fn a_key_bound_to_the_donor_needs_its_certificate_in_the_chain() {
    let mut parent = Server::new("parent", 11);
    let child = Server::new("child", 12);
    let bound = super::key_for("k2", &["cad"], 5, BASE_MS + 1000 * HOUR_MS, Some("parent"));
    let outcome = parent.apply(BASE_MS, Command::ImportKey { key: bound });
    assert!(
        matches!(outcome, Outcome::KeyImported { .. }),
        "{outcome:?}"
    );
    // Never synchronized: no certificate to prove the key's server ID is this key pair.
    let refused = parent.apply(
        BASE_MS,
        Command::Donate {
            key_id: "k2".into(),
            to: child.id.clone(),
            receiver_public_key: child.public().to_base64(),
            licenses: 1,
            until_ms: BASE_MS + HOUR_MS,
            renewal_period_ms: HOUR_MS,
        },
    );
    assert_eq!(refusal(refused).code(), "donation_refused");
}

/// The cap on the renewal period (docs/security.md, T7): a donor that signs a grant for 30
/// days (a modified donor, or one from before the cap) is used by the receiver at most 7
/// days after it accepted it; its leases never run past that.
#[test]
fn a_grant_signed_for_longer_than_the_cap_is_used_seven_days_at_most() {
    const DAY_MS: i64 = 24 * HOUR_MS;
    let (mut parent, mut child, _) = network();
    let outcome = parent.apply(
        BASE_MS,
        Command::Donate {
            key_id: "k1".into(),
            to: child.id.clone(),
            receiver_public_key: child.public().to_base64(),
            licenses: 4,
            until_ms: BASE_MS + 40 * DAY_MS,
            renewal_period_ms: 30 * DAY_MS,
        },
    );
    assert!(matches!(outcome, Outcome::Donated { .. }), "{outcome:?}");
    let accepted_at = BASE_MS + 1_000;
    child.accept(accepted_at, parent.grant("k1", "child"));
    let end = accepted_at + 7 * DAY_MS - SKEW_MS;
    assert_eq!(child.checkouts(end - 10_000, 1), 1);
    assert_eq!(child.ledger.leases()[0].expires_at_ms, end);
    child.apply(end, Command::Expire);
    assert_eq!(child.ledger.lease_count(), 0);
    assert_eq!(
        refusal(child.apply(end, checkout("late", "ws-late", "cad"))).code(),
        "component_not_licensed"
    );
}
