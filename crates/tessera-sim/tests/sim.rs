//! The network simulation on a fixed set of seeds (CI), and proof that its safety check
//! catches a wrong timing rule. More seeds: `TESSERA_SIM_SEEDS=1..200 cargo test -p
//! tessera-sim --release`.

use tessera_sim::{SimConfig, simulate};

fn seeds(default: std::ops::Range<u64>) -> Vec<u64> {
    match std::env::var("TESSERA_SIM_SEEDS") {
        Ok(range) => {
            let (a, b) = range.split_once("..").expect("TESSERA_SIM_SEEDS=A..B");
            (a.parse().expect("A")..b.parse().expect("B")).collect()
        }
        Err(_) => default.collect(),
    }
}

#[test]
fn a_tree_of_100_servers_never_over_issues_and_converges_after_healing() {
    for seed in seeds(1..4) {
        let report = simulate(SimConfig::ci(seed)).unwrap_or_else(|v| panic!("{v}"));
        assert!(
            report.donations > 0 && report.grants_accepted > 0,
            "{report:?}"
        );
        assert!(report.partitions > 0 && report.crashes > 0, "{report:?}");
        let periods = report
            .convergence_sync_periods
            .unwrap_or_else(|| panic!("seed {seed} did not converge: {report:?}"));
        println!("seed {seed}: converged {periods} sync periods after healing");
    }
}

#[test]
fn a_saturated_network_uses_every_license_and_never_more() {
    for seed in seeds(1..9) {
        let report = simulate(SimConfig::contended(seed)).unwrap_or_else(|v| panic!("{v}"));
        assert_eq!(
            report.peak_held, 30,
            "seed {seed}: demand saturates the key"
        );
        assert!(report.convergence_sync_periods.is_some(), "{report:?}");
    }
}

#[test]
fn ignoring_the_clock_skew_margin_is_caught() {
    let caught: Vec<String> = (1..11)
        .filter_map(|seed| {
            let config = SimConfig {
                ignore_skew_margin: true,
                ..SimConfig::contended(seed)
            };
            simulate(config).err().map(|v| v.to_string())
        })
        .collect();
    assert!(
        !caught.is_empty(),
        "drifting clocks without the margin went unnoticed"
    );
    assert!(
        caught[0].contains("leases held across the network")
            && caught[0].contains("--ignore-skew-margin")
    );
}
