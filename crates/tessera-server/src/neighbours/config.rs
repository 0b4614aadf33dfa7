//! `[[neighbour]]` and `[licenses]` in `tessera.toml`: the servers this one exchanges
//! licenses with, and the periods of the exchange.

use std::time::Duration;

use serde::Deserialize;
use tessera_core::PublicKey;

use crate::config::duration::parse_duration;
use crate::error::StartError;

/// `[[neighbour]]` as written in the file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NeighbourSection {
    pub id: String,
    pub url: String,
    pub relation: String,
    pub send: Option<bool>,
    pub receive: Option<bool>,
    pub connection: Option<String>,
    pub reconnect_period: Option<String>,
    /// The neighbour's identity public key, base64 (its `GET /v1/identity`).
    pub public_key: String,
}

/// `[licenses]` as written in the file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LicensesSection {
    pub donation_renewal_period: Option<String>,
    pub sync_period: Option<String>,
    pub usage_report_period: Option<String>,
    pub active_station_period: Option<String>,
    pub preliminary_renewal_interval: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Relation {
    Parent,
    Child,
    Peer,
}

impl Relation {
    pub fn name(self) -> &'static str {
        match self {
            Relation::Parent => "parent",
            Relation::Child => "child",
            Relation::Peer => "peer",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Connection {
    Permanent,
    /// Connects every `reconnect_period`.
    Periodic {
        reconnect_period: Duration,
    },
}

impl Connection {
    pub fn name(self) -> &'static str {
        match self {
            Connection::Permanent => "permanent",
            Connection::Periodic { .. } => "periodic",
        }
    }
}

/// A configured neighbour server.
#[derive(Clone, Debug)]
pub struct Neighbour {
    pub id: String,
    pub url: String,
    pub relation: Relation,
    /// This server may donate to it: a child, or a peer with `send = true`.
    pub send: bool,
    /// This server accepts licenses from it: a parent, or a peer with `receive = true`.
    pub receive: bool,
    pub connection: Connection,
    pub public_key: PublicKey,
}

/// The periods of the license exchange. The donor's renewal, sync, report and counting
/// periods apply to its donations; the receiver's preliminary renewal interval to its grants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LicenseSettings {
    pub donation_renewal_period: Duration,
    pub sync_period: Duration,
    pub usage_report_period: Duration,
    pub active_station_period: Duration,
    pub preliminary_renewal_interval: Duration,
}

impl Default for LicenseSettings {
    fn default() -> LicenseSettings {
        LicenseSettings {
            donation_renewal_period: Duration::from_secs(3600),
            sync_period: Duration::from_secs(600),
            usage_report_period: Duration::from_secs(3600),
            active_station_period: Duration::from_secs(86_400),
            preliminary_renewal_interval: Duration::from_secs(600),
        }
    }
}

fn config_error(message: String) -> StartError {
    StartError::Config { message }
}

impl LicenseSettings {
    pub fn parse(section: LicensesSection) -> Result<LicenseSettings, StartError> {
        let mut settings = LicenseSettings::default();
        let fields = [
            (
                "donation_renewal_period",
                section.donation_renewal_period,
                &mut settings.donation_renewal_period,
            ),
            (
                "sync_period",
                section.sync_period,
                &mut settings.sync_period,
            ),
            (
                "usage_report_period",
                section.usage_report_period,
                &mut settings.usage_report_period,
            ),
            (
                "active_station_period",
                section.active_station_period,
                &mut settings.active_station_period,
            ),
            (
                "preliminary_renewal_interval",
                section.preliminary_renewal_interval,
                &mut settings.preliminary_renewal_interval,
            ),
        ];
        for (name, text, slot) in fields {
            if let Some(text) = text {
                let value = parse_duration(&format!("[licenses] {name}"), &text)?;
                if value < Duration::from_secs(1) {
                    return Err(config_error(format!(
                        "[licenses] {name} must be at least 1s"
                    )));
                }
                *slot = value;
            }
        }
        let cap =
            Duration::from_millis(tessera_core::ledger::DONATION_RENEWAL_PERIOD_CAP_MS as u64);
        if settings.donation_renewal_period > cap {
            return Err(config_error(format!(
                "[licenses] donation_renewal_period must be at most {}, not {}: a neighbour keeps donated licenses up to one period after they are recalled (docs/security.md)",
                humantime::format_duration(cap),
                humantime::format_duration(settings.donation_renewal_period)
            )));
        }
        Ok(settings)
    }
}

