//! Grants: signed, time-bounded donations of licenses from one license server to another.
//!
//! A grant document carries its whole chain back to the vendor:
//!
//! ```text
//! vendor ──signs──► license key ──(held by)──► donor ──signs──► link 1 (to child)
//!                                                  child ──signs──► link 2 (to grandchild) …
//! ```
//!
//! - `key` is the vendor-signed license key the licenses come from.
//! - `certificate` is the vendor's certificate of the first donor, required when the key is
//!   issued to a server ID: it proves that the first donor's public key belongs to that ID.
//! - `links` are the grants, root first. Each is signed by its donor's identity key and names
//!   the receiver by server ID *and* public key; the next link must be signed by that key.
//!   The last link is the grant to the server reading the document.
//!
//! A link never gives more than its parent: at most the parent's licenses, ending no later
//! than the parent's lease and donation end, for a subset of the key's components. Each
//! renewal of a donation is a new link with a higher `serial`; a receiver refuses a serial
//! lower than one it already accepted (replay), so an old, larger or longer grant cannot be
//! played back. Signatures cover `tessera-grant/v1\n || compact JSON of the payload`.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::identity::{PublicKey, SecretKey};
use crate::key::{LicenseKey, is_name};
use crate::sync::ServerCertificate;

pub const GRANT_FORMAT: &str = "tessera-grant";
pub const GRANT_FORMAT_VERSION: u32 = 1;
const SIGNING_CONTEXT: &[u8] = b"tessera-grant/v1\n";
/// How deep a chain of re-grants may go.
pub const GRANT_CHAIN_MAX: usize = 8;

/// One donation, as its donor signed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantPayload {
    /// The vendor key the licenses come from.
    pub key_id: String,
    /// Donor server ID and its identity key (base64).
    pub donor: String,
    pub donor_public_key: String,
    /// Receiver server ID and its identity key (base64).
    pub receiver: String,
    pub receiver_public_key: String,
    pub components: Vec<String>,
    pub licenses: u32,
    /// Increases with every renewal or change of the donation.
    pub serial: u64,
    pub issued_at: Timestamp,
    /// The grant lease: the donor renews it while the link lives; when it runs out the
    /// licenses return to the donor.
    pub lease_until: Timestamp,
    /// The donation end date set by the donor's administrator.
    pub donation_until: Timestamp,
    /// The serial of the grant the donor's ledger issued on this link (key, receiver) just
    /// before this one: the link's grants form a chain. A receiver holding a serial between
    /// `prev_serial` and `serial` holds a grant the donor's ledger never issued (signed with
    /// its key outside it, or the donor's ledger was put back): docs/security.md, T10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_serial: Option<u64>,
}

impl GrantPayload {
    fn signed_bytes(&self) -> Vec<u8> {
        let mut bytes = SIGNING_CONTEXT.to_vec();
        bytes.extend(serde_json::to_vec(self).expect("payload serializes"));
        bytes
    }

    pub fn lease_until_ms(&self) -> i64 {
        self.lease_until.as_millisecond()
    }

    pub fn donation_until_ms(&self) -> i64 {
        self.donation_until.as_millisecond()
    }

    /// When the grant ends, whichever comes first: the lease or the donation end date.
    pub fn ends_at_ms(&self) -> i64 {
        self.lease_until_ms().min(self.donation_until_ms())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantLink {
    pub payload: GrantPayload,
    /// Ed25519 signature by `payload.donor_public_key`, base64.
    pub signature: String,
}

/// The document a receiver gets: the key, the first donor's certificate, and the chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    pub format: String,
    pub version: u32,
    pub key: LicenseKey,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<ServerCertificate>,
    pub links: Vec<GrantLink>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum GrantError {
    #[error("the grant is not valid JSON of the expected shape: {detail}")]
    Malformed { detail: String },
    #[error("unsupported grant format `{format}` version {version}")]
    UnsupportedFormat { format: String, version: u32 },
    #[error("the license key in the grant is not valid: {reason}")]
    BadKey {
        reason: String,
        /// The key's vendor is not on this server's trust list (see
        /// [`KeyError::is_untrusted_vendor`](crate::KeyError::is_untrusted_vendor)).
        #[serde(default)]
        untrusted_vendor: bool,
    },
    #[error("grant link {link} has an invalid signature: it was forged or altered")]
    BadSignature { link: usize },
    #[error("grant link {link} is invalid: {reason}")]
    Invalid { link: usize, reason: String },
    #[error(
        "grant link {link} gives {licenses} licenses of key {key_id}, more than its donor holds ({allowed})"
    )]
    Inflated {
        link: usize,
        key_id: String,
        licenses: u32,
        allowed: u32,
    },
    #[error("the grant of key {key_id} from {donor} ended at {ended_at}")]
    Expired {
        key_id: String,
        donor: String,
        ended_at: String,
    },
    #[error(
        "the grant is for license server {receiver} ({receiver_key}), not for this server ({this_server})"
    )]
    OtherReceiver {
        receiver: String,
        receiver_key: String,
        this_server: String,
    },
    #[error(
        "the grant of key {key_id} from {donor} has serial {serial}, older than serial {accepted} already accepted: it is replayed"
    )]
    Replayed {
        key_id: String,
        donor: String,
        serial: u64,
        accepted: u64,
    },
    #[error(
        "the grant of key {key_id} from {donor} has serial {serial}, ahead of this server's clock ({now_ms} ms): a donor numbers its grants by its own time, so its ledger did not issue this one"
    )]
    SerialAhead {
        key_id: String,
        donor: String,
        serial: u64,
        now_ms: i64,
    },
}

