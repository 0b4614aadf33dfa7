//! The data directory: created on first start with the server's identity key pair and the
//! admin token, both readable by the owner only.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use tessera_core::SecretKey;

use crate::error::StartError;
use crate::ids::random_bytes;

pub const IDENTITY_FILE: &str = "server.key";
pub const PUBLIC_FILE: &str = "server.pub";
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

pub struct DataDir {
    pub path: PathBuf,
    pub identity: SecretKey,
    pub admin_token: String,
}

impl DataDir {
    pub fn open_or_init(path: &Path) -> Result<DataDir, StartError> {
        let fail = |message: String| StartError::DataDir {
            path: path.display().to_string(),
            message,
        };
        std::fs::create_dir_all(path).map_err(|e| fail(format!("cannot create: {e}")))?;
        let identity_path = path.join(IDENTITY_FILE);
        let identity = if identity_path.exists() {
            let text = std::fs::read_to_string(&identity_path)
                .map_err(|e| fail(format!("cannot read {IDENTITY_FILE}: {e}")))?;
            SecretKey::from_file_text(&text).map_err(|e| fail(format!("{IDENTITY_FILE}: {e}")))?
        } else {
            let seed = random_bytes().map_err(|e| fail(format!("no randomness: {e}")))?;
            let identity = SecretKey::from_seed(seed);
            write_private(&identity_path, &identity.to_file_text())
                .map_err(|e| fail(e.to_string()))?;
            std::fs::write(path.join(PUBLIC_FILE), identity.public_key().to_file_text())
                .map_err(|e| fail(format!("cannot write {PUBLIC_FILE}: {e}")))?;
            identity
        };
        let token_path = path.join(ADMIN_TOKEN_FILE);
        let admin_token = if token_path.exists() {
            std::fs::read_to_string(&token_path)
                .map_err(|e| fail(format!("cannot read {ADMIN_TOKEN_FILE}: {e}")))?
                .trim()
                .to_string()
        } else {
            let token =
                hex::encode(random_bytes().map_err(|e| fail(format!("no randomness: {e}")))?);
            write_private(&token_path, &format!("{token}\n")).map_err(|e| fail(e.to_string()))?;
            token
        };
        if admin_token.len() < 16 {
            return Err(fail(format!(
                "{ADMIN_TOKEN_FILE} holds a token shorter than 16 characters"
            )));
        }
        Ok(DataDir {
            path: path.to_path_buf(),
            identity,
            admin_token,
        })
    }
}

/// A private file that could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {}: {source}", path.display())]
pub struct WriteError {
    /// `create` or `write`.
    pub action: &'static str,
    pub path: std::path::PathBuf,
    pub source: std::io::Error,
}

/// Writes a file readable by the owner only, and syncs it before returning.
pub fn write_private(path: &Path, contents: &str) -> Result<(), WriteError> {
    let fail = |action: &'static str| {
        move |source| WriteError {
            action,
            path: path.to_path_buf(),
            source,
        }
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(fail("create"))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(fail("write"))
}
