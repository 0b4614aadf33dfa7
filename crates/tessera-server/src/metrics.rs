//! Prometheus metrics. One registry per server, so many servers can live in one process.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ComponentLabel {
    pub component: String,
}

/// A license key (or a received grant `KEY@DONOR`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabel {
    pub key: String,
}

/// A neighbour server, by server ID.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NeighbourLabel {
    pub neighbour: String,
}

/// A host of the server domain, by number.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HostLabel {
    pub host: String,
}

/// A pair status of the reference ("Paired and Available", ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PairStatusLabel {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub method: String,
    pub route: String,
}

fn latency_histogram() -> Histogram {
    // 0.1 ms to ~1.6 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 15))
}

pub struct Metrics {
    registry: Registry,
    pub checkouts: Family<OutcomeLabel, Counter>,
    pub denials: Family<ComponentLabel, Counter>,
    pub heartbeats: Counter,
    pub checkins: Counter,
    pub expired_leases: Counter,
    /// Failed exchanges with neighbour servers, by neighbour.
    pub neighbour_errors: Family<NeighbourLabel, Counter>,
    /// Donor/receiver record mismatches found by the license synchronization, by neighbour.
    pub neighbour_mismatches: Family<NeighbourLabel, Counter>,
    /// Messages from other servers refused (unknown, not allowed, bad signature, clock skew).
    pub neighbour_refused: Counter,
    pub requests: Family<RouteLabel, Histogram, fn() -> Histogram>,
    licenses: Family<ComponentLabel, Gauge>,
    licenses_in_use: Family<ComponentLabel, Gauge>,
    licenses_free: Family<ComponentLabel, Gauge>,
    licenses_donated: Family<ComponentLabel, Gauge>,
    key_licenses: Family<KeyLabel, Gauge>,
    key_licenses_in_use: Family<KeyLabel, Gauge>,
    key_licenses_donated: Family<KeyLabel, Gauge>,
    key_licenses_received: Family<KeyLabel, Gauge>,
    /// The 366-day sync deadline as Unix time in seconds (0: none).
    pub sync_deadline: Gauge,
    active_leases: Gauge,
    is_primary: Gauge,
    /// Per domain host, as this host sees it (set from `Consensus::domain_view` on scrape).
    pub domain_host_healthy: Family<HostLabel, Gauge>,
    pub domain_host_is_primary: Family<HostLabel, Gauge>,
    pub domain_host_replication_lag: Family<HostLabel, Gauge>,
    pub domain_host_last_contact_ms: Family<HostLabel, Gauge>,
    /// 1 for the pair status this host sees now, 0 for the others it has seen.
    pair_status: Family<PairStatusLabel, Gauge>,
}

/// Per-component numbers read from the ledger when Prometheus scrapes.
pub struct ComponentGauges {
    pub component: String,
    pub licenses: u32,
    pub in_use: u32,
    pub free: u32,
    pub donated: u32,
}