impl GrantError {
    pub fn code(&self) -> &'static str {
        match self {
            GrantError::Malformed { .. } => "grant_malformed",
            GrantError::UnsupportedFormat { .. } => "grant_unsupported_format",
            GrantError::BadKey { .. } => "grant_bad_key",
            GrantError::BadSignature { .. } => "grant_bad_signature",
            GrantError::Invalid { .. } => "grant_invalid",
            GrantError::Inflated { .. } => "grant_inflated",
            GrantError::Expired { .. } => "grant_expired",
            GrantError::OtherReceiver { .. } => "grant_other_receiver",
            GrantError::Replayed { .. } => "grant_replayed",
            GrantError::SerialAhead { .. } => "grant_serial_ahead",
        }
    }
}

/// Where a new link starts from: the donor's own vendor key, or a grant it received.
#[derive(Clone, Debug)]
pub enum GrantSource<'a> {
    Key {
        key: &'a LicenseKey,
        certificate: Option<&'a ServerCertificate>,
    },
    Received(&'a Grant),
}

impl Grant {
    /// Signs a new link with the donor's identity key and appends it to the source's chain.
    pub fn issue(source: GrantSource<'_>, payload: GrantPayload, donor: &SecretKey) -> Grant {
        let signature = donor.sign_base64(&payload.signed_bytes());
        let link = GrantLink { payload, signature };
        match source {
            GrantSource::Key { key, certificate } => Grant {
                format: GRANT_FORMAT.into(),
                version: GRANT_FORMAT_VERSION,
                key: key.clone(),
                certificate: certificate.cloned(),
                links: vec![link],
            },
            GrantSource::Received(parent) => {
                let mut grant = parent.clone();
                grant.links.push(link);
                grant
            }
        }
    }

    pub fn from_json(text: &str) -> Result<Grant, GrantError> {
        serde_json::from_str(text).map_err(|error| GrantError::Malformed {
            detail: error.to_string(),
        })
    }

    /// The grant to the holder of this document: the last link.
    pub fn last(&self) -> &GrantPayload {
        &self
            .links
            .last()
            .expect("a verified grant has links")
            .payload
    }

    /// Verifies the whole chain: the vendor's key, the first donor's certificate where the
    /// key is bound to a server ID, every link's signature and bounds, and that the last
    /// link is for `receiver` holding `receiver_key`, still running at `at_ms`. Replay is
    /// the ledger's business (it knows the serials already accepted).
    pub fn verify(
        &self,
        trusted: &[PublicKey],
        receiver: &str,
        receiver_key: &PublicKey,
        at_ms: i64,
    ) -> Result<&GrantPayload, GrantError> {
        let last = self.verify_signed(trusted, receiver, receiver_key)?;
        if last.ends_at_ms() <= at_ms {
            return Err(GrantError::Expired {
                key_id: last.key_id.clone(),
                donor: last.donor.clone(),
                ended_at: Timestamp::from_millisecond(last.ends_at_ms())
                    .map(|t| t.to_string())
                    .unwrap_or_default(),
            });
        }
        Ok(last)
    }

