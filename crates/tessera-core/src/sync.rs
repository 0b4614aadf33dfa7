//! Documents exchanged with the vendor authority: the server certificate, and the sync
//! request and response (the same documents travel online and as files for air-gapped sites).
//!
//! - A **sync request** is signed by the license server's identity key. It carries the server
//!   ID, the public key, a sequence number one above the last completed sync, and a fresh nonce.
//! - A **sync response** is signed by the vendor. It answers one request (same nonce and
//!   sequence) and carries the server certificate, the keys issued to this server, the revoked
//!   key ids and the renewal keys held for it.
//! - A **server certificate** binds a server ID to its public key until `valid_until` (last
//!   sync + 366 days). Keys issued to a server ID are usable only under a valid certificate.
//!
//! Every signature covers `context || compact JSON of the payload`, as for license keys.
//!
//! **The sync chain.** Each request also names the last response the server accepted
//! (`last_response`, its [`SyncResponse::chain_hash`]), so the authority can keep, per server
//! ID, the chain of responses it issued and notice a server that presents an earlier link
//! (a restored backup: `server_rolled_back`) or a link another copy already moved past (a
//! copied data directory: `server_cloned`). The rules are the authority's
//! (`tessera-authority/src/chain.rs`, `docs/security.md`).

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::identity::{PublicKey, SecretKey};
use crate::key::LicenseKey;

pub const CERTIFICATE_FORMAT: &str = "tessera-server-certificate";
pub const REQUEST_FORMAT: &str = "tessera-sync-request";
pub const RESPONSE_FORMAT: &str = "tessera-sync-response";
pub const SYNC_FORMAT_VERSION: u32 = 1;
/// How long a certificate lasts after a sync: the 366-day rule.
pub const CERTIFICATE_VALIDITY_DAYS: i64 = 366;
/// The authority's refusal (HTTP 409) of a request from a second copy of a server's data.
pub const SERVER_CLONED: &str = "server_cloned";
/// The authority's refusal (HTTP 409) of a request from a server's data set back in time.
pub const SERVER_ROLLED_BACK: &str = "server_rolled_back";
/// The authority's refusal (HTTP 409) of a request whose stated time (`created_at`) is too
/// far from the authority's clock: the server's clock is wrong (`docs/security.md`, T8).
pub const SERVER_CLOCK_SKEWED: &str = "server_clock_skewed";
/// How far a request's stated time may be ahead of the authority's clock (online or file),
/// and behind it for an online request: a day.
pub const MAX_CLOCK_SKEW_MS: i64 = 24 * 60 * 60 * 1000;

fn signed_bytes<T: Serialize>(format: &str, payload: &T) -> Vec<u8> {
    let mut bytes = format!("{format}/v{SYNC_FORMAT_VERSION}\n").into_bytes();
    bytes.extend(serde_json::to_vec(payload).expect("payload serializes"));
    bytes
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum SyncError {
    #[error("the {what} is not valid JSON of the expected shape (truncated or edited?): {detail}")]
    Malformed { what: String, detail: String },
    #[error("unsupported {what} format `{format}` version {version}")]
    UnsupportedFormat {
        what: String,
        format: String,
        version: u32,
    },
    #[error("the {what} was signed by vendor key {signed_by}, which this server does not trust")]
    WrongVendor { what: String, signed_by: String },
    #[error("the {what} has an invalid signature: it was altered after it was signed")]
    BadSignature { what: String },
    #[error("the {what} is for license server {for_server}, not for this server ({this_server})")]
    OtherServer {
        what: String,
        for_server: String,
        this_server: String,
    },
    #[error(
        "this sync response answers request {sequence} ({nonce}), which is not the request this server is waiting for ({expected}): it is stale or replayed"
    )]
    NotAwaited {
        sequence: u64,
        nonce: String,
        expected: String,
    },
    #[error("the server certificate binds public key {certified}, but this server's key is {ours}")]
    WrongServerKey { certified: String, ours: String },
    #[error("this server has no server ID: configure server_id before synchronizing")]
    NoServerId,
}

impl SyncError {
    /// Signed by a vendor key this server does not trust (see
    /// [`KeyError::is_untrusted_vendor`](crate::KeyError::is_untrusted_vendor)).
    pub fn is_untrusted_vendor(&self) -> bool {
        matches!(self, SyncError::WrongVendor { .. })
    }
}

