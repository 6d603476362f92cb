#!/usr/bin/env bash
# Builds meshd, meshctl and meshd-cni, then runs the README's main job: the microblog example of Calico's
# zero-trust guide as a local mesh (`meshctl lab up --example microblog`). Needs root,
# /dev/net/tun and iproute2. `target/release/meshctl lab down` removes it; pass `down` or
# `status` here to do the same.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p meshd -p meshctl -p meshd-cni
case "${1:-up}" in
  up) shift || true; exec target/release/meshctl lab up --example microblog "$@" ;;
  *) exec target/release/meshctl lab "$1" ;;
esac
