//! Signed lease tokens: what a license server states about a lease, and how the vendor's
//! application checks it against the vendor root it embeds (format in `docs/formats.md`).
//!
//! A token is `BASE64URL(payload JSON) "." BASE64URL(Ed25519 signature)`, the signature by
//! the serving server's identity key over `tessera-lease-token/v1\n || payload JSON bytes`
//! (the bytes as sent: the verifier checks them before it parses them). With the token the
//! server sends what is needed to check it offline: the vendor-signed license key, its
//! vendor certificate (when it has one), and for licenses donated by a neighbour the grant
//! chain. [`verify_lease`] accepts a lease only if every check passes; each failure names
//! its check ([`Untrusted::check`]).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::grant::Grant;
use crate::identity::{PublicKey, SecretKey};
use crate::key::LicenseKey;
use crate::sync::ServerCertificate;

pub const LEASE_TOKEN_FORMAT: &str = "tessera-lease-token";
pub const LEASE_TOKEN_VERSION: u32 = 1;
const SIGNING_CONTEXT: &[u8] = b"tessera-lease-token/v1\n";

/// What the server states about one lease at one moment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseTokenPayload {
    pub format: String,
    pub version: u32,
    pub lease_id: String,
    /// The vendor key the license comes from (for a donated one, the donor's vendor key).
    pub key_id: String,
    /// The component asked for, and every component the lease covers.
    pub component: String,
    pub components: Vec<String>,
    pub station: String,
    pub user: String,
    pub host: String,
    /// The nonce the client sent with this checkout or heartbeat (empty: none sent).
    pub nonce: String,
    pub issued_at: Timestamp,
    /// The lease's expiry: the application holds the license until then.
    pub valid_until: Timestamp,
    pub server_id: String,
    /// The serving server's identity key, base64 (the token's signer).
    pub server_public_key: String,
}

impl LeaseTokenPayload {
    /// Signs the payload with the server's identity key: the token string.
    pub fn issue(&self, identity: &SecretKey) -> String {
        let json = serde_json::to_vec(self).expect("payload serializes");
        let mut signed = SIGNING_CONTEXT.to_vec();
        signed.extend_from_slice(&json);
        let signature = identity.sign_base64(&signed);
        let signature = base64::engine::general_purpose::STANDARD
            .decode(signature)
            .expect("our own base64");
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(json),
            URL_SAFE_NO_PAD.encode(signature)
        )
    }
}

/// What the client holds to check a lease: the server's answer, and what it sent.
pub struct LeaseEvidence<'a> {
    pub token: &'a str,
    /// The vendor-signed license key the server sent (its JSON).
    pub license_key: Option<&'a str>,
    /// The server's vendor certificate (its JSON), if the server sent one.
    pub server_certificate: Option<&'a str>,
    /// The grant chain (its JSON) for a license donated by a neighbour.
    pub grant: Option<&'a str>,
    /// The component the application asked for.
    pub component: &'a str,
    /// The nonce the client sent with this request.
    pub nonce: &'a str,
    /// The client's clock, and how far it may disagree with the server's.
    pub now_ms: i64,
    pub tolerance_ms: i64,
}

/// Why a lease is not accepted: the check that failed, and the detail.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("lease_untrusted ({check}): {detail}")]
pub struct Untrusted {
    /// `token`, `key`, `component`, `signature`, `nonce`, `expired`, `certificate` or
    /// `grant`.
    pub check: &'static str,
    pub detail: String,
}

fn untrusted(check: &'static str, detail: impl Into<String>) -> Untrusted {
    Untrusted {
        check,
        detail: detail.into(),
    }
}

