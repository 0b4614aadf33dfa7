//! The license key: a readable payload signed by the vendor's root key.
//!
//! The signature covers `CONTEXT || serde_json(payload)`. The payload is a struct with a fixed
//! field order and no maps or floats, so its JSON is canonical: a verifier parses the
//! payload, serializes it again and checks the signature over those bytes. Any edit that
//! changes meaning changes the bytes; unknown fields are refused so nothing unsigned can ride
//! along. See `docs/formats.md`.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::identity::{PublicKey, SecretKey};

pub const KEY_FORMAT: &str = "tessera-license-key";
pub const KEY_FORMAT_VERSION: u32 = 1;
const SIGNING_CONTEXT: &[u8] = b"tessera-license-key/v1\n";

/// Limits on a key's contents, so a key cannot make the ledger do unbounded work.
pub const COMPONENTS_PER_KEY_MAX: usize = 64;
pub const LICENSES_PER_KEY_MAX: u32 = 10_000_000;
pub const NAME_LENGTH_MAX: usize = 128;
/// The longest borrowing a key may allow, in days.
pub const BORROW_DAYS_MAX: u32 = 366;
/// The longest grace a key may give, in minutes (one week).
pub const GRACE_MINUTES_MAX: u32 = 7 * 24 * 60;

fn is_zero(value: &u32) -> bool {
    *value == 0
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LicenseKeyPayload {
    pub key_id: String,
    pub customer: String,
    /// Sorted, without duplicates.
    pub components: Vec<String>,
    pub licenses: u32,
    pub valid_from: Timestamp,
    pub valid_until: Timestamp,
    /// The license server this key is issued to; `None` for keys any server may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_id: Option<String>,
    /// The key this one renews, if it is a renewal key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renews: Option<String>,
    /// Applications accept a lease of this key only from a license server the vendor
    /// certified (a `ServerCertificate` for its ID, or a grant chain starting at one), as
    /// they always do for a key bound to a server ID. Absent (false) in older keys, whose
    /// signatures it therefore leaves unchanged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub certified_server_required: bool,
    /// How many days a station may borrow a license of this key (a lease needing no
    /// heartbeat until its end, held offline by the application); 0: no borrowing. Absent
    /// (0) in older keys, whose signatures it leaves unchanged.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_borrow_days: u32,
    /// How many minutes past a lease's end the application keeps running while it cannot
    /// reach any server (reconnecting meanwhile); 0: none. Absent (0) in older keys.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub grace_minutes: u32,
    pub issued_at: Timestamp,
}

/// The signed document as it travels in files and requests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LicenseKey {
    pub format: String,
    pub version: u32,
    pub payload: LicenseKeyPayload,
    /// Fingerprint of the vendor key that signed it, to tell "wrong vendor" from "tampered".
    pub signed_by: String,
    pub signature: String,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum KeyError {
    #[error("the license key file is not valid JSON of the expected shape: {detail}")]
    Malformed { detail: String },
    #[error(
        "unsupported license key format `{format}` version {version}; expected `{KEY_FORMAT}` version {KEY_FORMAT_VERSION}"
    )]
    UnsupportedFormat { format: String, version: u32 },
    #[error(
        "license key {key_id} was signed by vendor key {signed_by}, which this server does not trust (trusted: {trusted})"
    )]
    WrongVendor {
        key_id: String,
        signed_by: String,
        trusted: String,
    },
    #[error(
        "license key {key_id} has an invalid signature: the file was altered after the vendor signed it"
    )]
    BadSignature { key_id: String },
    #[error("license key {key_id} is invalid: {reason}")]
    Invalid { key_id: String, reason: String },
    #[error("license key {key_id} expired at {valid_until}")]
    Expired { key_id: String, valid_until: String },
    #[error(
        "license key {key_id} is issued to license server {issued_to}, not to this server ({this_server})"
    )]
    OtherServer {
        key_id: String,
        issued_to: String,
        this_server: String,
    },
    #[error(
        "license key {key_id} was revoked by the vendor at a sync: it cannot be added again (ask the vendor for a new key)"
    )]
    Revoked { key_id: String },
}