impl SyncError {
    /// Stable machine-readable code for the JSON error body.
    pub fn code(&self) -> &'static str {
        match self {
            SyncError::Malformed { .. } => "sync_malformed",
            SyncError::UnsupportedFormat { .. } => "sync_unsupported_format",
            SyncError::WrongVendor { .. } => "sync_wrong_vendor",
            SyncError::BadSignature { .. } => "sync_bad_signature",
            SyncError::OtherServer { .. } => "sync_other_server",
            SyncError::NotAwaited { .. } => "sync_not_awaited",
            SyncError::WrongServerKey { .. } => "sync_wrong_server_key",
            SyncError::NoServerId => "no_server_id",
        }
    }
}

/// The vendor's statement: this server ID belongs to this public key until `valid_until`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificatePayload {
    pub server_id: String,
    pub customer: String,
    /// The server's Ed25519 public key, base64.
    pub public_key: String,
    pub issued_at: Timestamp,
    pub valid_until: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerCertificate {
    pub format: String,
    pub version: u32,
    pub payload: CertificatePayload,
    pub signed_by: String,
    pub signature: String,
}

impl ServerCertificate {
    pub fn sign(payload: CertificatePayload, vendor: &SecretKey) -> ServerCertificate {
        let signature = vendor.sign_base64(&signed_bytes(CERTIFICATE_FORMAT, &payload));
        ServerCertificate {
            format: CERTIFICATE_FORMAT.into(),
            version: SYNC_FORMAT_VERSION,
            payload,
            signed_by: vendor.public_key().fingerprint(),
            signature,
        }
    }

    pub fn verify(&self, trusted: &[PublicKey]) -> Result<&CertificatePayload, SyncError> {
        check_format(
            "server certificate",
            &self.format,
            self.version,
            CERTIFICATE_FORMAT,
        )?;
        verify_vendor(
            "server certificate",
            trusted,
            &self.signed_by,
            &signed_bytes(CERTIFICATE_FORMAT, &self.payload),
            &self.signature,
        )?;
        Ok(&self.payload)
    }

    pub fn valid_until_ms(&self) -> i64 {
        self.payload.valid_until.as_millisecond()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncRequestPayload {
    pub server_id: String,
    /// The server's Ed25519 public key, base64: bound to the server ID on first sync.
    pub public_key: String,
    /// One above the last completed sync; the authority refuses anything not above the last
    /// sequence it answered.
    pub sequence: u64,
    pub nonce: String,
    pub created_at: Timestamp,
    /// Ids of the keys this server holds from the vendor.
    pub keys: Vec<String>,
    /// The sync chain: [`SyncResponse::chain_hash`] of the last response this server
    /// accepted (`None` before its first sync). Absent, with the next two, from requests of
    /// servers older than the chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_response: Option<String>,
    /// The sequence of the first request this server sent since it accepted
    /// `last_response`: the same in every retry after a lost answer, which is how the
    /// authority tells a retry from a second copy. Always present in chained requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_since: Option<u64>,
    /// Which installation sends the request: a hash of the host name and the data
    /// directory's path, neither of which a copy of the data directory carries along. Only
    /// used to tell a clone (another installation) from a rollback (the same one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installation: Option<String>,
    /// The heads of the sending host's own hash chains (its Raft log and its audit log),
    /// and the same chains at the points the vendor countersigned at the last sync: the
    /// vendor sees history rewritten since (docs/security.md, T2 and T12). Absent from
    /// requests of servers older than it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<HistoryHeads>,
    /// The grant history of every neighbour link this server donates or receives on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<LinkReport>,
    /// The vendor keys the server trusts and the changes its ledger recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<TrustReport>,
    /// What the ledger holds and has issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counters: Option<LedgerCounters>,
    /// What the neighbours this server donates to reported of their own ledgers with their
    /// last usage report (their counters and log heads): the vendor checks a receiver's
    /// counters even when it never syncs itself (an air-gapped child).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relayed: Vec<RelayedHeads>,
}

/// A host's ledger counters and log head, as it states them in each usage report to its
/// donor (docs/security.md, T2 and T5).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportedHeads {
    /// The reporting host (see [`SyncRequestPayload::installation`]).
    pub installation: String,
    /// Its Raft log's last chain point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<ChainPoint>,
    pub counters: LedgerCounters,
}

/// A neighbour's [`ReportedHeads`], as the donor it reported to relays them at its sync.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayedHeads {
    /// The neighbour's server ID.
    pub server_id: String,
    /// When the neighbour made its report (its clock).
    pub reported_at: Timestamp,
    pub heads: ReportedHeads,
}