impl Neighbour {
    pub fn parse(section: NeighbourSection) -> Result<Neighbour, StartError> {
        let id = section.id;
        let what = format!("[[neighbour]] {id:?}");
        if !tessera_core::key::is_name(&id) {
            return Err(config_error(format!(
                "{what}: id must be a server ID (1-128 of A-Z a-z 0-9 - _ .)"
            )));
        }
        if !(section.url.starts_with("http://") || section.url.starts_with("https://")) {
            return Err(config_error(format!(
                "{what}: url = {:?} must start with http:// or https://",
                section.url
            )));
        }
        let relation = match section.relation.as_str() {
            "parent" => Relation::Parent,
            "child" => Relation::Child,
            "peer" => Relation::Peer,
            other => {
                return Err(config_error(format!(
                    "{what}: relation = {other:?}: expected \"parent\", \"child\" or \"peer\""
                )));
            }
        };
        let (send, receive) = match relation {
            Relation::Child => (true, false),
            Relation::Parent => (false, true),
            Relation::Peer => (
                section.send.unwrap_or(false),
                section.receive.unwrap_or(false),
            ),
        };
        // For a parent or a child the direction is fixed by the relation ("cannot be
        // changed"); the flags are accepted and ignored, with a word when they disagree.
        if relation != Relation::Peer
            && (section.send.is_some_and(|s| s != send)
                || section.receive.is_some_and(|r| r != receive))
        {
            tracing::info!(
                neighbour = %id,
                relation = relation.name(),
                "send and receive apply to peers only: a parent donates to its children, a child receives from its parents"
            );
        }
        let connection = match (section.connection.as_deref(), section.reconnect_period) {
            (None | Some("permanent"), None) => Connection::Permanent,
            (Some("periodic"), Some(period)) => {
                let reconnect_period =
                    parse_duration(&format!("{what} reconnect_period"), &period)?;
                if reconnect_period < Duration::from_secs(1) {
                    return Err(config_error(format!(
                        "{what}: reconnect_period must be at least 1s"
                    )));
                }
                Connection::Periodic { reconnect_period }
            }
            (Some("periodic"), None) => {
                return Err(config_error(format!(
                    "{what}: connection = \"periodic\" needs reconnect_period, e.g. \"30m\""
                )));
            }
            (None | Some("permanent"), Some(_)) => {
                return Err(config_error(format!(
                    "{what}: reconnect_period is for connection = \"periodic\""
                )));
            }
            (Some(other), _) => {
                return Err(config_error(format!(
                    "{what}: connection = {other:?}: expected \"permanent\" or \"periodic\""
                )));
            }
        };
        let public_key = PublicKey::from_base64(section.public_key.trim()).map_err(|error| {
            config_error(format!(
                "{what}: public_key is not the neighbour's identity key ({error}); copy it from the neighbour's GET /v1/identity"
            ))
        })?;
        Ok(Neighbour {
            id,
            url: section.url.trim_end_matches('/').to_string(),
            relation,
            send,
            receive,
            connection,
            public_key,
        })
    }
}