/// Checks a lease against the vendor's root key. Accepted only if: the token parses and is
/// signed by the server key it names; the license key is signed by `vendor_root`, is the
/// key the token names and covers the component asked for; the token carries the nonce this
/// client sent; it is not expired by the client's clock (within the tolerance); and, when
/// the key is bound to a server ID or requires a certified server, the signing key is the
/// one the vendor certified for that server ID (still valid), or the last receiver of a
/// grant chain verified down to the vendor.
pub fn verify_lease(
    evidence: &LeaseEvidence<'_>,
    vendor_root: &PublicKey,
) -> Result<LeaseTokenPayload, Untrusted> {
    let (payload_b64, signature_b64) = evidence
        .token
        .split_once('.')
        .ok_or_else(|| untrusted("token", "the lease token is not PAYLOAD.SIGNATURE"))?;
    let json = URL_SAFE_NO_PAD
        .decode(payload_b64)
        .map_err(|e| untrusted("token", format!("the token payload is not base64url: {e}")))?;
    let signature = URL_SAFE_NO_PAD.decode(signature_b64).map_err(|e| {
        untrusted(
            "token",
            format!("the token signature is not base64url: {e}"),
        )
    })?;
    let payload: LeaseTokenPayload = serde_json::from_slice(&json)
        .map_err(|e| untrusted("token", format!("the token payload is malformed: {e}")))?;
    if payload.format != LEASE_TOKEN_FORMAT || payload.version != LEASE_TOKEN_VERSION {
        return Err(untrusted(
            "token",
            format!(
                "unsupported token format {} version {}",
                payload.format, payload.version
            ),
        ));
    }
    let server_key = PublicKey::from_base64(&payload.server_public_key)
        .map_err(|e| untrusted("signature", format!("the server key is not valid: {e}")))?;
    let mut signed = SIGNING_CONTEXT.to_vec();
    signed.extend_from_slice(&json);
    let signature = base64::engine::general_purpose::STANDARD.encode(signature);
    if !matches!(server_key.verify_base64(&signed, &signature), Ok(true)) {
        return Err(untrusted(
            "signature",
            "the lease token is not signed by the server key it names: forged or altered",
        ));
    }
    let key_text = evidence
        .license_key
        .ok_or_else(|| untrusted("key", "the answer carries no license key"))?;
    let key = LicenseKey::from_json(key_text)
        .map_err(|e| untrusted("key", format!("the license key is malformed: {e}")))?;
    let key_payload = key
        .verify(std::slice::from_ref(vendor_root))
        .map_err(|e| untrusted("key", format!("not a license of this vendor: {e}")))?;
    if key_payload.key_id != payload.key_id {
        return Err(untrusted(
            "key",
            format!(
                "the token names key {} but the answer carries key {}",
                payload.key_id, key_payload.key_id
            ),
        ));
    }
    if !key_payload.covers(evidence.component)
        || payload.component != evidence.component
        || !payload.components.iter().any(|c| c == evidence.component)
    {
        return Err(untrusted(
            "component",
            format!(
                "key {} does not license component {:?} for this lease",
                key_payload.key_id, evidence.component
            ),
        ));
    }
    if payload.nonce.is_empty() || payload.nonce != evidence.nonce {
        return Err(untrusted(
            "nonce",
            "the token does not carry the nonce this client sent: an old answer played back",
        ));
    }
    let now = evidence.now_ms;
    let tolerance = evidence.tolerance_ms.max(0);
    if payload
        .valid_until
        .as_millisecond()
        .saturating_add(tolerance)
        <= now
    {
        return Err(untrusted(
            "expired",
            format!("the lease token ended at {}", payload.valid_until),
        ));
    }
    if payload.issued_at.as_millisecond() > now.saturating_add(tolerance) {
        return Err(untrusted(
            "expired",
            format!(
                "the lease token is issued at {}, later than this client's clock allows",
                payload.issued_at
            ),
        ));
    }
    if key_payload.valid_until_ms().saturating_add(tolerance) <= now {
        return Err(untrusted(
            "key",
            format!("license key {} has expired", key_payload.key_id),
        ));
    }
    let bound = key_payload.server_id.clone();
    if bound.is_some() || key_payload.certified_server_required {
        match evidence.grant {
            Some(grant_text) => {
                let grant: Grant = serde_json::from_str(grant_text)
                    .map_err(|e| untrusted("grant", format!("the grant is malformed: {e}")))?;
                if grant.key != key {
                    return Err(untrusted(
                        "grant",
                        "the grant is for another license key than the answer's",
                    ));
                }
                let last = grant
                    .verify(
                        std::slice::from_ref(vendor_root),
                        &payload.server_id,
                        &server_key,
                        now,
                    )
                    .map_err(|e| untrusted("grant", e.to_string()))?;
                if !last.components.iter().any(|c| c == evidence.component) {
                    return Err(untrusted(
                        "grant",
                        format!(
                            "the grant to server {} does not cover component {:?}",
                            payload.server_id, evidence.component
                        ),
                    ));
                }
                // A key any server may use, but only a certified one: the chain must start
                // at a certified donor (bound keys check that in `Grant::verify`).
                if bound.is_none() && grant.certificate.is_none() {
                    return Err(untrusted(
                        "certificate",
                        "the key requires a certified server, and the grant's first donor has no vendor certificate",
                    ));
                }
                if let (None, Some(certificate)) = (&bound, &grant.certificate) {
                    check_certificate(
                        certificate,
                        vendor_root,
                        &grant.links[0].payload.donor,
                        &grant.links[0].payload.donor_public_key,
                        now,
                    )?;
                }
            }
            None => {
                let text = evidence.server_certificate.ok_or_else(|| {
                    untrusted(
                        "certificate",
                        format!(
                            "key {} needs a server the vendor certified, and this server has no certificate",
                            key_payload.key_id
                        ),
                    )
                })?;
                let certificate: ServerCertificate = serde_json::from_str(text).map_err(|e| {
                    untrusted("certificate", format!("the certificate is malformed: {e}"))
                })?;
                let expected_id = bound.as_deref().unwrap_or(&payload.server_id);
                check_certificate(
                    &certificate,
                    vendor_root,
                    expected_id,
                    &payload.server_public_key,
                    now,
                )?;
                if payload.server_id != expected_id {
                    return Err(untrusted(
                        "certificate",
                        format!(
                            "key {} is issued to server {expected_id}, but server {} answered",
                            key_payload.key_id, payload.server_id
                        ),
                    ));
                }
            }
        }
    }
    Ok(payload)
}

