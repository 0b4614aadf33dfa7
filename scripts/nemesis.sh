#!/usr/bin/env bash
# The nemesis suite for as long as one likes: real-process domains and pairs under kill -9,
# partitions and a slow disk (crates/tessera-cli/tests/cli/nemesis.rs), then the simulated
# domain with crashes that lose unflushed writes (tessera-sim --domain).
#
#   bash scripts/nemesis.sh [SEEDS] [ROUNDS] [SIM_SEEDS]
#   bash scripts/nemesis.sh 1..10 30 1..500     # ten seeds of 30 rounds, 500 simulated seeds
#
# Every seed prints its rounds, kills and partitions; the first failure stops the run and
# names its seed (replay: TESSERA_NEMESIS_SEED=N TESSERA_NEMESIS_ROUNDS=R cargo test -p
# tessera-cli --test cli nemesis). The slow-disk switch exists in debug builds only, so the
# real-process tests run the debug binary.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds="${1:-1..3}"
rounds="${2:-20}"
sim_seeds="${3:-1..200}"
first="${seeds%..*}"
last="${seeds#*..}"
cargo build --tests -p tessera-cli --locked --quiet
for seed in $(seq "$first" "$last"); do
  echo "== nemesis seed $seed, $rounds rounds"
  TESSERA_NEMESIS_SEED="$seed" TESSERA_NEMESIS_ROUNDS="$rounds" \
    cargo test -p tessera-cli --test cli --locked --quiet nemesis -- --nocapture 2>&1 \
    | grep -E "^nemesis (domain|pair) seed|panicked|round [0-9]+:|^test result"
  test "${PIPESTATUS[0]}" -eq 0
done
echo "== simulated domain, seeds $sim_seeds"
cargo run -p tessera-sim --release --locked --quiet -- --domain 3 --seeds "$sim_seeds" | tail -3
