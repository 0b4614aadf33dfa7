//! JSON bodies of the admin API, shared with the CLI. Request bodies refuse unknown fields, so
//! a misspelt option is an error (`malformed_json`) rather than silently ignored.
//!
//! Signed documents (license keys, sync requests and responses) travel as the
//! `tessera_core` types themselves, never wrapped, so a key file or a sync file is
//! byte-for-byte what the API returned.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// `{"error": {"code": "...", "message": "..."}}`, the body of every refusal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// `GET /healthz`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    /// Fingerprint of the vendor public key this authority signs with.
    pub vendor_key: String,
}

/// `POST /v1/customers`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewCustomer {
    pub name: String,
    /// How long a certificate from an online sync lasts for this customer's servers, 1 to
    /// 366 days (default 30). Syncs by file always certify for 366 days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online_certificate_days: Option<i64>,
}

/// `POST /v1/customers/{name}/settings`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomerSettings {
    /// As in [`NewCustomer`]; `null` resets to the default (30).
    pub online_certificate_days: Option<i64>,
}

/// An element of `GET /v1/customers`; also the answer to `POST /v1/customers`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerInfo {
    pub name: String,
    pub created_at: Timestamp,
    /// License server IDs registered for this customer.
    pub servers: u64,
    /// How long a certificate from an online sync lasts for this customer's servers.
    #[serde(default)]
    pub online_certificate_days: i64,
}

/// `POST /v1/servers`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewServer {
    pub customer: String,
    /// Create the customer if it does not exist yet (otherwise `unknown_customer`).
    #[serde(default)]
    pub create_customer: bool,
}

/// A license server ID as the vendor sees it: `GET /v1/servers`, `POST /v1/servers`,
/// `POST /v1/servers/{id}/reset`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    pub server_id: String,
    pub customer: String,
    pub created_at: Timestamp,
    /// The bound public key (base64), `None` until the first sync or after a reset.
    pub public_key: Option<String>,
    /// Fingerprint of the bound public key.
    pub key_fingerprint: Option<String>,
    pub bound_at: Option<Timestamp>,
    pub last_sync_at: Option<Timestamp>,
    /// Highest sync request sequence answered under the current binding (0: none).
    pub last_sequence: u64,
    /// Until when the certificate handed out at the last sync is valid (last sync + 366 days):
    /// after that the server stops issuing licenses until it syncs again.
    pub certificate_valid_until: Option<Timestamp>,
}

/// `POST /v1/keys`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssueKey {
    pub server_id: String,
    pub components: Vec<String>,
    pub licenses: u32,
    pub valid_days: u32,
    /// If given, must be the customer the server ID belongs to (a guard against typos).
    #[serde(default)]
    pub customer: Option<String>,
    /// Days a station may borrow a license of the key (0: never).
    #[serde(default)]
    pub max_borrow_days: u32,
    /// Minutes an application keeps running past a lease's end without a server (0: none).
    #[serde(default)]
    pub grace_minutes: u32,
}

/// `POST /v1/keys/{id}/renewal`. Components and licenses default to the renewed key's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewKey {
    pub valid_days: u32,
    #[serde(default)]
    pub components: Option<Vec<String>>,
    #[serde(default)]
    pub licenses: Option<u32>,
}

/// An element of `GET /v1/keys`; also the answer to `POST /v1/keys/{id}/revoke`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInfo {
    pub key_id: String,
    pub server_id: String,
    pub customer: String,
    pub components: Vec<String>,
    pub licenses: u32,
    pub valid_from: Timestamp,
    pub valid_until: Timestamp,
    pub issued_at: Timestamp,
    /// For a renewal key: the key it renews.
    pub renews: Option<String>,
    pub revoked_at: Option<Timestamp>,
}

/// An element of `GET /v1/alerts`, newest first: a clone or a rollback detected at a sync
/// (`server_cloned`, `server_rolled_back`), a server whose clock is far from the
/// authority's (`server_clock_skewed`), or the vendor's reset of a server's chain
/// (`chain_reset`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertInfo {
    pub id: i64,
    pub server_id: String,
    pub customer: String,
    pub kind: String,
    /// When it was first seen.
    pub at: Timestamp,
    /// When it was last seen (a blocked server asking again counts on the same alert).
    pub last_at: Timestamp,
    pub count: u64,
    /// What the authority saw, for people.
    pub detail: String,
}
