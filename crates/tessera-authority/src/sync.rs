//! Answering a sync request: the binding rule, the replay rule, and the response.
//!
//! The rules, in order:
//! 1. The request must be signed by the key it carries (proof of possession).
//! 2. The server ID must be registered (`unknown_server`).
//! 3. An unbound ID is bound to the request's key; an ID bound to another key is refused
//!    (`server_id_in_use`) until the vendor resets it. So a server ID that leaks is useless
//!    without the key pair that first synchronized it.
//! 4. The sequence must be above the last one answered (`replayed_request`), so a captured
//!    request cannot be played again to obtain a fresh certificate.
//! 5. The request's stated time (`created_at`) must be near the authority's clock
//!    ([`check_clock`]): a server whose clock is wrong is refused (`server_clock_skewed`)
//!    and recorded as an alert, so a shifted clock is neither re-certified nor unnoticed.
//! 6. The sync chain must hold ([`crate::chain`]): a clone or a rollback of the server's data
//!    is refused (`server_cloned`, `server_rolled_back`) and recorded as an alert, in its
//!    own committed transaction.
//! 7. The answer carries a certificate valid 366 days from now, the live keys issued to the
//!    ID, the revoked ids, and the renewal keys held for it; the server row records the
//!    sequence and the time, the chain the new link. All of it in one transaction: either
//!    the server's state moved and it got the signed answer, or neither.

use rusqlite::{Connection, TransactionBehavior, params};
use tessera_core::sync::{
    CERTIFICATE_VALIDITY_DAYS, CertificatePayload, MAX_CLOCK_SKEW_MS, SERVER_CLOCK_SKEWED,
    ServerCertificate, SyncError, SyncRequest, SyncResponse, SyncResponsePayload,
};
use tessera_core::{PublicKey, SecretKey};

use crate::chain::{self, Claim, FaultKind, Step};
use crate::error::AuthorityError;
use crate::history;
use crate::links;
use crate::registry;
use crate::store::{self, DAY_MS, ServerRow, timestamp};

/// What accepting a request does to the server ID's binding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binding {
    /// First sync (or first after a reset): bind the request's key.
    Bind,
    /// Already bound to the request's key.
    Keep,
}

/// Rules 3 and 4, on the server's row as stored. Pure, so the rule is testable on its own.
pub fn check_binding(
    server: &ServerRow,
    offered: &PublicKey,
    sequence: u64,
) -> Result<Binding, AuthorityError> {
    let binding = match &server.public_key {
        None => Binding::Bind,
        // Compared as keys, not as base64 text, so an equivalent encoding cannot slip by.
        Some(bound) => match PublicKey::from_base64(bound) {
            Ok(bound) if bound == *offered => Binding::Keep,
            Ok(bound) => {
                return Err(AuthorityError::ServerIdInUse {
                    server_id: server.server_id.clone(),
                    bound_fingerprint: bound.fingerprint(),
                    offered_fingerprint: offered.fingerprint(),
                });
            }
            Err(error) => {
                return Err(AuthorityError::Internal(format!(
                    "stored public key of {}: {error}",
                    server.server_id
                )));
            }
        },
    };
    // After a (re)binding the count restarts, so only a kept binding can replay.
    if binding == Binding::Keep && sequence <= server.last_sequence {
        return Err(AuthorityError::ReplayedRequest {
            server_id: server.server_id.clone(),
            sequence,
            last_sequence: server.last_sequence,
        });
    }
    if sequence == 0 {
        return Err(AuthorityError::invalid(
            "a sync request's sequence starts at 1",
        ));
    }
    Ok(binding)
}

/// How a request reached the authority.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    /// `POST /v1/sync`: sent by the server the moment it was made.
    Online,
    /// `POST /v1/sync/process`: a request file, which may have been carried for days.
    File,
}

/// Rule 5, pure: a request's stated time may be at most a day ahead of the authority's
/// clock; an online request at most a day behind; a request file at most 366 days behind
/// (older, it is past any certificate it could renew). `Err` holds why.
pub fn check_clock(channel: Channel, stated_ms: i64, now_ms: i64) -> Result<(), ClockSkew> {
    let hours = |ms: i64| ms / 3_600_000;
    if stated_ms > now_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
        return Err(ClockSkew::Ahead {
            hours: hours(stated_ms - now_ms),
            allowed_hours: hours(MAX_CLOCK_SKEW_MS),
        });
    }
    let (limit, what) = match channel {
        Channel::Online => (MAX_CLOCK_SKEW_MS, "an online request"),
        Channel::File => (CERTIFICATE_VALIDITY_DAYS * DAY_MS, "a request file"),
    };
    if stated_ms < now_ms.saturating_sub(limit) {
        return Err(ClockSkew::Behind {
            hours: hours(now_ms - stated_ms),
            what,
            allowed_hours: hours(limit),
        });
    }
    Ok(())
}

