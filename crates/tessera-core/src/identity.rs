//! Ed25519 keys and their text file formats.
//!
//! A secret key file is `tessera-secret-key v1` on the first line and the 32-byte seed in
//! base64 on the second; a public key file is the same with `tessera-public-key v1`. The
//! fingerprint (first 8 bytes of SHA-256 of the public key, hex) names a key in messages.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

const SECRET_HEADER: &str = "tessera-secret-key v1";
const PUBLIC_HEADER: &str = "tessera-public-key v1";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("not a Tessera {expected} file: the first line must be `{header}`")]
    WrongHeader {
        expected: &'static str,
        header: &'static str,
    },
    #[error("the {what} is not valid base64 of {length} bytes")]
    BadEncoding { what: &'static str, length: usize },
    #[error("the public key is not a valid Ed25519 point")]
    InvalidPoint,
    #[error("signature is not valid base64 of 64 bytes")]
    BadSignatureEncoding,
}

/// A signing key. Its seed comes from the caller (getrandom in binaries, a seed in tests).
#[derive(Clone)]
pub struct SecretKey(SigningKey);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey({})", self.public_key().fingerprint())
    }
}

impl SecretKey {
    pub fn from_seed(seed: [u8; 32]) -> SecretKey {
        SecretKey(SigningKey::from_bytes(&seed))
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// Signs `message`; returns the signature in base64.
    pub fn sign_base64(&self, message: &[u8]) -> String {
        BASE64.encode(self.0.sign(message).to_bytes())
    }

    pub fn to_file_text(&self) -> String {
        format!("{SECRET_HEADER}\n{}\n", BASE64.encode(self.0.to_bytes()))
    }

    pub fn from_file_text(text: &str) -> Result<SecretKey, IdentityError> {
        let body = strip_header(text, SECRET_HEADER, "secret key")?;
        let seed = decode_fixed::<32>(body, "secret key")?;
        Ok(SecretKey::from_seed(seed))
    }
}

/// A verifying key, as trusted by servers (the vendor's) or bound to a server ID.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(VerifyingKey);

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", self.fingerprint())
    }
}

impl PublicKey {
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::digest(self.0.as_bytes());
        hex::encode(&digest[..8])
    }

    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0.as_bytes())
    }

    pub fn from_base64(text: &str) -> Result<PublicKey, IdentityError> {
        let bytes = decode_fixed::<32>(text, "public key")?;
        VerifyingKey::from_bytes(&bytes)
            .map(PublicKey)
            .map_err(|_| IdentityError::InvalidPoint)
    }

    /// Verifies a base64 signature; `Ok(false)` means well-formed but not valid for `message`.
    pub fn verify_base64(&self, message: &[u8], signature: &str) -> Result<bool, IdentityError> {
        let bytes = decode_fixed::<64>(signature, "signature")
            .map_err(|_| IdentityError::BadSignatureEncoding)?;
        let signature = ed25519_dalek::Signature::from_bytes(&bytes);
        Ok(self.0.verify_strict(message, &signature).is_ok())
    }

    pub fn to_file_text(&self) -> String {
        format!("{PUBLIC_HEADER}\n{}\n", self.to_base64())
    }

    pub fn from_file_text(text: &str) -> Result<PublicKey, IdentityError> {
        let body = strip_header(text, PUBLIC_HEADER, "public key")?;
        PublicKey::from_base64(body)
    }
}

fn strip_header<'a>(
    text: &'a str,
    header: &'static str,
    expected: &'static str,
) -> Result<&'a str, IdentityError> {
    let mut lines = text.lines();
    if lines.next().map(str::trim) != Some(header) {
        return Err(IdentityError::WrongHeader { expected, header });
    }
    Ok(lines.next().unwrap_or("").trim())
}

fn decode_fixed<const N: usize>(text: &str, what: &'static str) -> Result<[u8; N], IdentityError> {
    let bytes = BASE64
        .decode(text.trim())
        .map_err(|_| IdentityError::BadEncoding { what, length: N })?;
    bytes
        .try_into()
        .map_err(|_| IdentityError::BadEncoding { what, length: N })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_round_trip_and_signatures_verify() {
        let secret = SecretKey::from_seed([7; 32]);
        let reread = SecretKey::from_file_text(&secret.to_file_text()).unwrap();
        let public = PublicKey::from_file_text(&reread.public_key().to_file_text()).unwrap();
        assert_eq!(public, secret.public_key());
        let signature = secret.sign_base64(b"hello");
        assert_eq!(public.verify_base64(b"hello", &signature), Ok(true));
        assert_eq!(public.verify_base64(b"hellO", &signature), Ok(false));
    }

    #[test]
    fn a_public_key_file_is_not_accepted_as_a_secret_key() {
        let public = SecretKey::from_seed([1; 32]).public_key().to_file_text();
        assert!(matches!(
            SecretKey::from_file_text(&public),
            Err(IdentityError::WrongHeader { .. })
        ));
    }
}