impl KeyError {
    /// The key verifies as signed, but by a vendor key this server does not trust: the trust
    /// list changed (or the key is another vendor's), rather than the key being edited.
    pub fn is_untrusted_vendor(&self) -> bool {
        matches!(self, KeyError::WrongVendor { .. })
    }
}

impl KeyError {
    /// Stable machine-readable code for the JSON error body.
    pub fn code(&self) -> &'static str {
        match self {
            KeyError::Malformed { .. } => "key_malformed",
            KeyError::UnsupportedFormat { .. } => "key_unsupported_format",
            KeyError::WrongVendor { .. } => "key_wrong_vendor",
            KeyError::BadSignature { .. } => "key_bad_signature",
            KeyError::Invalid { .. } => "key_invalid",
            KeyError::Expired { .. } => "key_expired",
            KeyError::OtherServer { .. } => "key_other_server",
            KeyError::Revoked { .. } => "key_revoked",
        }
    }
}

impl LicenseKeyPayload {
    fn signed_bytes(&self) -> Vec<u8> {
        let mut bytes = SIGNING_CONTEXT.to_vec();
        // Serializing a plain struct of strings, integers and timestamps cannot fail.
        bytes.extend(serde_json::to_vec(self).expect("payload serializes"));
        bytes
    }

    /// Checks the payload's own consistency, independent of who signed it and of time.
    pub fn validate(&self) -> Result<(), KeyError> {
        let invalid = |reason: String| KeyError::Invalid {
            key_id: self.key_id.clone(),
            reason,
        };
        if !is_name(&self.key_id) {
            return Err(invalid(format!(
                "key id {:?} is not a valid name",
                self.key_id
            )));
        }
        if self.customer.is_empty() || self.customer.len() > NAME_LENGTH_MAX {
            return Err(invalid("customer must have 1 to 128 characters".into()));
        }
        if self.components.is_empty() || self.components.len() > COMPONENTS_PER_KEY_MAX {
            return Err(invalid(format!(
                "a key licenses 1 to {COMPONENTS_PER_KEY_MAX} components, this one {}",
                self.components.len()
            )));
        }
        if let Some(bad) = self.components.iter().find(|c| !is_name(c)) {
            return Err(invalid(format!("component {bad:?} is not a valid name")));
        }
        if !self.components.windows(2).all(|w| w[0] < w[1]) {
            return Err(invalid("components must be sorted and unique".into()));
        }
        if self.licenses == 0 || self.licenses > LICENSES_PER_KEY_MAX {
            return Err(invalid(format!(
                "licenses must be 1 to {LICENSES_PER_KEY_MAX}, not {}",
                self.licenses
            )));
        }
        if self.valid_until <= self.valid_from {
            return Err(invalid("valid_until must be after valid_from".into()));
        }
        if self.max_borrow_days > BORROW_DAYS_MAX {
            return Err(invalid(format!(
                "max_borrow_days must be 0 to {BORROW_DAYS_MAX}, not {}",
                self.max_borrow_days
            )));
        }
        if self.grace_minutes > GRACE_MINUTES_MAX {
            return Err(invalid(format!(
                "grace_minutes must be 0 to {GRACE_MINUTES_MAX}, not {}",
                self.grace_minutes
            )));
        }
        Ok(())
    }

    pub fn valid_from_ms(&self) -> i64 {
        self.valid_from.as_millisecond()
    }

    pub fn valid_until_ms(&self) -> i64 {
        self.valid_until.as_millisecond()
    }

    pub fn covers(&self, component: &str) -> bool {
        self.components
            .binary_search_by(|c| c.as_str().cmp(component))
            .is_ok()
    }
}

