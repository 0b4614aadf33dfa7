//! Durations as the configuration writes them (`"30s"`, `"2m"`, `"7d"`).

use std::time::Duration;

use crate::error::StartError;

/// `text` as a duration; the error names the setting (`name`) and what was written.
pub fn parse_duration(name: &str, text: &str) -> Result<Duration, StartError> {
    humantime::parse_duration(text).map_err(|error| StartError::Config {
        message: format!("{name} = {text:?} is not a duration like \"30s\" or \"2m\": {error}"),
    })
}