/// Per-key numbers read from the ledger when Prometheus scrapes.
pub struct KeyGauges {
    pub key: String,
    pub licenses: u32,
    pub in_use: u32,
    pub donated: u32,
    pub received: u32,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("tessera");
        let metrics = Metrics {
            checkouts: Family::default(),
            denials: Family::default(),
            heartbeats: Counter::default(),
            checkins: Counter::default(),
            expired_leases: Counter::default(),
            neighbour_errors: Family::default(),
            neighbour_mismatches: Family::default(),
            neighbour_refused: Counter::default(),
            requests: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            licenses: Family::default(),
            licenses_in_use: Family::default(),
            licenses_free: Family::default(),
            licenses_donated: Family::default(),
            key_licenses: Family::default(),
            key_licenses_in_use: Family::default(),
            key_licenses_donated: Family::default(),
            key_licenses_received: Family::default(),
            sync_deadline: Gauge::default(),
            active_leases: Gauge::default(),
            is_primary: Gauge::default(),
            domain_host_healthy: Family::default(),
            domain_host_is_primary: Family::default(),
            domain_host_replication_lag: Family::default(),
            domain_host_last_contact_ms: Family::default(),
            pair_status: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "checkouts",
            "Checkout requests by outcome",
            metrics.checkouts.clone(),
        );
        // Always 1; the version is in its label (as Prometheus' own `*_build_info`).
        let build_info = prometheus_client::metrics::info::Info::new(vec![(
            "version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        )]);
        registry.register("build", "This server's build", build_info);
        registry.register(
            "denials",
            "Checkouts refused because no license was free, by component",
            metrics.denials.clone(),
        );
        registry.register(
            "heartbeats",
            "Lease heartbeats accepted",
            metrics.heartbeats.clone(),
        );
        registry.register(
            "checkins",
            "Leases returned by stations or released by admins",
            metrics.checkins.clone(),
        );
        registry.register(
            "expired_leases",
            "Leases ended because their time ran out",
            metrics.expired_leases.clone(),
        );
        registry.register(
            "neighbour_errors",
            "Failed exchanges with neighbour servers, by neighbour",
            metrics.neighbour_errors.clone(),
        );
        registry.register(
            "neighbour_mismatches",
            "Differences between donated and received licenses found by license synchronization, by neighbour",
            metrics.neighbour_mismatches.clone(),
        );
        registry.register(
            "neighbour_refused",
            "Messages from other servers refused (unknown neighbour, not allowed, bad signature, clock skew)",
            metrics.neighbour_refused.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by route",
            metrics.requests.clone(),
        );
        registry.register(
            "licenses",
            "Licenses of active keys, by component",
            metrics.licenses.clone(),
        );
        registry.register(
            "licenses_in_use",
            "Licenses leased, by component",
            metrics.licenses_in_use.clone(),
        );
        registry.register(
            "licenses_free",
            "Licenses free, by component",
            metrics.licenses_free.clone(),
        );
        registry.register(
            "licenses_donated",
            "Licenses donated to neighbour servers, by component",
            metrics.licenses_donated.clone(),
        );
        registry.register(
            "key_licenses",
            "Licenses of each key or received grant (KEY@DONOR)",
            metrics.key_licenses.clone(),
        );
        registry.register(
            "key_licenses_in_use",
            "Licenses of each key or received grant leased to stations",
            metrics.key_licenses_in_use.clone(),
        );
        registry.register(
            "key_licenses_donated",
            "Licenses of each key or received grant donated to neighbour servers and not back yet",
            metrics.key_licenses_donated.clone(),
        );
        registry.register(
            "key_licenses_received",
            "Licenses received from a neighbour server, per received grant (KEY@DONOR)",
            metrics.key_licenses_received.clone(),
        );
        registry.register(
            "sync_deadline_seconds",
            "The sync deadline (366-day rule) as Unix time in seconds; 0 when there is none",
            metrics.sync_deadline.clone(),
        );
        registry.register(
            "active_leases",
            "Leases currently active",
            metrics.active_leases.clone(),
        );
        registry.register(
            "consensus_is_primary",
            "1 if this host is the primary",
            metrics.is_primary.clone(),
        );
        registry.register(
            "domain_host_healthy",
            "1 if the domain host is healthy (primary's view; a backup knows only itself)",
            metrics.domain_host_healthy.clone(),
        );
        registry.register(
            "domain_host_is_primary",
            "1 for the domain host that is primary",
            metrics.domain_host_is_primary.clone(),
        );
        registry.register(
            "domain_host_replication_lag_entries",
            "Log entries the domain host is missing (known on the primary)",
            metrics.domain_host_replication_lag.clone(),
        );
        registry.register(
            "domain_host_last_contact_ms",
            "Milliseconds since the primary last heard from the domain host",
            metrics.domain_host_last_contact_ms.clone(),
        );
        registry.register(
            "pair_status",
            "1 for the redundant pair's status as this host sees it",
            metrics.pair_status.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    /// Sets the pair status gauge (one label at 1, the others seen before at 0).
    pub fn set_pair_status(&self, status: &str) {
        for name in [
            tessera_engine::pair::PAIRED_AND_AVAILABLE,
            tessera_engine::pair::BACKUP_NOT_AVAILABLE,
            tessera_engine::pair::PRIMARY_NOT_AVAILABLE,
            tessera_engine::pair::PAIR_NOT_SYNCED,
            tessera_engine::pair::RECOVERING,
        ] {
            self.pair_status
                .get_or_create(&PairStatusLabel {
                    status: name.to_string(),
                })
                .set(i64::from(name == status));
        }
    }

    /// Renders the text exposition format after refreshing the gauges read from the ledger.
    pub fn render(
        &self,
        components: &[ComponentGauges],
        keys: &[KeyGauges],
        active_leases: usize,
        is_primary: bool,
    ) -> String {
        self.licenses.clear();
        self.licenses_in_use.clear();
        self.licenses_free.clear();
        self.licenses_donated.clear();
        for gauges in components {
            let label = ComponentLabel {
                component: gauges.component.clone(),
            };
            self.licenses
                .get_or_create(&label)
                .set(gauges.licenses.into());
            self.licenses_in_use
                .get_or_create(&label)
                .set(gauges.in_use.into());
            self.licenses_free
                .get_or_create(&label)
                .set(gauges.free.into());
            self.licenses_donated
                .get_or_create(&label)
                .set(gauges.donated.into());
        }
        self.key_licenses.clear();
        self.key_licenses_in_use.clear();
        self.key_licenses_donated.clear();
        self.key_licenses_received.clear();
        for gauges in keys {
            let label = KeyLabel {
                key: gauges.key.clone(),
            };
            self.key_licenses
                .get_or_create(&label)
                .set(gauges.licenses.into());
            self.key_licenses_in_use
                .get_or_create(&label)
                .set(gauges.in_use.into());
            self.key_licenses_donated
                .get_or_create(&label)
                .set(gauges.donated.into());
            self.key_licenses_received
                .get_or_create(&label)
                .set(gauges.received.into());
        }
        self.active_leases.set(active_leases as i64);
        self.is_primary.set(i64::from(is_primary));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}
