#!/usr/bin/env bash
# Builds meshd and brings up a two-node encrypted overlay on this machine: two network
# namespaces joined by a veth (underlay 198.18.0.1 <-> 198.18.0.2), a meshd in each, configured
# with the stock `wg` tool, then shows it working. Needs root, /dev/net/tun, iproute2 and
# wireguard-tools. Everything is removed at the end (pass --keep to leave it up).
set -euo pipefail
cd "$(dirname "$0")/.."
keep=${1:-}
cargo build --release -q -p meshd -p meshctl
bin=$PWD/target/release
p=demo$$
a=${p}a b=${p}b wa=${p}wa wb=${p}wb

cleanup() {
  pkill -f "meshd --foreground .*$wa\$" 2>/dev/null || true
  pkill -f "meshd --foreground .*$wb\$" 2>/dev/null || true
  ip netns del "$a" 2>/dev/null || true
  ip netns del "$b" 2>/dev/null || true
}
[ "$keep" = "--keep" ] || trap cleanup EXIT

ip netns add "$a"; ip netns add "$b"
ip link add "v$a" netns "$a" type veth peer name "v$b" netns "$b"
ip -n "$a" addr add 198.18.0.1/24 dev "v$a"; ip -n "$a" link set "v$a" up; ip -n "$a" link set lo up
ip -n "$b" addr add 198.18.0.2/24 dev "v$b"; ip -n "$b" link set "v$b" up; ip -n "$b" link set lo up

ka=$(mktemp); kb=$(mktemp); chmod 600 "$ka" "$kb"
"$bin/meshctl" genkey > "$ka"; "$bin/meshctl" genkey > "$kb"
ip netns exec "$a" "$bin/meshd" "$wa"
ip netns exec "$b" "$bin/meshd" "$wb"
wg set "$wa" private-key "$ka" listen-port 51820 \
  peer "$("$bin/meshctl" pubkey < "$kb")" endpoint 198.18.0.2:51821 allowed-ips 100.64.0.2/32
wg set "$wb" private-key "$kb" listen-port 51821 \
  peer "$("$bin/meshctl" pubkey < "$ka")" endpoint 198.18.0.1:51820 allowed-ips 100.64.0.1/32
rm -f "$ka" "$kb"
ip -n "$a" addr add 100.64.0.1/24 dev "$wa"
ip -n "$b" addr add 100.64.0.2/24 dev "$wb"

echo "== ping through the encrypted overlay (100.64.0.1 -> 100.64.0.2)"
ip netns exec "$a" ping -c 3 -i 0.2 100.64.0.2
echo; echo "== wg show $wa"
wg show "$wa"
echo; echo "== meshctl status $wb"
"$bin/meshctl" status -i "$wb"
[ "$keep" = "--keep" ] && echo "left up: namespaces $a $b; remove with: ip netns del $a; ip netns del $b; pkill -f 'meshd --foreground .*$p'"
exit 0
