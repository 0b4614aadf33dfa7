//! The process's log on stderr: `RUST_LOG` filters (default: info, openraft's warnings),
//! text (colour only on a terminal) or one JSON object per line, and repeated warnings
//! throttled: a host of a domain that cannot reach a peer would otherwise write openraft's
//! same warning several times a second for as long as the peer is down.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

/// One warning (or error) of a kind per this period; the rest are counted, and said in one
/// line when the next one passes.
pub const THROTTLE_PERIOD: Duration = Duration::from_secs(60);

/// What is logged unless `RUST_LOG` says otherwise.
pub const DEFAULT_FILTER: &str = "info,openraft=warn";

/// Sets up the process's log (once, at start); `default_filter` unless `RUST_LOG` is set.
pub fn init(format: tessera_server::config::LogFormat, default_filter: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_filter.into());
    let json = format == tessera_server::config::LogFormat::Json;
    // The count of what was held back is written as the log's own line: an event logged
    // while another is being dispatched would be dropped by tracing.
    let say = move |held_back: u64, message: &str| {
        let at = jiff::Timestamp::now();
        if json {
            let line = serde_json::json!({"timestamp": at.to_string(), "level": "WARN",
                "target": "tessera::log", "message": message, "held_back": held_back});
            eprintln!("{line}");
        } else {
            eprintln!("{at}  WARN tessera::log: {message}");
        }
    };
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(Throttle::new(Instant::now, Box::new(say)));
    match format {
        tessera_server::config::LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .init(),
        tessera_server::config::LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
}

/// Where the count of held-back warnings is written: (count, message).
pub type Say = Box<dyn Fn(u64, &str) + Send + Sync>;

/// Lets through one warning or error per call site (the line of code that logs it) per
/// [`THROTTLE_PERIOD`]; counts the others, and before the next one that passes, says how
/// many were held back (`say`, as target `tessera::log`). Info and below pass untouched.
pub struct Throttle {
    now: fn() -> Instant,
    say: Say,
    /// call site → (when the last one passed, how many were held back since).
    seen: Mutex<HashMap<tracing::callsite::Identifier, (Instant, u64)>>,
}

impl Throttle {
    pub fn new(now: fn() -> Instant, say: Say) -> Throttle {
        Throttle {
            now,
            say,
            seen: Mutex::new(HashMap::new()),
        }
    }
}

impl<S: Subscriber> Layer<S> for Throttle {
    fn event_enabled(&self, event: &Event<'_>, _ctx: Context<'_, S>) -> bool {
        let metadata = event.metadata();
        if *metadata.level() > Level::WARN || metadata.target() == "tessera::log" {
            return true;
        }
        let now = (self.now)();
        let held_back = {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            let entry = seen
                .entry(metadata.callsite())
                .or_insert((now - THROTTLE_PERIOD * 2, 0));
            if now.duration_since(entry.0) < THROTTLE_PERIOD {
                entry.1 += 1;
                return false;
            }
            let held_back = entry.1;
            *entry = (now, 0);
            held_back
        };
        if held_back > 0 {
            (self.say)(
                held_back,
                &format!(
                    "{held_back} more warnings like the next one (from {}) were not logged in the last {} s",
                    metadata.target(),
                    THROTTLE_PERIOD.as_secs()
                ),
            );
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, OnceLock};

    /// A clock the test moves: seconds after a fixed start.
    static OFFSET_S: AtomicU64 = AtomicU64::new(0);
    fn test_now() -> Instant {
        static START: OnceLock<Instant> = OnceLock::new();
        *START.get_or_init(Instant::now) + Duration::from_secs(OFFSET_S.load(Ordering::SeqCst))
    }

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn peer_down(n: u32) {
        tracing::warn!(target: "openraft::network", peer = 3, "cannot reach peer 3 ({n})");
    }

    #[test]
    fn a_repeated_warning_is_logged_once_a_minute_with_the_count_of_the_others() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let summaries = buffer.clone();
        let say: Say = Box::new(move |_, message| {
            let mut summaries = summaries.clone();
            std::io::Write::write_all(
                &mut summaries,
                format!("WARN tessera::log: {message}\n").as_bytes(),
            )
            .unwrap();
        });
        let subscriber = tracing_subscriber::registry()
            .with(Throttle::new(test_now, say))
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(move || writer.clone()),
            );
        tracing::subscriber::with_default(subscriber, || {
            for n in 0..100 {
                peer_down(n);
                tracing::info!("an info line {n}"); // never held back
            }
            tracing::warn!("another warning"); // another call site: passes
            OFFSET_S.store(61, Ordering::SeqCst);
            peer_down(100);
            peer_down(101);
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let count = |needle: &str| lines.iter().filter(|l| l.contains(needle)).count();
        assert_eq!(count("cannot reach peer 3"), 2, "{text}");
        assert_eq!(count("an info line"), 100);
        assert_eq!(count("another warning"), 1);
        assert_eq!(count("99 more warnings like the next one"), 1, "{text}");
        let summary = lines.iter().position(|l| l.contains("99 more")).unwrap();
        assert!(
            lines[summary + 1].contains("cannot reach peer 3 (100)"),
            "{text}"
        );
    }
}
