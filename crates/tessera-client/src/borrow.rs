//! Borrowed licenses kept on the station: the signed lease answer of a borrowing, stored in a
//! file so the application can run offline until the borrowing ends.
//!
//! A stored borrowing is only a cache of what the server signed: it is checked again, against
//! the vendor's root key, each time it is used ([`crate::Client::borrowed`]). An edited file
//! fails the signature, one copied from another machine names another station, and an
//! expired one is refused (and removed).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tessera_api::Lease;

/// A per-user state directory: `$<override_var>` if set, else `$XDG_STATE_HOME/tessera/<name>`,
/// else `~/.local/state/tessera/<name>`. `None` without any of them.
pub fn state_dir(override_var: &str, name: &str) -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(override_var).filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    if let Some(state) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(state).join("tessera").join(name));
    }
    let home = std::env::var_os("HOME").filter(|d| !d.is_empty())?;
    Some(PathBuf::from(home).join(".local/state/tessera").join(name))
}

/// Writes `text` to `path` readable by its owner only, replacing it at once (a crash leaves
/// the old file or the new one, never half of one).
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    // A fresh file of our own (never one left or planted there), owner-only from the start.
    let temporary = path.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&temporary);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&temporary)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)
}

/// One borrowing as stored: the server's answer (token, key, certificate, grant, secret), the
/// nonce the checkout sent, and the server that granted it (for the early return).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Borrowed {
    pub lease: Lease,
    pub nonce: String,
    /// The server to return the borrowing to (None: the client's hosts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
}

/// The borrowings of one user, a file per component, in one directory.
#[derive(Clone, Debug)]
pub struct BorrowStore {
    dir: PathBuf,
}

impl BorrowStore {
    pub fn new(dir: impl Into<PathBuf>) -> BorrowStore {
        BorrowStore { dir: dir.into() }
    }

    /// `$TESSERA_BORROW_DIR`, else `$XDG_STATE_HOME/tessera/borrowed`, else
    /// `~/.local/state/tessera/borrowed`.
    pub fn default_dir() -> Option<PathBuf> {
        state_dir("TESSERA_BORROW_DIR", "borrowed")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The part of this store for one vendor (a directory named by its key's fingerprint):
    /// applications of two vendors licensing a component of the same name never touch each
    /// other's borrowings.
    pub fn for_vendor(&self, vendor: Option<&tessera_core::PublicKey>) -> BorrowStore {
        let name = vendor.map_or_else(|| "unverified".to_string(), |key| key.fingerprint());
        BorrowStore::new(self.dir.join(name))
    }

    /// The file of a component's borrowing (component names are plain: letters, digits,
    /// `-`, `_`, `.`; anything else names no file).
    fn file(&self, component: &str) -> Option<PathBuf> {
        (tessera_core::key::is_name(component) && !component.starts_with('.'))
            .then(|| self.dir.join(format!("{component}.borrow.json")))
    }

    pub fn save(&self, component: &str, borrowed: &Borrowed) -> std::io::Result<()> {
        let path = self.file(component).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("component {component:?} is not a plain name"),
            )
        })?;
        let text = serde_json::to_string_pretty(borrowed).expect("a lease serializes");
        write_private(&path, &text)
    }

    /// The stored borrowing of a component, unchecked (see [`crate::Client::borrowed`]).
    /// An unreadable or malformed file counts as none.
    pub fn load(&self, component: &str) -> Option<Borrowed> {
        let text = std::fs::read_to_string(self.file(component)?).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// The latest application time this store has seen (milliseconds; 0: none), and records
    /// `now_ms` if it is later. A clock set back before that is the way to stretch a
    /// borrowing, so such a clock is refused ([`crate::Client::borrowed`]'s caller checks).
    /// It does not catch a clock stopped at one time, or a customer who deletes this file
    /// too: the most either gives is the borrowing's own length again.
    pub fn latest_seen(&self, now_ms: i64) -> i64 {
        let path = self.dir.join("clock");
        let seen = std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| text.trim().parse::<i64>().ok())
            .unwrap_or(0);
        if now_ms > seen {
            let _ = write_private(&path, &now_ms.to_string());
        }
        seen
    }

    pub fn remove(&self, component: &str) {
        if let Some(path) = self.file(component) {
            let _ = std::fs::remove_file(path);
        }
    }
}
