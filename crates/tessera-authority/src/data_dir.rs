//! The data directory: the vendor root key pair, the admin token and the database.
//!
//! On first start the authority creates `vendor.key` (0600), `vendor.pub`, `admin.token`
//! (0600, 64 hex digits) and `authority.sqlite`. A `vendor.key` already present, e.g. made by
//! `tessera vendor init --dir DIR`, is used as is: keys issued offline and online then verify
//! against the same `vendor.pub`.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use tessera_core::{PublicKey, SecretKey};

use crate::error::AuthorityError;
use crate::ids::random_token;

pub const VENDOR_KEY_FILE: &str = "vendor.key";
pub const VENDOR_PUB_FILE: &str = "vendor.pub";
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
pub const DATABASE_FILE: &str = "authority.sqlite";
/// A shorter token in a hand-edited file would be guessable.
pub const ADMIN_TOKEN_LENGTH_MIN: usize = 32;

pub struct DataDir {
    pub path: PathBuf,
    pub vendor: SecretKey,
    pub admin_token: String,
}

impl DataDir {
    pub fn open_or_init(path: &Path) -> Result<DataDir, AuthorityError> {
        let fail = |message: String| AuthorityError::DataDir {
            path: path.display().to_string(),
            message,
        };
        std::fs::create_dir_all(path).map_err(|e| fail(format!("cannot create: {e}")))?;

        let key_path = path.join(VENDOR_KEY_FILE);
        let pub_path = path.join(VENDOR_PUB_FILE);
        let vendor = if key_path.exists() {
            let text = std::fs::read_to_string(&key_path)
                .map_err(|e| fail(format!("cannot read {VENDOR_KEY_FILE}: {e}")))?;
            SecretKey::from_file_text(&text).map_err(|e| fail(format!("{VENDOR_KEY_FILE}: {e}")))?
        } else {
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).map_err(|e| fail(format!("no randomness: {e}")))?;
            let vendor = SecretKey::from_seed(seed);
            write_private(&key_path, &vendor.to_file_text()).map_err(&fail)?;
            vendor
        };
        // vendor.pub is what customers' servers trust; a stale one next to a different key
        // would make every key this authority signs fail verification at the customer.
        let public = vendor.public_key();
        if pub_path.exists() {
            let text = std::fs::read_to_string(&pub_path)
                .map_err(|e| fail(format!("cannot read {VENDOR_PUB_FILE}: {e}")))?;
            let on_disk = PublicKey::from_file_text(&text)
                .map_err(|e| fail(format!("{VENDOR_PUB_FILE}: {e}")))?;
            if on_disk != public {
                return Err(fail(format!(
                    "{VENDOR_PUB_FILE} (key {}) does not belong to {VENDOR_KEY_FILE} (key {})",
                    on_disk.fingerprint(),
                    public.fingerprint()
                )));
            }
        } else {
            std::fs::write(&pub_path, public.to_file_text())
                .map_err(|e| fail(format!("cannot write {VENDOR_PUB_FILE}: {e}")))?;
        }

        let token_path = path.join(ADMIN_TOKEN_FILE);
        let admin_token = if token_path.exists() {
            std::fs::read_to_string(&token_path)
                .map_err(|e| fail(format!("cannot read {ADMIN_TOKEN_FILE}: {e}")))?
                .trim()
                .to_string()
        } else {
            let token = random_token().map_err(|e| fail(format!("no randomness: {e}")))?;
            write_private(&token_path, &format!("{token}\n")).map_err(&fail)?;
            token
        };
        if admin_token.len() < ADMIN_TOKEN_LENGTH_MIN {
            return Err(fail(format!(
                "{ADMIN_TOKEN_FILE} holds a token shorter than {ADMIN_TOKEN_LENGTH_MIN} characters"
            )));
        }
        Ok(DataDir {
            path: path.to_path_buf(),
            vendor,
            admin_token,
        })
    }

    pub fn database_path(&self) -> PathBuf {
        self.path.join(DATABASE_FILE)
    }
}

/// Writes a new file readable by the owner only, and syncs it before returning. Never
/// replaces an existing file: losing a vendor key would orphan every key it signed.
fn write_private(path: &Path, contents: &str) -> Result<(), String> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn first_open_creates_private_files_and_reopen_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDir::open_or_init(dir.path()).unwrap();
        assert_eq!(mode(&dir.path().join(VENDOR_KEY_FILE)), 0o600);
        assert_eq!(mode(&dir.path().join(ADMIN_TOKEN_FILE)), 0o600);
        assert_eq!(first.admin_token.len(), 64);
        let again = DataDir::open_or_init(dir.path()).unwrap();
        assert_eq!(again.admin_token, first.admin_token);
        assert_eq!(again.vendor.public_key(), first.vendor.public_key());
    }

    #[test]
    fn an_existing_vendor_key_is_used_and_a_mismatched_pub_refused() {
        let dir = tempfile::tempdir().unwrap();
        let vendor = SecretKey::from_seed([9; 32]);
        std::fs::write(dir.path().join(VENDOR_KEY_FILE), vendor.to_file_text()).unwrap();
        let data = DataDir::open_or_init(dir.path()).unwrap();
        assert_eq!(data.vendor.public_key(), vendor.public_key());
        let written = std::fs::read_to_string(dir.path().join(VENDOR_PUB_FILE)).unwrap();
        assert_eq!(written, vendor.public_key().to_file_text());

        let other = tempfile::tempdir().unwrap();
        std::fs::write(other.path().join(VENDOR_KEY_FILE), vendor.to_file_text()).unwrap();
        let stranger = SecretKey::from_seed([8; 32]).public_key();
        std::fs::write(other.path().join(VENDOR_PUB_FILE), stranger.to_file_text()).unwrap();
        let error = DataDir::open_or_init(other.path()).err().unwrap();
        assert!(error.to_string().contains("does not belong"), "{error}");
    }
}