/// Checks the neighbour list as a whole against this server's ID.
pub fn validate(neighbours: &[Neighbour], server_id: Option<&str>) -> Result<(), StartError> {
    if neighbours.is_empty() {
        return Ok(());
    }
    let Some(server_id) = server_id else {
        return Err(config_error(
            "[[neighbour]] needs this server's own server_id: neighbours know each other by it"
                .into(),
        ));
    };
    let mut seen = std::collections::BTreeSet::new();
    for neighbour in neighbours {
        if neighbour.id == server_id {
            return Err(config_error(format!(
                "[[neighbour]] {:?} is this server's own ID",
                neighbour.id
            )));
        }
        if !seen.insert(&neighbour.id) {
            return Err(config_error(format!(
                "[[neighbour]] {:?} is listed twice",
                neighbour.id
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tessera_core::SecretKey;

    use super::{Connection, Relation};
    use crate::config::ServerConfig;

    fn key() -> String {
        SecretKey::from_seed([3; 32]).public_key().to_base64()
    }

    fn parse(text: &str) -> Result<ServerConfig, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tessera.toml");
        std::fs::write(&path, text).unwrap();
        ServerConfig::from_file(&path).map_err(|e| e.to_string())
    }

    fn neighbour(fields: &str) -> String {
        format!(
            "server_id = \"hq\"\n[[neighbour]]\nid = \"branch-1\"\nurl = \"http://127.0.0.1:7410\"\npublic_key = \"{}\"\n{fields}\n",
            key()
        )
    }

    #[test]
    fn a_donation_renewal_period_above_seven_days_is_refused_naming_the_cap() {
        let with = |period: &str| {
            parse(&format!(
                "{}[licenses]\ndonation_renewal_period = \"{period}\"\n",
                neighbour("relation = \"child\"")
            ))
        };
        assert_eq!(
            with("7d").unwrap().licenses.donation_renewal_period,
            Duration::from_secs(7 * 86_400)
        );
        let error = with("8d").unwrap_err();
        assert!(
            error.contains("donation_renewal_period must be at most 7days, not 8days"),
            "{error}"
        );
    }

    #[test]
    fn the_documented_configuration_parses() {
        let config = parse(&format!(
            "{}[licenses]\ndonation_renewal_period = \"1h\"\nsync_period = \"10m\"\nusage_report_period = \"1h\"\nactive_station_period = \"1d\"\npreliminary_renewal_interval = \"10m\"\n",
            neighbour(
                "relation = \"child\"\nsend = true\nreceive = true\nconnection = \"permanent\""
            )
        ))
        .unwrap();
        let n = &config.neighbours[0];
        assert_eq!(
            (n.relation, n.send, n.receive, n.connection),
            (Relation::Child, true, false, Connection::Permanent),
            "a child's direction is fixed by the relation"
        );
        assert_eq!(
            config.licenses.active_station_period,
            Duration::from_secs(86_400)
        );
        let peer = parse(&neighbour(
            "relation = \"peer\"\nsend = false\nreceive = true\nconnection = \"periodic\"\nreconnect_period = \"30m\"",
        ))
        .unwrap();
        let n = &peer.neighbours[0];
        assert_eq!(
            (n.relation, n.send, n.receive, n.connection),
            (
                Relation::Peer,
                false,
                true,
                Connection::Periodic {
                    reconnect_period: Duration::from_secs(1800)
                }
            )
        );
        let parent = parse(&neighbour("relation = \"parent\"")).unwrap();
        assert_eq!(
            (parent.neighbours[0].send, parent.neighbours[0].receive),
            (false, true)
        );
    }

    #[test]
    fn misconfigured_neighbours_are_refused_with_clear_errors() {
        let cases = [
            (
                neighbour("relation = \"cousin\""),
                "relation = \"cousin\": expected \"parent\", \"child\" or \"peer\"",
            ),
            (
                neighbour("relation = \"peer\"\nconnection = \"periodic\""),
                "needs reconnect_period",
            ),
            (
                neighbour("relation = \"peer\"\nconnection = \"sometimes\""),
                "expected \"permanent\" or \"periodic\"",
            ),
            (
                neighbour("relation = \"peer\"\nreconnect_period = \"1h\""),
                "reconnect_period is for connection = \"periodic\"",
            ),
            (
                neighbour("relation = \"child\"").replace(&key(), "not-a-key"),
                "public_key is not the neighbour's identity key",
            ),
            (
                neighbour("relation = \"child\"").replace("http://", "ftp://"),
                "must start with http:// or https://",
            ),
            (
                neighbour("relation = \"child\"").replace("server_id = \"hq\"\n", ""),
                "needs this server's own server_id",
            ),
            (
                neighbour("relation = \"child\"")
                    .replace("server_id = \"hq\"", "server_id = \"branch-1\""),
                "is this server's own ID",
            ),
            (
                format!(
                    "{}{}",
                    neighbour("relation = \"child\""),
                    neighbour("relation = \"peer\"").replace("server_id = \"hq\"\n", "")
                ),
                "\"branch-1\" is listed twice",
            ),
            (
                format!(
                    "{}[licenses]\nsync_period = \"soon\"\n",
                    neighbour("relation = \"child\"")
                ),
                "[licenses] sync_period = \"soon\" is not a duration",
            ),
            (
                format!(
                    "{}[licenses]\nsync_period = \"0s\"\n",
                    neighbour("relation = \"child\"")
                ),
                "[licenses] sync_period must be at least 1s",
            ),
        ];
        for (text, expected) in cases {
            let error = parse(&text).expect_err(&text);
            assert!(error.contains(expected), "{error}\n--- for ---\n{text}");
        }
    }
}
