#!/usr/bin/env bash
# The mesh node at scale, in memory: N nodes (default 1000) over links with 1% loss, in simulated
# time. Prints time to full membership from one seed, time for a policy set and a revocation to
# reach every node, control bytes per node per minute at rest, and memory per node.
#   bash bench/scale.sh            # N = 1000
#   MESH_SIM_NODES=200 bash bench/scale.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# `bash bench/scale.sh churn`: workload identities instead, N nodes (default 100) with
# MESH_SIM_PODS pods each (default 100), attached, then a tenth of them replaced.
case "${1:-scale}" in
  churn)
    export MESH_SIM_NODES="${MESH_SIM_NODES:-100}"
    test=mesh::scale::churn ;;
  *)
    export MESH_SIM_NODES="${MESH_SIM_NODES:-1000}"
    test=mesh::scale::scale ;;
esac
cargo test --release -p meshd -- --ignored --nocapture --exact "$test" 2>&1 \
  | grep -E '^N=|^t=|test result|panicked'
