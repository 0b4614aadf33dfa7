//! Authentication of the Raft traffic between the hosts of a domain: every RPC carries
//! `x-tessera-raft-auth: hex(HMAC-SHA256(domain_secret, rpc name ‖ "\n" ‖ body))`, and the
//! routes refuse a request whose tag is missing or wrong (401) before openraft sees it.
//!
//! This proves the sender knows the domain secret and that the body was not altered. It does
//! not hide the traffic (run the domain on a trusted network or behind TLS) and does not stop
//! a replay of a captured RPC; Raft ignores messages of past terms, so a replay can at most
//! repeat what the leader already sent.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The header carrying the tag.
pub const AUTH_HEADER: &str = "x-tessera-raft-auth";
/// The header vouching for the body's length before it is read: `hex(HMAC-SHA256(secret,
/// "length\n" ‖ rpc ‖ "\n" ‖ Content-Length))`. A body larger than
/// [`super::rpc::UNVOUCHED_BODY_BYTES_MAX`] is read only with it, so an outsider cannot make a
/// host buffer a gigabyte before its tag is found wrong.
pub const LENGTH_HEADER: &str = "x-tessera-raft-length";
/// The sending host's number, on every Raft RPC (for logs and fault-injecting proxies; not
/// authenticated separately).
pub const FROM_HEADER: &str = "x-tessera-raft-from";

/// The domain secret, as bytes.
#[derive(Clone)]
pub struct DomainKey(std::sync::Arc<[u8]>);

impl std::fmt::Debug for DomainKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DomainKey(..)")
    }
}

impl DomainKey {
    pub fn new(secret: &str) -> DomainKey {
        DomainKey(secret.as_bytes().into())
    }

    fn mac(&self, rpc: &str, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(rpc.as_bytes());
        mac.update(b"\n");
        mac.update(body);
        mac
    }

    pub fn sign(&self, rpc: &str, body: &[u8]) -> String {
        hex::encode(self.mac(rpc, body).finalize().into_bytes())
    }

    fn length_mac(&self, rpc: &str, length: u64) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(b"length\n");
        mac.update(rpc.as_bytes());
        mac.update(b"\n");
        mac.update(length.to_string().as_bytes());
        mac
    }

    /// The [`LENGTH_HEADER`] for a body of `length` bytes.
    pub fn sign_length(&self, rpc: &str, length: u64) -> String {
        hex::encode(self.length_mac(rpc, length).finalize().into_bytes())
    }

    /// Constant-time check of a [`LENGTH_HEADER`].
    pub fn verify_length(&self, rpc: &str, length: u64, tag: &str) -> bool {
        match hex::decode(tag.trim()) {
            Ok(tag) => self.length_mac(rpc, length).verify_slice(&tag).is_ok(),
            Err(_) => false,
        }
    }

    /// Constant-time check of a tag from the header.
    pub fn verify(&self, rpc: &str, body: &[u8], tag: &str) -> bool {
        match hex::decode(tag.trim()) {
            Ok(tag) => self.mac(rpc, body).verify_slice(&tag).is_ok(),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::DomainKey;

    #[test]
    fn a_tag_verifies_only_with_the_same_secret_rpc_and_body() {
        let key = DomainKey::new("0123456789abcdef");
        let tag = key.sign("append", b"{}");
        assert!(key.verify("append", b"{}", &tag));
        assert!(!key.verify("vote", b"{}", &tag));
        assert!(!key.verify("append", b"{ }", &tag));
        assert!(!DomainKey::new("another secret!!").verify("append", b"{}", &tag));
        assert!(!key.verify("append", b"{}", "not hex"));
    }

    #[test]
    fn a_length_tag_verifies_only_for_the_same_secret_rpc_and_length() {
        let key = DomainKey::new("0123456789abcdef");
        let tag = key.sign_length("snapshot", 5_000_000);
        assert!(key.verify_length("snapshot", 5_000_000, &tag));
        assert!(!key.verify_length("snapshot", 5_000_001, &tag));
        assert!(!key.verify_length("append", 5_000_000, &tag));
        assert!(!DomainKey::new("another secret!!").verify_length("snapshot", 5_000_000, &tag));
        // A body tag is not a length tag.
        assert!(!key.verify_length("snapshot", 2, &key.sign("snapshot", b"{}")));
    }
}