/// The certificate is the vendor's, for `server_id` and `public_key`, and still valid.
fn check_certificate(
    certificate: &ServerCertificate,
    vendor_root: &PublicKey,
    server_id: &str,
    public_key: &str,
    now_ms: i64,
) -> Result<(), Untrusted> {
    let certified = certificate
        .verify(std::slice::from_ref(vendor_root))
        .map_err(|e| untrusted("certificate", format!("not this vendor's certificate: {e}")))?;
    if certified.server_id != server_id || certified.public_key != public_key {
        return Err(untrusted(
            "certificate",
            format!(
                "the vendor certified server {} with another key: the answering server is not it",
                certified.server_id
            ),
        ));
    }
    if certificate.valid_until_ms() <= now_ms {
        return Err(untrusted(
            "certificate",
            format!(
                "the certificate of server {} expired at {}",
                certified.server_id, certified.valid_until
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::tests::payload as key_payload;
    use crate::sync::CertificatePayload;

    const NOW: i64 = 1_800_000_000_000;

    struct World {
        vendor: SecretKey,
        server: SecretKey,
        key: LicenseKey,
        certificate: ServerCertificate,
    }

    fn world(bound: Option<&str>) -> World {
        let vendor = SecretKey::from_seed([1; 32]);
        let server = SecretKey::from_seed([2; 32]);
        let mut payload = key_payload("k1", &["cad"], 5);
        payload.server_id = bound.map(str::to_string);
        let key = LicenseKey::sign(payload, &vendor).unwrap();
        let certificate = ServerCertificate::sign(
            CertificatePayload {
                server_id: "LS-1".into(),
                customer: "acme".into(),
                public_key: server.public_key().to_base64(),
                issued_at: Timestamp::from_millisecond(NOW - 1000).unwrap(),
                valid_until: Timestamp::from_millisecond(NOW + 86_400_000).unwrap(),
            },
            &vendor,
        );
        World {
            vendor,
            server,
            key,
            certificate,
        }
    }

    fn token(world: &World, signer: &SecretKey, nonce: &str, valid_until_ms: i64) -> String {
        LeaseTokenPayload {
            format: LEASE_TOKEN_FORMAT.into(),
            version: LEASE_TOKEN_VERSION,
            lease_id: "lease-1".into(),
            key_id: world.key.payload.key_id.clone(),
            component: "cad".into(),
            components: vec!["cad".into()],
            station: "ws-1".into(),
            user: "ann".into(),
            host: "fp".into(),
            nonce: nonce.into(),
            issued_at: Timestamp::from_millisecond(NOW - 10).unwrap(),
            valid_until: Timestamp::from_millisecond(valid_until_ms).unwrap(),
            server_id: "LS-1".into(),
            server_public_key: signer.public_key().to_base64(),
        }
        .issue(signer)
    }

    fn check(
        world: &World,
        token: &str,
        key: &str,
        certificate: Option<&str>,
        nonce: &str,
    ) -> Result<LeaseTokenPayload, Untrusted> {
        verify_lease(
            &LeaseEvidence {
                token,
                license_key: Some(key),
                server_certificate: certificate,
                grant: None,
                component: "cad",
                nonce,
                now_ms: NOW,
                tolerance_ms: 5_000,
            },
            &world.vendor.public_key(),
        )
    }

    #[test]
    fn a_lease_of_this_vendor_signed_by_the_server_with_the_nonce_sent_is_accepted() {
        let w = world(None);
        let key = w.key.to_json_pretty();
        let t = token(&w, &w.server, "n1", NOW + 60_000);
        let accepted = check(&w, &t, &key, None, "n1").unwrap();
        assert_eq!(accepted.lease_id, "lease-1");
    }

    #[test]
    fn each_check_refuses_what_it_guards_and_names_itself() {
        let w = world(None);
        let key = w.key.to_json_pretty();
        let good = token(&w, &w.server, "n1", NOW + 60_000);
        // A customer's own vendor key.
        let other_vendor = SecretKey::from_seed([9; 32]);
        let own_key = LicenseKey::sign(key_payload("k1", &["cad"], 500), &other_vendor)
            .unwrap()
            .to_json_pretty();
        assert_eq!(
            check(&w, &good, &own_key, None, "n1").unwrap_err().check,
            "key"
        );
        // Replayed: an old answer for another nonce.
        assert_eq!(
            check(&w, &good, &key, None, "n2").unwrap_err().check,
            "nonce"
        );
        // Expired by the client's clock.
        let old = token(&w, &w.server, "n1", NOW - 10_000);
        assert_eq!(
            check(&w, &old, &key, None, "n1").unwrap_err().check,
            "expired"
        );
        // Within the tolerance it still counts.
        let just = token(&w, &w.server, "n1", NOW - 1_000);
        assert!(check(&w, &just, &key, None, "n1").is_ok());
        // Altered after signing: the payload says more than was signed.
        let (payload, signature) = good.split_once('.').unwrap();
        let mut json: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        json["valid_until"] = "2099-01-01T00:00:00Z".into();
        let forged = format!(
            "{}.{signature}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&json).unwrap())
        );
        assert_eq!(
            check(&w, &forged, &key, None, "n1").unwrap_err().check,
            "signature"
        );
        // Garbage.
        assert_eq!(
            check(&w, "nonsense", &key, None, "n1").unwrap_err().check,
            "token"
        );
        // Another component than the key licenses.
        let refused = verify_lease(
            &LeaseEvidence {
                token: &good,
                license_key: Some(&key),
                server_certificate: None,
                grant: None,
                component: "cam",
                nonce: "n1",
                now_ms: NOW,
                tolerance_ms: 0,
            },
            &w.vendor.public_key(),
        );
        assert_eq!(refused.unwrap_err().check, "component");
    }

    #[test]
    fn a_donated_license_of_a_bound_key_is_accepted_through_its_grant_chain() {
        use crate::grant::{GrantPayload, GrantSource};
        let w = world(Some("LS-1"));
        let key = w.key.to_json_pretty();
        // LS-1 (certified) donates to child "branch", which serves the application.
        let child = SecretKey::from_seed([3; 32]);
        let grant = Grant::issue(
            GrantSource::Key {
                key: &w.key,
                certificate: Some(&w.certificate),
            },
            GrantPayload {
                key_id: "k1".into(),
                donor: "LS-1".into(),
                donor_public_key: w.server.public_key().to_base64(),
                receiver: "branch".into(),
                receiver_public_key: child.public_key().to_base64(),
                components: vec!["cad".into()],
                licenses: 2,
                serial: 1,
                issued_at: Timestamp::from_millisecond(NOW - 1000).unwrap(),
                lease_until: Timestamp::from_millisecond(NOW + 3_600_000).unwrap(),
                donation_until: Timestamp::from_millisecond(NOW + 3_600_000).unwrap(),
                prev_serial: None,
            },
            &w.server,
        );
        let grant_text = serde_json::to_string(&grant).unwrap();
        let mut payload: LeaseTokenPayload = {
            let t = token(&w, &child, "n1", NOW + 60_000);
            let json = URL_SAFE_NO_PAD
                .decode(t.split_once('.').unwrap().0)
                .unwrap();
            serde_json::from_slice(&json).unwrap()
        };
        payload.server_id = "branch".into();
        let evidence = |token: &str, grant: Option<&str>| {
            verify_lease(
                &LeaseEvidence {
                    token,
                    license_key: Some(&key),
                    server_certificate: None,
                    grant,
                    component: "cad",
                    nonce: "n1",
                    now_ms: NOW,
                    tolerance_ms: 0,
                },
                &w.vendor.public_key(),
            )
        };
        let good = payload.issue(&child);
        assert!(evidence(&good, Some(&grant_text)).is_ok());
        assert_eq!(evidence(&good, None).unwrap_err().check, "certificate");
        // A server claiming to be the receiver without its key.
        let other = SecretKey::from_seed([8; 32]);
        payload.server_public_key = other.public_key().to_base64();
        let forged = payload.issue(&other);
        assert_eq!(
            evidence(&forged, Some(&grant_text)).unwrap_err().check,
            "grant"
        );
    }

    #[test]
    fn a_bound_key_is_accepted_only_from_the_server_the_vendor_certified() {
        let w = world(Some("LS-1"));
        let key = w.key.to_json_pretty();
        let certificate = serde_json::to_string(&w.certificate).unwrap();
        let t = token(&w, &w.server, "n1", NOW + 60_000);
        assert!(check(&w, &t, &key, Some(&certificate), "n1").is_ok());
        // No certificate: an uncertified server serving a bound key.
        assert_eq!(
            check(&w, &t, &key, None, "n1").unwrap_err().check,
            "certificate"
        );
        // A server that copied the server ID but has its own identity key.
        let impostor = SecretKey::from_seed([7; 32]);
        let t = token(&w, &impostor, "n1", NOW + 60_000);
        assert_eq!(
            check(&w, &t, &key, Some(&certificate), "n1")
                .unwrap_err()
                .check,
            "certificate"
        );
    }
}
