//! Server domains: the hosts (1 to [`HOSTS_MAX`], numbered) that together form one license
//! server. Each host is a voter of the domain's Raft group; its node id is its host number.
//!
//! Configuration (`tessera.toml`):
//! ```toml
//! domain_secret = "a long random string, the same on every host"
//! [domain]
//! host = 1
//! hosts = ["1=127.0.0.1:7400", "2=127.0.0.1:7401", "3=127.0.0.1:7402"]
//! ```

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::error::StartError;

/// The largest domain.
pub const HOSTS_MAX: usize = 20;
/// The shortest accepted `domain_secret`.
pub const DOMAIN_SECRET_MIN_CHARS: usize = 16;
/// Header marking a request a backup forwarded to the primary (value: the backup's number).
/// A request carrying it is never forwarded again (one hop at most).
pub const FORWARDED_HEADER: &str = "x-tessera-forwarded-by";

/// `[domain]` as written in the file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainSection {
    pub host: Option<u64>,
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Also accepted here, for files that put it under `[domain]`.
    pub domain_secret: Option<String>,
    /// This host joins a running domain (`tessera domain add-host`): it never initializes
    /// the group itself.
    #[serde(default)]
    pub join: bool,
}

/// A validated domain: this host's number and every host's address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainConfig {
    pub host: u64,
    /// host number → `host:port`, this host included.
    pub hosts: BTreeMap<u64, String>,
    /// Joining a running domain: wait to be added instead of initializing a new one.
    pub join: bool,
}

fn config_error(message: String) -> StartError {
    StartError::Config { message }
}

impl DomainConfig {
    /// Parses `["1=ADDR", "2=ADDR", ...]` (or the CLI's `1=ADDR,2=ADDR`) and checks it.
    pub fn parse(host: u64, entries: &[String]) -> Result<DomainConfig, StartError> {
        let mut hosts = BTreeMap::new();
        for entry in entries {
            let entry = entry.trim();
            let (number, addr) = entry.split_once('=').ok_or_else(|| {
                config_error(format!(
                    "domain hosts entry {entry:?} is not NUMBER=ADDRESS like \"1=127.0.0.1:7400\""
                ))
            })?;
            let number: u64 = number.trim().parse().map_err(|_| {
                config_error(format!(
                    "domain hosts entry {entry:?}: {number:?} is not a host number (1 to {HOSTS_MAX})"
                ))
            })?;
            let addr = addr.trim();
            if addr.is_empty() || !addr.contains(':') {
                return Err(config_error(format!(
                    "domain hosts entry {entry:?}: the address must be HOST:PORT"
                )));
            }
            if hosts.insert(number, addr.to_string()).is_some() {
                return Err(config_error(format!(
                    "domain hosts: host number {number} appears twice"
                )));
            }
        }
        let domain = DomainConfig {
            host,
            hosts,
            join: false,
        };
        domain.validate()?;
        Ok(domain)
    }

    /// Parses the CLI's `--hosts 1=ADDR,2=ADDR`.
    pub fn parse_list(host: u64, list: &str) -> Result<DomainConfig, StartError> {
        let entries: Vec<String> = list
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(str::to_string)
            .collect();
        DomainConfig::parse(host, &entries)
    }

    pub fn validate(&self) -> Result<(), StartError> {
        if self.hosts.is_empty() {
            return Err(config_error(
                "[domain] hosts is empty: list every host as \"N=HOST:PORT\"".into(),
            ));
        }
        if self.hosts.len() > HOSTS_MAX {
            return Err(config_error(format!(
                "[domain] lists {} hosts; a domain has at most {HOSTS_MAX}",
                self.hosts.len()
            )));
        }
        if let Some(bad) = self.hosts.keys().find(|n| **n == 0 || **n > 1000) {
            return Err(config_error(format!(
                "[domain] host number {bad} is out of range: number hosts from 1"
            )));
        }
        if !self.hosts.contains_key(&self.host) {
            return Err(config_error(format!(
                "[domain] host = {} is not in hosts (numbers listed: {:?})",
                self.host,
                self.hosts.keys().collect::<Vec<_>>()
            )));
        }
        Ok(())
    }

    /// This host's address as the other hosts reach it.
    pub fn own_address(&self) -> &str {
        &self.hosts[&self.host]
    }

    pub fn is_multi_host(&self) -> bool {
        self.hosts.len() > 1
    }
}

/// Checks the secret a multi-host domain needs.
pub fn validate_secret(domain: &DomainConfig, secret: Option<&str>) -> Result<(), StartError> {
    if !domain.is_multi_host() {
        return Ok(());
    }
    match secret {
        None => Err(config_error(
            "a domain of several hosts needs domain_secret (the same random string, at least 16 characters, on every host): it authenticates the hosts' Raft traffic".into(),
        )),
        Some(secret) if secret.chars().count() < DOMAIN_SECRET_MIN_CHARS => Err(config_error(
            format!("domain_secret must be at least {DOMAIN_SECRET_MIN_CHARS} characters"),
        )),
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(n: u64) -> Vec<String> {
        (1..=n)
            .map(|i| format!("{i}=127.0.0.1:{}", 7400 + i))
            .collect()
    }

    #[test]
    fn a_three_host_list_parses_in_host_order() {
        let domain = DomainConfig::parse_list(2, "3=h:3, 1=h:1,2=h:2").unwrap();
        assert_eq!(domain.hosts.keys().copied().collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(domain.own_address(), "h:2");
    }

    #[test]
    fn more_than_twenty_hosts_are_refused_with_the_limit_named() {
        let error = DomainConfig::parse(1, &entries(21))
            .unwrap_err()
            .to_string();
        assert!(error.contains("at most 20"), "{error}");
        DomainConfig::parse(1, &entries(20)).unwrap();
    }

    #[test]
    fn a_duplicate_host_number_is_refused() {
        let error = DomainConfig::parse_list(1, "1=a:1,1=b:2")
            .unwrap_err()
            .to_string();
        assert!(error.contains("appears twice"), "{error}");
    }

    #[test]
    fn this_host_must_be_in_the_list() {
        let error = DomainConfig::parse(4, &entries(3)).unwrap_err().to_string();
        assert!(error.contains("host = 4 is not in hosts"), "{error}");
    }

    #[test]
    fn malformed_entries_name_the_entry() {
        let error = DomainConfig::parse_list(1, "1=a:1,two=b:2")
            .unwrap_err()
            .to_string();
        assert!(error.contains("\"two=b:2\""), "{error}");
        let error = DomainConfig::parse_list(1, "1-a:1")
            .unwrap_err()
            .to_string();
        assert!(error.contains("NUMBER=ADDRESS"), "{error}");
    }

    #[test]
    fn several_hosts_need_a_long_enough_secret() {
        let domain = DomainConfig::parse(1, &entries(3)).unwrap();
        assert!(validate_secret(&domain, None).is_err());
        assert!(validate_secret(&domain, Some("short")).is_err());
        validate_secret(&domain, Some("0123456789abcdef")).unwrap();
        let single = DomainConfig::parse(1, &entries(1)).unwrap();
        validate_secret(&single, None).unwrap();
    }
}