/// How far a request's stated time is from the authority's clock ([`check_clock`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClockSkew {
    #[error("{hours} hours ahead; at most {allowed_hours} allowed")]
    Ahead { hours: i64, allowed_hours: i64 },
    #[error("{hours} hours behind; {what} may be at most {allowed_hours} hours behind")]
    Behind {
        hours: i64,
        what: &'static str,
        allowed_hours: i64,
    },
}

/// Rule 1: the request is signed by the key it carries.
fn verify_request(request: &SyncRequest) -> Result<PublicKey, AuthorityError> {
    match request.verify() {
        Ok((_, key)) => Ok(key),
        Err(SyncError::UnsupportedFormat {
            format, version, ..
        }) => Err(AuthorityError::UnsupportedFormat { format, version }),
        Err(SyncError::BadSignature { .. }) => Err(AuthorityError::BadSignature),
        Err(other) => Err(AuthorityError::invalid(other.to_string())),
    }
}

/// Answers one sync request at `now_ms`; see the module documentation for the rules.
pub fn answer(
    connection: &mut Connection,
    vendor: &SecretKey,
    request: &SyncRequest,
    channel: Channel,
    now_ms: i64,
) -> Result<SyncResponse, AuthorityError> {
    let offered = verify_request(request)?;
    let asked = &request.payload;
    // SQLite integers are signed; a larger sequence could never be stored.
    let sequence = i64::try_from(asked.sequence).map_err(|_| {
        AuthorityError::invalid(format!("sequence {} is out of range", asked.sequence))
    })?;
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let server = store::server(&transaction, &asked.server_id)?;
    let binding = match check_binding(&server, &offered, asked.sequence) {
        Ok(binding) => binding,
        Err(refusal) => {
            tracing::warn!(
                server_id = asked.server_id,
                code = refusal.code(),
                "sync refused"
            );
            return Err(refusal);
        }
    };
    let claim = Claim::of(asked);
    if let Err(skew) = check_clock(channel, asked.created_at.as_millisecond(), now_ms) {
        let detail = skew.to_string();
        chain::record_alert(
            &transaction,
            &server.server_id,
            SERVER_CLOCK_SKEWED,
            Some(claim),
            &detail,
            now_ms,
        )?;
        transaction.commit()?;
        tracing::warn!(
            server_id = asked.server_id,
            code = SERVER_CLOCK_SKEWED,
            detail,
            "sync refused: the server's clock is wrong"
        );
        return Err(AuthorityError::ServerClockSkewed {
            server_id: server.server_id,
            stated: asked.created_at.to_string(),
            now: timestamp(now_ms)?.to_string(),
            detail,
        });
    }
    // A new binding (first sync, or after a reset) starts a new chain.
    let links = match binding {
        Binding::Bind => {
            chain::clear(&transaction, &server.server_id, now_ms)?;
            Vec::new()
        }
        Binding::Keep => chain::load(&transaction, &server.server_id)?,
    };
    let step = match chain::judge(&links, claim) {
        Ok(step) => step,
        Err(fault) => {
            let code = fault.kind.code();
            chain::record_alert(
                &transaction,
                &server.server_id,
                code,
                Some(claim),
                &fault.detail,
                now_ms,
            )?;
            transaction.commit()?;
            tracing::warn!(
                server_id = asked.server_id,
                code,
                detail = fault.detail,
                "sync refused: sync chain broken"
            );
            let (server_id, detail) = (server.server_id, fault.detail);
            return Err(match fault.kind {
                FaultKind::Cloned => AuthorityError::ServerCloned { server_id, detail },
                FaultKind::RolledBack => AuthorityError::ServerRolledBack { server_id, detail },
            });
        }
    };

    let keys = store::keys_where(
        &transaction,
        "server_id = ?1 AND renews IS NULL AND revoked_at_ms IS NULL AND valid_until_ms > ?2",
        params![server.server_id, now_ms],
    )?;
    let renewals = store::keys_where(
        &transaction,
        "server_id = ?1 AND renews IS NOT NULL AND revoked_at_ms IS NULL AND valid_until_ms > ?2",
        params![server.server_id, now_ms],
    )?;
    // A revoked key that has expired anyway needs no notice, unless the server still lists
    // it: this keeps the list bounded over years of revocations.
    let revoked: Vec<String> = store::keys_where(
        &transaction,
        "server_id = ?1 AND revoked_at_ms IS NOT NULL",
        params![server.server_id],
    )?
    .into_iter()
    .filter(|row| row.valid_until_ms > now_ms || asked.keys.contains(&row.key_id))
    .map(|row| row.key_id)
    .collect();

    let countersigned = judge_history(
        &transaction,
        &server.server_id,
        asked,
        claim,
        vendor,
        now_ms,
    )?;

    let now = timestamp(now_ms)?;
    // A file may wait weeks for its answer to be carried back: 366 days, the reference's
    // rule. A server that syncs online does so daily: a short certificate, so a clone or a
    // copy cut off from the vendor stops soon (docs/security.md).
    let certificate_days = match channel {
        Channel::Online => registry::online_certificate_days(&transaction, &server.customer)?,
        Channel::File => CERTIFICATE_VALIDITY_DAYS,
    };
    let valid_until_ms = now_ms + certificate_days * DAY_MS;
    let certificate = ServerCertificate::sign(
        CertificatePayload {
            server_id: server.server_id.clone(),
            customer: server.customer.clone(),
            public_key: offered.to_base64(),
            issued_at: now,
            valid_until: timestamp(valid_until_ms)?,
        },
        vendor,
    );
    let response = SyncResponse::sign(
        SyncResponsePayload {
            server_id: server.server_id.clone(),
            request_nonce: asked.nonce.clone(),
            sequence: asked.sequence,
            issued_at: now,
            certificate,
            keys: keys.into_iter().map(|row| row.key).collect(),
            revoked,
            renewals: renewals.into_iter().map(|row| row.key).collect(),
            countersigned,
        },
        vendor,
    );

    match binding {
        Binding::Bind => transaction.execute(
            "UPDATE servers SET public_key = ?2, bound_at_ms = ?3, last_sequence = ?4, \
                                last_sync_at_ms = ?3, certificate_valid_until_ms = ?5 WHERE server_id = ?1",
            params![server.server_id, offered.to_base64(), now_ms, sequence, valid_until_ms],
        )?,
        Binding::Keep => transaction.execute(
            "UPDATE servers SET last_sequence = ?2, last_sync_at_ms = ?3, \
                                certificate_valid_until_ms = ?4 WHERE server_id = ?1",
            params![server.server_id, sequence, now_ms, valid_until_ms],
        )?,
    };
    chain::record(
        &transaction,
        &server.server_id,
        &step,
        &response.chain_hash(),
        asked,
        now_ms,
    )?;
    transaction.commit()?;
    tracing::info!(
        server_id = server.server_id,
        chain = step_name(&step),
        sequence = asked.sequence,
        bound = binding == Binding::Bind,
        keys = response.payload.keys.len(),
        renewals = response.payload.renewals.len(),
        revoked = response.payload.revoked.len(),
        "sync answered"
    );
    Ok(response)
}