/// Counters of a server's ledger, reported at every sync (docs/security.md, T2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerCounters {
    /// Leases checked out in all, since the ledger began: it only grows.
    pub leases_issued: u64,
    /// The time of the last entry the ledger applied when it was counted: on one host, a
    /// later time never has fewer `leases_issued`. Absent from older servers' reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_of_ms: Option<i64>,
    /// Leases held now.
    pub leases_held: u64,
    /// Licenses donated to neighbours now.
    pub seats_donated: u64,
    /// License keys held (received pools included).
    pub keys: u64,
}

/// A change of the vendor keys a server trusts, as its ledger recorded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustChange {
    pub at: Timestamp,
    /// Fingerprints of the keys added to the trust list, and of the keys removed.
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

/// The trust list a sync request reports: the fingerprints trusted now and the changes the
/// ledger recorded (the last [`TRUST_CHANGES_MAX`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustReport {
    pub trusted: Vec<String>,
    pub changes: Vec<TrustChange>,
}

/// How many trust list changes a ledger keeps.
pub const TRUST_CHANGES_MAX: usize = 64;

/// Which side of a neighbour link a [`LinkReport`] comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkSide {
    Donor,
    Receiver,
}

impl LinkSide {
    pub fn name(self) -> &'static str {
        match self {
            LinkSide::Donor => "donor",
            LinkSide::Receiver => "receiver",
        }
    }
}

/// Grant serials of one license count: every serial from `first` to `last` that this side
/// issued (donor) or accepted (receiver) gave `licenses`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkRun {
    pub first: u64,
    pub last: u64,
    pub licenses: u32,
}

/// How many runs a link keeps (the oldest go first); a run ends only when the license count
/// changes, so renewals do not add runs.
pub const LINK_RUNS_MAX: usize = 64;

/// One neighbour link's grant history as one side holds it in its ledger (docs/security.md,
/// T10). Every sync request carries them; the vendor checks the receiver's runs against the
/// donor's, so a grant the donor's ledger never issued (signed with the donor's key by
/// whoever holds it) shows as a serial the donor never issued or with another count.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkReport {
    pub side: LinkSide,
    pub donor: String,
    pub receiver: String,
    /// The vendor key the grants are of.
    pub key_id: String,
    pub runs: Vec<LinkRun>,
}

impl LinkReport {
    /// Adds a serial issued or accepted with `licenses`. Serials only grow on a link; one
    /// at or below the last recorded is ignored.
    pub fn record(&mut self, serial: u64, licenses: u32) {
        match self.runs.last_mut() {
            Some(run) if serial <= run.last => {}
            Some(run) if run.licenses == licenses => run.last = serial,
            _ => {
                self.runs.push(LinkRun {
                    first: serial,
                    last: serial,
                    licenses,
                });
                if self.runs.len() > LINK_RUNS_MAX {
                    self.runs.remove(0);
                }
            }
        }
    }

    /// The newest serial recorded.
    pub fn last_serial(&self) -> u64 {
        self.runs.last().map_or(0, |run| run.last)
    }
}

/// A point of a hash chain: the position (the Raft log index, or the number of audit
/// records) and the chain value there (hex).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainPoint {
    pub at: u64,
    pub hash: String,
}

/// A countersigned point recomputed from what the host stores now: `hash` is `None` when
/// nothing is there any more (audit records deleted, log entries purged into a snapshot).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointCheck {
    pub at: u64,
    pub hash: Option<String>,
}

/// What one host reports of its own hash chains at a sync. Each host of a domain keeps its
/// own log and audit chain, so heads belong to an installation (see
/// [`SyncRequestPayload::installation`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryHeads {
    pub installation: String,
    /// The last Raft log entry's chain point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<ChainPoint>,
    /// The last audit record's chain point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<ChainPoint>,
    /// The log at the point the vendor countersigned last ([`Countersigned::log`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_at_countersigned: Option<PointCheck>,
    /// The audit chain at the point the vendor countersigned last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_at_countersigned: Option<PointCheck>,
}

/// The heads a request reported, signed back in the response: the server keeps them and
/// recomputes its chains there at the next sync, and `tessera audit verify` checks the audit
/// chain against them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Countersigned {
    pub installation: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<ChainPoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<ChainPoint>,
}