/// A name is 1–128 characters of ASCII letters, digits, `-`, `_`, `.`.
pub fn is_name(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= NAME_LENGTH_MAX
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl LicenseKey {
    /// Signs a payload with the vendor key. Components are sorted and deduplicated first.
    pub fn sign(
        mut payload: LicenseKeyPayload,
        vendor: &SecretKey,
    ) -> Result<LicenseKey, KeyError> {
        payload.components.sort();
        payload.components.dedup();
        payload.validate()?;
        let signature = vendor.sign_base64(&payload.signed_bytes());
        Ok(LicenseKey {
            format: KEY_FORMAT.to_string(),
            version: KEY_FORMAT_VERSION,
            payload,
            signed_by: vendor.public_key().fingerprint(),
            signature,
        })
    }

    pub fn from_json(text: &str) -> Result<LicenseKey, KeyError> {
        serde_json::from_str(text).map_err(|error| KeyError::Malformed {
            detail: error.to_string(),
        })
    }

    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).expect("key serializes")
    }

    pub fn key_id(&self) -> &str {
        &self.payload.key_id
    }

    /// Verifies format, signer and signature against the trusted vendor keys, then the
    /// payload's consistency. Time and server binding are the ledger's business.
    pub fn verify(&self, trusted: &[PublicKey]) -> Result<&LicenseKeyPayload, KeyError> {
        if self.format != KEY_FORMAT || self.version != KEY_FORMAT_VERSION {
            return Err(KeyError::UnsupportedFormat {
                format: self.format.clone(),
                version: self.version,
            });
        }
        let key_id = self.payload.key_id.clone();
        let Some(vendor) = trusted.iter().find(|k| k.fingerprint() == self.signed_by) else {
            return Err(KeyError::WrongVendor {
                key_id,
                signed_by: self.signed_by.clone(),
                trusted: trusted
                    .iter()
                    .map(PublicKey::fingerprint)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        match vendor.verify_base64(&self.payload.signed_bytes(), &self.signature) {
            Ok(true) => {}
            _ => return Err(KeyError::BadSignature { key_id }),
        }
        self.payload.validate()?;
        Ok(&self.payload)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn payload(key_id: &str, components: &[&str], licenses: u32) -> LicenseKeyPayload {
        LicenseKeyPayload {
            key_id: key_id.into(),
            customer: "acme".into(),
            components: components.iter().map(|c| c.to_string()).collect(),
            licenses,
            valid_from: Timestamp::from_second(1_700_000_000).unwrap(),
            valid_until: Timestamp::from_second(1_900_000_000).unwrap(),
            server_id: None,
            renews: None,
            certified_server_required: false,
            max_borrow_days: 0,
            grace_minutes: 0,
            issued_at: Timestamp::from_second(1_700_000_000).unwrap(),
        }
    }

    #[test]
    fn a_signed_key_verifies_after_a_json_round_trip() {
        let vendor = SecretKey::from_seed([3; 32]);
        let key = LicenseKey::sign(payload("k1", &["cad", "cam"], 5), &vendor).unwrap();
        let reread = LicenseKey::from_json(&key.to_json_pretty()).unwrap();
        assert_eq!(reread.verify(&[vendor.public_key()]).unwrap().licenses, 5);
    }

    #[test]
    fn an_inflated_license_count_breaks_the_signature() {
        let vendor = SecretKey::from_seed([3; 32]);
        let mut key = LicenseKey::sign(payload("k1", &["cad"], 5), &vendor).unwrap();
        key.payload.licenses = 500;
        assert_eq!(
            key.verify(&[vendor.public_key()]),
            Err(KeyError::BadSignature {
                key_id: "k1".into()
            })
        );
    }

    #[test]
    fn a_key_from_another_vendor_is_named_as_such() {
        let vendor = SecretKey::from_seed([3; 32]);
        let other = SecretKey::from_seed([4; 32]);
        let key = LicenseKey::sign(payload("k1", &["cad"], 5), &other).unwrap();
        assert!(matches!(
            key.verify(&[vendor.public_key()]),
            Err(KeyError::WrongVendor { .. })
        ));
    }

    #[test]
    fn unknown_fields_in_a_key_file_are_refused() {
        let vendor = SecretKey::from_seed([3; 32]);
        let key = LicenseKey::sign(payload("k1", &["cad"], 5), &vendor).unwrap();
        let text = key
            .to_json_pretty()
            .replacen("\"licenses\"", "\"bonus\": 1, \"licenses\"", 1);
        assert!(matches!(
            LicenseKey::from_json(&text),
            Err(KeyError::Malformed { .. })
        ));
    }

    #[test]
    fn a_key_without_components_cannot_be_signed() {
        let vendor = SecretKey::from_seed([3; 32]);
        assert!(matches!(
            LicenseKey::sign(payload("k1", &[], 5), &vendor),
            Err(KeyError::Invalid { .. })
        ));
    }
}
