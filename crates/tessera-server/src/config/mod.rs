//! Server configuration: a TOML file (`--config tessera.toml`) with command-line flags on top.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::StartError;

pub mod duration;
pub use duration::parse_duration;

/// The configuration file's shape. Every field is optional; defaults are in [`ServerConfig`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub data: Option<PathBuf>,
    pub listen: Option<String>,
    /// Vendor public key files whose signatures this server trusts.
    #[serde(default)]
    pub trust: Vec<PathBuf>,
    pub server_id: Option<String>,
    /// How long a lease lives without a heartbeat, e.g. "2m".
    pub lease_ttl: Option<String>,
    /// How far the wall clock may fall behind the last stamped time before the server refuses
    /// to issue, e.g. "5s".
    pub clock_tolerance: Option<String>,
    /// The largest clock difference accepted between neighbour servers, e.g. "30s": a grant
    /// ends this much earlier for its receiver and later for its donor.
    pub clock_skew_max: Option<String>,
    /// Largest accepted request body, in bytes.
    pub body_limit_bytes: Option<usize>,
    /// The vendor authority's URL, for online synchronization.
    pub authority: Option<String>,
    /// Automatic online synchronization: "off", "daily" (the default with an authority URL)
    /// or "weekly". Each scheduled sync is followed by the automatic key renewal.
    pub sync_schedule: Option<String>,
    /// Notification channels, per event kind.
    #[serde(default, rename = "notification")]
    pub notifications: Vec<crate::events::NotificationRule>,
    /// `[[admin_user]]`: console logins besides the admin token.
    #[serde(default, rename = "admin_user")]
    pub admin_users: Vec<AdminUser>,
    /// Shared secret authenticating the Raft traffic between the hosts of a domain.
    pub domain_secret: Option<String>,
    /// `[domain]`: this host's number and every host's address.
    pub domain: Option<crate::domain::DomainSection>,
    /// `[[neighbour]]`: servers this one donates licenses to or receives them from.
    #[serde(default, rename = "neighbour")]
    pub neighbours: Vec<crate::neighbours::config::NeighbourSection>,
    /// `[licenses]`: periods of the license exchange between servers.
    pub licenses: Option<crate::neighbours::config::LicensesSection>,
    /// Threads that serve requests and run consensus (default: one per CPU core). Set it
    /// lower when several hosts, or other busy services, share one machine.
    pub worker_threads: Option<usize>,
    /// Serve HTTPS with this certificate chain (PEM, the server's certificate first)…
    pub tls_cert: Option<PathBuf>,
    /// …and its private key (PEM). Both reload when the files change or on SIGHUP.
    pub tls_key: Option<PathBuf>,
    /// A CA (PEM) this server trusts, besides the system's roots, when it calls others over
    /// HTTPS: the authority, neighbours, the primary it forwards to, webhooks.
    pub tls_ca: Option<PathBuf>,
    /// The hosts of a domain or pair served over HTTPS trust a peer whose certificate's
    /// SHA-256 is one of these (`tessera tls fingerprint FILE`), instead of (or, with
    /// `tls_ca`, besides) its chain.
    #[serde(default)]
    pub peer_pins: Vec<String>,
    /// Mutual TLS between the hosts of a domain or pair: each shows its own certificate
    /// (`tls_cert`) to the others, and the peer routes refuse a connection without one from
    /// `tls_ca`. On top of the domain secret's tags.
    #[serde(default)]
    pub peer_mtls: bool,
    /// How the server logs to stderr: "text" (default; colour only on a terminal) or
    /// "json" (one object per line).
    pub log_format: Option<String>,
}

/// The log's format (`log_format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl LogFormat {
    pub fn parse(text: &str) -> Result<LogFormat, StartError> {
        match text {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(StartError::Config {
                message: format!("log_format = {other:?}: expected \"text\" or \"json\""),
            }),
        }
    }
}

/// A console user: `name` and an argon2 PHC string (`tessera admin hash-password`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminUser {
    pub name: String,
    pub password_hash: String,
}