impl SyncRequestPayload {
    /// Whether the request carries the sync chain (servers older than the chain do not).
    pub fn is_chained(&self) -> bool {
        self.pending_since.is_some()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncRequest {
    pub format: String,
    pub version: u32,
    pub payload: SyncRequestPayload,
    pub signature: String,
}

impl SyncRequest {
    pub fn sign(payload: SyncRequestPayload, server: &SecretKey) -> SyncRequest {
        let signature = server.sign_base64(&signed_bytes(REQUEST_FORMAT, &payload));
        SyncRequest {
            format: REQUEST_FORMAT.into(),
            version: SYNC_FORMAT_VERSION,
            payload,
            signature,
        }
    }

    pub fn from_json(text: &str) -> Result<SyncRequest, SyncError> {
        serde_json::from_str(text).map_err(|error| SyncError::Malformed {
            what: "sync request".into(),
            detail: error.to_string(),
        })
    }

    /// Checks that the request is signed by the key it names (proof of possession). Whether
    /// that key is the one bound to the server ID is the authority's decision.
    pub fn verify(&self) -> Result<(&SyncRequestPayload, PublicKey), SyncError> {
        check_format("sync request", &self.format, self.version, REQUEST_FORMAT)?;
        let bad = || SyncError::BadSignature {
            what: "sync request".into(),
        };
        let key = PublicKey::from_base64(&self.payload.public_key).map_err(|_| bad())?;
        match key.verify_base64(
            &signed_bytes(REQUEST_FORMAT, &self.payload),
            &self.signature,
        ) {
            Ok(true) => Ok((&self.payload, key)),
            _ => Err(bad()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncResponsePayload {
    pub server_id: String,
    pub request_nonce: String,
    pub sequence: u64,
    pub issued_at: Timestamp,
    pub certificate: ServerCertificate,
    /// Every key currently issued to this server (new and changed ones included).
    pub keys: Vec<LicenseKey>,
    /// Key ids the vendor revoked.
    pub revoked: Vec<String>,
    /// Renewal keys held for keys of this server, each naming the key it renews.
    pub renewals: Vec<LicenseKey>,
    /// The history heads the request reported, countersigned (absent when it reported
    /// none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub countersigned: Option<Countersigned>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncResponse {
    pub format: String,
    pub version: u32,
    pub payload: SyncResponsePayload,
    pub signed_by: String,
    pub signature: String,
}

impl SyncResponse {
    pub fn sign(payload: SyncResponsePayload, vendor: &SecretKey) -> SyncResponse {
        let signature = vendor.sign_base64(&signed_bytes(RESPONSE_FORMAT, &payload));
        SyncResponse {
            format: RESPONSE_FORMAT.into(),
            version: SYNC_FORMAT_VERSION,
            payload,
            signed_by: vendor.public_key().fingerprint(),
            signature,
        }
    }

    pub fn from_json(text: &str) -> Result<SyncResponse, SyncError> {
        serde_json::from_str(text).map_err(|error| SyncError::Malformed {
            what: "sync response".into(),
            detail: error.to_string(),
        })
    }

    /// The response's link in the sync chain: SHA-256 (hex) of exactly the bytes the vendor
    /// signed. The server keeps it as `last_response`; the authority records it when it
    /// issues the response.
    pub fn chain_hash(&self) -> String {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(signed_bytes(RESPONSE_FORMAT, &self.payload)))
    }

    pub fn verify(&self, trusted: &[PublicKey]) -> Result<&SyncResponsePayload, SyncError> {
        check_format("sync response", &self.format, self.version, RESPONSE_FORMAT)?;
        verify_vendor(
            "sync response",
            trusted,
            &self.signed_by,
            &signed_bytes(RESPONSE_FORMAT, &self.payload),
            &self.signature,
        )?;
        self.payload.certificate.verify(trusted)?;
        Ok(&self.payload)
    }
}

fn check_format(what: &str, format: &str, version: u32, expected: &str) -> Result<(), SyncError> {
    if format != expected || version != SYNC_FORMAT_VERSION {
        return Err(SyncError::UnsupportedFormat {
            what: what.into(),
            format: format.into(),
            version,
        });
    }
    Ok(())
}

fn verify_vendor(
    what: &str,
    trusted: &[PublicKey],
    signed_by: &str,
    bytes: &[u8],
    signature: &str,
) -> Result<(), SyncError> {
    let Some(vendor) = trusted.iter().find(|k| k.fingerprint() == signed_by) else {
        return Err(SyncError::WrongVendor {
            what: what.into(),
            signed_by: signed_by.into(),
        });
    };
    match vendor.verify_base64(bytes, signature) {
        Ok(true) => Ok(()),
        _ => Err(SyncError::BadSignature { what: what.into() }),
    }
}
