#!/usr/bin/env bash
# The simulation campaign: 10,000 fault schedules (pairs, contended networks, the CI network,
# domains) through the same engine the server runs, each checking "never more leases than
# licenses" at every step. Any failure prints the command that replays it alone.
#
#   bash scripts/campaign.sh                  # 10,000 schedules on every core
#   bash scripts/campaign.sh 500 7000         # 500 schedules, seeds from 7000
#
# Measured on the 2-core machine: see BENCHMARKS.md ("Simulation campaign").
set -euo pipefail
cd "$(dirname "$0")/.."
schedules="${1:-10000}"
first_seed="${2:-1}"
jobs="$(nproc 2>/dev/null || echo 2)"
cargo build --release --locked -p tessera-sim
exec target/release/tessera-sim --campaign "$schedules" --jobs "$jobs" --first-seed "$first_seed"