    /// [`Grant::verify`] without the time: what a grant held, or logged, must always pass
    /// however long ago it ended (checked at every start).
    pub fn verify_signed(
        &self,
        trusted: &[PublicKey],
        receiver: &str,
        receiver_key: &PublicKey,
    ) -> Result<&GrantPayload, GrantError> {
        if self.format != GRANT_FORMAT || self.version != GRANT_FORMAT_VERSION {
            return Err(GrantError::UnsupportedFormat {
                format: self.format.clone(),
                version: self.version,
            });
        }
        let key = self.key.verify(trusted).map_err(|e| GrantError::BadKey {
            reason: e.to_string(),
            untrusted_vendor: e.is_untrusted_vendor(),
        })?;
        if self.links.is_empty() || self.links.len() > GRANT_CHAIN_MAX {
            return Err(GrantError::Invalid {
                link: 0,
                reason: format!("a grant has 1 to {GRANT_CHAIN_MAX} links"),
            });
        }
        let mut licenses_max = key.licenses;
        let mut until_max = key.valid_until_ms();
        let mut donation_max = key.valid_until_ms();
        let mut expected_donor: Option<(&str, &str)> = None;
        for (index, link) in self.links.iter().enumerate() {
            let number = index + 1;
            let p = &link.payload;
            let invalid = |reason: String| GrantError::Invalid {
                link: number,
                reason,
            };
            match expected_donor {
                None => {
                    if let Some(bound_to) = &key.server_id {
                        let Some(certificate) = &self.certificate else {
                            return Err(invalid(format!(
                                "key {} is issued to server {bound_to}; the first donor's vendor certificate is missing",
                                key.key_id
                            )));
                        };
                        let certified = certificate
                            .verify(trusted)
                            .map_err(|e| invalid(format!("donor certificate: {e}")))?;
                        if &certified.server_id != bound_to
                            || p.donor != *bound_to
                            || certified.public_key != p.donor_public_key
                        {
                            return Err(invalid(format!(
                                "key {} is issued to server {bound_to}; the grant was signed by {} with a key its certificate does not bind",
                                key.key_id, p.donor
                            )));
                        }
                        // The 366-day rule travels down the chain: no grant of a bound key
                        // outlives its holder's certificate.
                        until_max = until_max.min(certificate.valid_until_ms());
                    }
                }
                Some((donor, donor_key)) => {
                    if p.donor != donor || p.donor_public_key != donor_key {
                        return Err(invalid(format!(
                            "re-granted by {} but the previous link went to {donor}",
                            p.donor
                        )));
                    }
                }
            }
            let donor_key = PublicKey::from_base64(&p.donor_public_key)
                .map_err(|e| invalid(format!("donor public key: {e}")))?;
            if !matches!(
                donor_key.verify_base64(&p.signed_bytes(), &link.signature),
                Ok(true)
            ) {
                return Err(GrantError::BadSignature { link: number });
            }
            if p.key_id != key.key_id {
                return Err(invalid(format!(
                    "grants key {} but carries key {}",
                    p.key_id, key.key_id
                )));
            }
            if !is_name(&p.donor) || !is_name(&p.receiver) || p.donor == p.receiver {
                return Err(invalid(
                    "donor and receiver must be two valid server IDs".into(),
                ));
            }
            if p.components.is_empty() || p.components.iter().any(|c| !key.covers(c)) {
                return Err(invalid(format!(
                    "components must be a non-empty subset of key {}'s",
                    key.key_id
                )));
            }
            if p.licenses == 0 || p.licenses > licenses_max {
                return Err(GrantError::Inflated {
                    link: number,
                    key_id: key.key_id.clone(),
                    licenses: p.licenses,
                    allowed: licenses_max,
                });
            }
            if p.lease_until_ms() > until_max || p.donation_until_ms() > donation_max {
                return Err(invalid(
                    "the grant runs longer than the grant or key it comes from".into(),
                ));
            }
            licenses_max = p.licenses;
            until_max = p.lease_until_ms();
            donation_max = p.donation_until_ms();
            expected_donor = Some((&p.receiver, &p.receiver_public_key));
        }
        let last = self.last();
        if last.receiver != receiver || last.receiver_public_key != receiver_key.to_base64() {
            return Err(GrantError::OtherReceiver {
                receiver: last.receiver.clone(),
                receiver_key: last.receiver_public_key.clone(),
                this_server: receiver.into(),
            });
        }
        Ok(last)
    }
}