/// How many relayed receivers' heads one sync request is judged on.
const RELAYED_MAX: usize = 1024;

/// Judges what the request says about the server's own history (src/history.rs,
/// src/links.rs): rewritten logs, rewound counters, forged grants, foreign vendor keys.
/// Each finding is an alert, none a refusal. Returns the heads the response countersigns.
fn judge_history(
    transaction: &Connection,
    server_id: &str,
    asked: &tessera_core::sync::SyncRequestPayload,
    claim: Claim<'_>,
    vendor: &SecretKey,
    now_ms: i64,
) -> Result<Option<tessera_core::sync::Countersigned>, AuthorityError> {
    // Found here and recorded below; the link and trust judges record their own (once each).
    let mut found: Vec<(&'static str, String)> = Vec::new();
    let mut raised: Vec<(&'static str, String)> = Vec::new();
    // Servers that send history heads report their links (even none); older ones do not.
    if asked.history.is_some() {
        links::record(
            transaction,
            server_id,
            &asked.links,
            asked.created_at.as_millisecond(),
            now_ms,
        )?;
    }
    for detail in links::judge(transaction, &asked.links, now_ms)? {
        raised.push((links::GRANT_FORGED, detail));
    }
    if let (Some(counters), Some(installation)) = (&asked.counters, &asked.installation)
        && let Some(detail) =
            history::judge_counters(transaction, server_id, installation, counters, "sync")?
    {
        found.push((history::LEDGER_REWOUND, detail));
    }
    // What its receivers stated to this server: alerts on the receiver's server ID. Only for
    // a receiver this server reports donating to, of the same customer, and for a time the
    // authority has reached: a donor cannot plant points for anyone else's server.
    let customer = store::find_server(transaction, server_id)?.map(|row| row.customer);
    for relayed in asked.relayed.iter().take(RELAYED_MAX) {
        let receiver_of_ours = asked.links.iter().any(|link| {
            link.side == tessera_core::sync::LinkSide::Donor
                && link.donor == server_id
                && link.receiver == relayed.server_id
        });
        let same_customer = store::find_server(transaction, &relayed.server_id)?
            .is_some_and(|row| Some(&row.customer) == customer.as_ref());
        let in_time = relayed
            .heads
            .counters
            .as_of_ms
            .is_none_or(|as_of| as_of <= now_ms.saturating_add(MAX_CLOCK_SKEW_MS));
        if relayed.server_id == server_id || !receiver_of_ours || !same_customer || !in_time {
            continue;
        }
        let heads = &relayed.heads;
        if let Some(detail) = history::judge_counters(
            transaction,
            &relayed.server_id,
            &heads.installation,
            &heads.counters,
            server_id,
        )? {
            chain::record_alert(
                transaction,
                &relayed.server_id,
                history::LEDGER_REWOUND,
                None,
                &detail,
                now_ms,
            )?;
            tracing::warn!(
                server_id = relayed.server_id,
                relayed_by = server_id,
                detail,
                "a receiver's ledger, as its donor relays it, went back"
            );
        }
    }
    if let Some(trust) = &asked.trust {
        let ours = vendor.public_key().fingerprint();
        for detail in links::judge_trust(transaction, server_id, trust, &ours, now_ms)? {
            raised.push((links::VENDOR_KEY_ADDED, detail));
        }
    }
    let countersigned = match &asked.history {
        Some(heads) => {
            found.extend(history::judge(transaction, server_id, heads)?);
            Some(history::countersign(transaction, server_id, heads, now_ms)?)
        }
        None => None,
    };
    for (kind, detail) in &found {
        chain::record_alert(transaction, server_id, kind, Some(claim), detail, now_ms)?;
    }
    for (code, detail) in found.iter().chain(&raised) {
        tracing::warn!(
            server_id,
            code,
            detail,
            "the server's history does not match what the vendor holds"
        );
    }
    Ok(countersigned)
}

fn step_name(step: &Step) -> &'static str {
    match step {
        Step::Start => "started",
        Step::Extend { .. } => "extended",
        Step::Retry { .. } => "retried",
        Step::Unchained => "unchained",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(public_key: Option<&PublicKey>, last_sequence: u64) -> ServerRow {
        ServerRow {
            server_id: "LS-AAAA-BBBB".into(),
            customer: "acme".into(),
            created_at_ms: 0,
            public_key: public_key.map(PublicKey::to_base64),
            bound_at_ms: public_key.map(|_| 0),
            last_sequence,
            last_sync_at_ms: None,
            certificate_valid_until_ms: None,
        }
    }

    #[test]
    fn a_stated_time_far_from_the_authoritys_clock_is_refused() {
        let now = 1000 * DAY_MS;
        for channel in [Channel::Online, Channel::File] {
            assert!(check_clock(channel, now, now).is_ok());
            assert!(check_clock(channel, now + MAX_CLOCK_SKEW_MS, now).is_ok());
            assert!(check_clock(channel, now + 400 * DAY_MS, now).is_err());
        }
        assert!(check_clock(Channel::Online, now - 2 * DAY_MS, now).is_err());
        assert!(check_clock(Channel::File, now - 40 * DAY_MS, now).is_ok());
        assert!(check_clock(Channel::File, now - 367 * DAY_MS, now).is_err());
    }

    #[test]
    fn an_unbound_id_binds_the_first_key_that_asks() {
        let ours = SecretKey::from_seed([1; 32]).public_key();
        assert_eq!(
            check_binding(&row(None, 0), &ours, 1).unwrap(),
            Binding::Bind
        );
    }

    #[test]
    fn a_bound_id_keeps_its_key_and_refuses_any_other() {
        let ours = SecretKey::from_seed([1; 32]).public_key();
        let theirs = SecretKey::from_seed([2; 32]).public_key();
        let bound = row(Some(&ours), 3);
        assert_eq!(check_binding(&bound, &ours, 4).unwrap(), Binding::Keep);
        let error = check_binding(&bound, &theirs, 4).unwrap_err();
        assert_eq!(error.code(), "server_id_in_use");
        assert!(
            error
                .to_string()
                .contains("tessera authority server reset LS-AAAA-BBBB")
        );
    }

    #[test]
    fn sequences_not_above_the_last_answered_are_replays() {
        let ours = SecretKey::from_seed([1; 32]).public_key();
        let bound = row(Some(&ours), 3);
        for sequence in [0, 1, 3] {
            assert_eq!(
                check_binding(&bound, &ours, sequence).unwrap_err().code(),
                "replayed_request"
            );
        }
        assert_eq!(
            check_binding(&row(None, 0), &ours, 0).unwrap_err().code(),
            "invalid_request"
        );
    }
}