/// How often the server synchronizes with the vendor by itself, when it has an authority
/// URL. Daily by default (see [`ServerConfig::sync_schedule`]): the vendor sees a clone, a
/// rollback or a rewritten history within a day, and the authority's short online
/// certificates (30 days by default) never lapse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncSchedule {
    Off,
    Daily,
    Weekly,
}

impl SyncSchedule {
    pub fn parse(text: &str) -> Result<SyncSchedule, StartError> {
        match text {
            "off" => Ok(SyncSchedule::Off),
            "daily" => Ok(SyncSchedule::Daily),
            "weekly" => Ok(SyncSchedule::Weekly),
            other => Err(StartError::Config {
                message: format!(
                    "sync_schedule = {other:?}: expected \"off\", \"daily\" or \"weekly\""
                ),
            }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SyncSchedule::Off => "off",
            SyncSchedule::Daily => "daily",
            SyncSchedule::Weekly => "weekly",
        }
    }

    pub fn period_ms(self) -> Option<i64> {
        match self {
            SyncSchedule::Off => None,
            SyncSchedule::Daily => Some(86_400_000),
            SyncSchedule::Weekly => Some(7 * 86_400_000),
        }
    }
}

/// Most `worker_threads` accepted.
pub const WORKER_THREADS_MAX: usize = 256;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub listen: String,
    pub trust: Vec<PathBuf>,
    pub server_id: Option<String>,
    pub lease_ttl: Duration,
    pub clock_tolerance: Duration,
    pub clock_skew_max: Duration,
    pub body_limit_bytes: usize,
    pub authority: Option<String>,
    /// As set (`None`: not set); see [`ServerConfig::sync_schedule`].
    pub sync_schedule: Option<SyncSchedule>,
    pub notifications: Vec<crate::events::NotificationRule>,
    pub admin_users: Vec<AdminUser>,
    /// `None`: a single host (a domain of one).
    pub domain: Option<crate::domain::DomainConfig>,
    pub domain_secret: Option<String>,
    pub neighbours: Vec<crate::neighbours::config::Neighbour>,
    pub licenses: crate::neighbours::config::LicenseSettings,
    /// Threads of the async runtime (`None`: one per CPU core). Read by the binary before it
    /// builds the runtime; [`WORKER_THREADS_MAX`] at most.
    pub worker_threads: Option<usize>,
    /// Tests of real processes only (`tessera server --test-clock`): the server's clock is
    /// this manual clock, moved by `POST /v1/test/clock` with the admin token. Debug builds
    /// only: a release build has no way to move its clock.
    #[cfg(debug_assertions)]
    pub test_clock: Option<crate::clock::ManualClock>,
    /// HTTPS: the certificate chain and key files (`tls_cert`, `tls_key`). The hosts of a
    /// domain or pair serving HTTPS reach each other over HTTPS too ([`Self::peer_scheme`]):
    /// give every host a certificate, or none.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// See `ConfigFile::tls_ca`.
    pub tls_ca: Option<PathBuf>,
    /// See `ConfigFile::peer_pins` (parsed).
    pub peer_pins: Vec<[u8; 32]>,
    /// See `ConfigFile::peer_mtls`.
    pub peer_mtls: bool,
    /// See `ConfigFile::log_format` (read by the binary when it sets up logging).
    pub log_format: LogFormat,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            data_dir: PathBuf::from("./tessera-data"),
            listen: "127.0.0.1:7400".into(),
            trust: Vec::new(),
            server_id: None,
            lease_ttl: Duration::from_secs(120),
            clock_tolerance: Duration::from_secs(5),
            clock_skew_max: Duration::from_secs(30),
            body_limit_bytes: 64 * 1024,
            authority: None,
            sync_schedule: None,
            notifications: Vec::new(),
            admin_users: Vec::new(),
            domain: None,
            domain_secret: None,
            neighbours: Vec::new(),
            licenses: Default::default(),
            worker_threads: None,
            #[cfg(debug_assertions)]
            test_clock: None,
            tls: None,
            tls_ca: None,
            peer_pins: Vec::new(),
            peer_mtls: false,
            log_format: LogFormat::Text,
        }
    }
}

impl ServerConfig {
    /// The automatic online sync in effect: as set, else daily with an authority URL and off
    /// without one.
    pub fn sync_schedule(&self) -> SyncSchedule {
        self.sync_schedule.unwrap_or(if self.authority.is_some() {
            SyncSchedule::Daily
        } else {
            SyncSchedule::Off
        })
    }

    /// How this host reaches its peers (Raft, pair, forwarded writes): `https` when it serves
    /// HTTPS itself (every host of a domain does, or none), else `http`.
    pub fn peer_scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// Reads a configuration file; relative paths in it are relative to the file.
    pub fn from_file(path: &Path) -> Result<ServerConfig, StartError> {
        let text = std::fs::read_to_string(path).map_err(|error| StartError::Config {
            message: format!("cannot read {}: {error}", path.display()),
        })?;
        let file: ConfigFile = toml::from_str(&text).map_err(|error| StartError::Config {
            message: format!("{}: {error}", path.display()),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut config = ServerConfig::default();
        config.apply_file(file, base)?;
        Ok(config)
    }

    fn apply_file(&mut self, file: ConfigFile, base: &Path) -> Result<(), StartError> {
        if let Some(data) = file.data {
            self.data_dir = base.join(data);
        }
        if let Some(listen) = file.listen {
            self.listen = listen;
        }
        self.trust
            .extend(file.trust.into_iter().map(|path| base.join(path)));
        if file.server_id.is_some() {
            self.server_id = file.server_id;
        }
        if let Some(ttl) = file.lease_ttl {
            self.lease_ttl = parse_duration("lease_ttl", &ttl)?;
        }
        if let Some(tolerance) = file.clock_tolerance {
            self.clock_tolerance = parse_duration("clock_tolerance", &tolerance)?;
        }
        if let Some(skew) = file.clock_skew_max {
            self.clock_skew_max = parse_duration("clock_skew_max", &skew)?;
        }
        if file.worker_threads.is_some() {
            self.worker_threads = file.worker_threads;
        }
        match (file.tls_cert, file.tls_key) {
            (Some(cert), Some(key)) => self.tls = Some((base.join(cert), base.join(key))),
            (None, None) => {}
            _ => {
                return Err(StartError::Config {
                    message: "tls_cert and tls_key go together: give both, or neither".into(),
                });
            }
        }
        if let Some(ca) = file.tls_ca {
            self.tls_ca = Some(base.join(ca));
        }
        for pin in &file.peer_pins {
            let pin =
                tessera_tls::parse_pin(pin).map_err(|message| StartError::Config { message })?;
            self.peer_pins.push(pin);
        }
        self.peer_mtls |= file.peer_mtls;
        if let Some(format) = file.log_format {
            self.log_format = LogFormat::parse(&format)?;
        }
        if let Some(limit) = file.body_limit_bytes {
            self.body_limit_bytes = limit;
        }
        if file.authority.is_some() {
            self.authority = file.authority;
        }
        if let Some(schedule) = file.sync_schedule {
            self.sync_schedule = Some(SyncSchedule::parse(&schedule)?);
        }
        if let Some(section) = file.domain {
            let host = section.host.ok_or_else(|| StartError::Config {
                message: "[domain] needs host = N, this host's number".into(),
            })?;
            let mut domain = crate::domain::DomainConfig::parse(host, &section.hosts)?;
            domain.join = section.join;
            self.domain = Some(domain);
            if section.domain_secret.is_some() {
                self.domain_secret = section.domain_secret;
            }
        }
        if file.domain_secret.is_some() {
            self.domain_secret = file.domain_secret;
        }
        for section in file.neighbours {
            self.neighbours
                .push(crate::neighbours::config::Neighbour::parse(section)?);
        }
        if let Some(section) = file.licenses {
            self.licenses = crate::neighbours::config::LicenseSettings::parse(section)?;
        }
        self.admin_users.extend(file.admin_users);
        for mut rule in file.notifications {
            rule.hook = rule.hook.map(|hook| base.join(hook));
            self.notifications.push(rule);
        }
        self.validate()
    }

    pub fn validate(&self) -> Result<(), StartError> {
        if self.tls.is_none() && (!self.peer_pins.is_empty() || self.peer_mtls) {
            return Err(StartError::Config {
                message: "peer_pins and peer_mtls need tls_cert and tls_key: the hosts of a domain speak HTTPS to each other only when they serve HTTPS".into(),
            });
        }
        if self.peer_mtls && self.tls_ca.is_none() {
            return Err(StartError::Config {
                message: "peer_mtls needs tls_ca: the CA whose certificates the hosts of the domain show each other".into(),
            });
        }
        for rule in &self.notifications {
            if let Some(unknown) = rule.events.iter().find(|name| {
                *name != "*"
                    && !crate::events::EventKind::ALL
                        .iter()
                        .any(|kind| kind.as_str() == name.as_str())
            }) {
                let known: Vec<&str> = crate::events::EventKind::ALL
                    .iter()
                    .map(|kind| kind.as_str())
                    .collect();
                return Err(StartError::Config {
                    message: format!(
                        "a notification rule names the event kind {unknown:?}, which Tessera does not raise; the kinds are \"*\" and {}",
                        known.join(", ")
                    ),
                });
            }
        }
        let ttl_ms = self.lease_ttl.as_millis();
        if !(3_000..=tessera_core::ledger::LEASE_TTL_MS_MAX as u128).contains(&ttl_ms) {
            return Err(StartError::Config {
                message: format!(
                    "lease_ttl must be between 3s and 7d, not {}",
                    humantime::format_duration(self.lease_ttl)
                ),
            });
        }
        if let Some(schedule) = self.sync_schedule
            && schedule != SyncSchedule::Off
            && self.authority.is_none()
        {
            return Err(StartError::Config {
                message: format!(
                    "sync_schedule = \"{}\" needs the authority's URL: set authority = \"http://...\"",
                    schedule.name()
                ),
            });
        }
        if let Some(domain) = &self.domain {
            domain.validate()?;
            crate::domain::validate_secret(domain, self.domain_secret.as_deref())?;
        }
        crate::neighbours::config::validate(&self.neighbours, self.server_id.as_deref())?;
        if let Some(threads) = self.worker_threads
            && !(1..=WORKER_THREADS_MAX).contains(&threads)
        {
            return Err(StartError::Config {
                message: format!("worker_threads must be 1 to {WORKER_THREADS_MAX}, not {threads}"),
            });
        }
        if self.body_limit_bytes < 1024 {
            return Err(StartError::Config {
                message: "body_limit_bytes must be at least 1024".into(),
            });
        }
        Ok(())
    }

    /// Stations are told to heartbeat at a third of the lease time, so two lost heartbeats
    /// in a row still keep the lease.
    pub fn heartbeat_interval_s(&self) -> u64 {
        (self.lease_ttl.as_secs() / 3).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::ServerConfig;

    /// A notification rule with a misspelt kind would never fire: refused at start, named.
    #[test]
    fn a_notification_rule_naming_a_kind_tessera_does_not_raise_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tessera.toml");
        let rule =
            |events: &str| format!("[[notification]]\nevents = {events}\nhook = \"notify.sh\"\n");
        std::fs::write(&path, rule(r#"["key_imported", "grant_forged", "*"]"#)).unwrap();
        let config = ServerConfig::from_file(&path).unwrap();
        assert_eq!(config.notifications[0].events.len(), 3);
        std::fs::write(&path, rule(r#"["key_imported", "key_expird"]"#)).unwrap();
        let error = ServerConfig::from_file(&path).err().unwrap().to_string();
        assert!(
            error.contains("\"key_expird\"") && error.contains("key_expiring"),
            "{error}"
        );
    }
}
