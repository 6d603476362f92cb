#!/usr/bin/env python3
"""Throughput between two nodes whose underlays meet only through two relays, in the same run on
the same machine.

Four namespaces in a line: A (198.18.10.1), RA (198.18.10.2 | 198.18.11.1), RB (198.18.11.2 |
198.18.12.1) and B (198.18.12.2). iperf3 from A to B through:
  routed        RA and RB as plain IP routers, no tunnel: the ceiling;
  meshd-routed  A and B in a two-node mesh over the routed underlay (what meshd carries when the
                underlay is routed);
  meshd-relay   no routing at all: meshd on all four, RA and RB serve as relays (`[relay]`), A
                names RA, B names RB, the relays name each other; A's tunnel to B is end to end,
                its frames relayed twice;
  wireguard-go  A and B as stock wireguard-go peers over the routed underlay (a stock tunnel has
                no relays: the underlay must be routed).
Prints the median of N runs in Gbit/s and the ratio of meshd-relay to each of the others.

Run as root from the workspace root:  python3 bench/relay.py [--runs 3] [--seconds 5]
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import ROOT, Setup, bench_main, meshctl, sh  # noqa: E402

TESTS = [("tcp1", "TCP 1 stream", ["-P", "1"]),
         ("udp", "UDP 1400 B", ["-u", "-b", "0", "-l", "1400"])]
# (name, links: (interface, underlay address)), in line order.
NODES = [("a", [("u0", "198.18.10.1/24")]),
         ("ra", [("u0", "198.18.10.2/24"), ("u1", "198.18.11.1/24")]),
         ("rb", [("u1", "198.18.11.2/24"), ("u0", "198.18.12.1/24")]),
         ("b", [("u0", "198.18.12.2/24")])]
OVERLAY = {"a": "100.64.0.1", "ra": "100.64.0.2", "rb": "100.64.0.3", "b": "100.64.0.4"}



class Line(Setup):
    """A — RA — RB — B, and the daemons of one mode."""

    def __init__(self, mode, prefix):
        super().__init__(mode, "meshbench-relay-")
        self.ns = {name: prefix + name for name, _ in NODES}
        self.built(lambda: self.build(mode))

    def build(self, mode):
        for ns in self.ns.values():
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        for (left, llinks), (right, rlinks) in zip(NODES, NODES[1:]):
            (lifc, lip), (rifc, rip) = llinks[-1], rlinks[0]
            a, b = self.ns[left], self.ns[right]
            sh("ip", "link", "add", "t" + lifc, "netns", a, "type", "veth", "peer", "name",
               "t" + rifc, "netns", b)
            sh("ip", "-n", a, "link", "set", "t" + lifc, "name", lifc)
            sh("ip", "-n", b, "link", "set", "t" + rifc, "name", rifc)
            for ns, ifc, ip in ((a, lifc, lip), (b, rifc, rip)):
                sh("ip", "-n", ns, "addr", "add", ip, "dev", ifc)
                sh("ip", "-n", ns, "link", "set", ifc, "up")
        if mode != "meshd-relay":
            self.route_underlay()
        if mode == "routed":
            self.target = "198.18.12.2"
        elif mode == "wireguard-go":
            self.wireguard_go()
            self.target = OVERLAY["b"]
        else:
            self.meshd(["a", "b"] if mode == "meshd-routed" else ["a", "ra", "rb", "b"])
            self.target = OVERLAY["b"]
        deadline = time.time() + 30
        while time.time() < deadline:
            if sh("ip", "netns", "exec", self.ns["a"], "ping", "-c", "1", "-W", "1", self.target,
                  check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"{mode}: A did not reach {self.target} within 30 s")

    def route_underlay(self):
        for r in ("ra", "rb"):
            sh("ip", "netns", "exec", self.ns[r], "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for node, net, via in (("a", "198.18.12.0/24", "198.18.10.2"),
                               ("ra", "198.18.12.0/24", "198.18.11.2"),
                               ("rb", "198.18.10.0/24", "198.18.11.1"),
                               ("b", "198.18.10.0/24", "198.18.12.1")):
            sh("ip", "-n", self.ns[node], "route", "add", net, "via", via)

    def wireguard_go(self):
        keys = {}
        for side in ("a", "b"):
            self.spawn(self.ns[side], ["wireguard-go", "-f", "rw" + side], {"WG_PROCESS_FOREGROUND": "1"})
            self.wait_socket(f"/var/run/wireguard/rw{side}.sock")
            path = os.path.join(self.tmp, side + ".key")
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                f.write(sh("wg", "genkey").stdout)
            keys[side] = (path, sh("wg", "pubkey", input=open(path).read()).stdout.strip())
        for side, other, endpoint in (("a", "b", "198.18.12.2"), ("b", "a", "198.18.10.1")):
            sh("wg", "set", "rw" + side, "private-key", keys[side][0], "listen-port", "51820", "peer",
               keys[other][1], "endpoint", endpoint + ":51820", "allowed-ips", OVERLAY[other] + "/32")
            sh("ip", "-n", self.ns[side], "addr", "add", OVERLAY[side] + "/24", "dev", "rw" + side)
            sh("ip", "-n", self.ns[side], "link", "set", "rw" + side, "mtu", "1420", "up")

    def meshd(self, nodes):
        ca = os.path.join(self.tmp, "ca")
        meshctl("ca", "init", "--trust-domain", "example.org", "--out", ca)
        keys = {}
        for name in nodes:
            meshctl("identity", "issue", "--ca", ca, "--namespace", "bench", "--name", name,
                    "--ip", OVERLAY[name] + "/32", "--out", self.tmp)
            private = open(os.path.join(self.tmp, name + ".key")).read()
            keys[name] = sh("wg", "pubkey", input=private).stdout.strip()
        relayed = len(nodes) == 4
        # Seeds along the line; relays as in the README.
        seeds = {"a": "198.18.10.2" if relayed else "198.18.12.2", "ra": "198.18.11.2",
                 "rb": "198.18.11.1", "b": "198.18.12.1"}
        relay = {"a": f'via = ["{keys.get("ra")}"]', "ra": f'serve = true\nvia = ["{keys.get("rb")}"]',
                 "rb": f'serve = true\nvia = ["{keys.get("ra")}"]', "b": f'via = ["{keys.get("rb")}"]'}
        for name in nodes:
            config = os.path.join(self.tmp, name + ".toml")
            with open(config, "w") as f:
                f.write(f"""[interface]
name = "br{name}"

[identity]
certificate = "{self.tmp}/{name}.crt"
private_key = "{self.tmp}/{name}.key"

[trust]
bundle = ["{ca}/ca.crt"]

[peering]
seeds = ["{seeds[name]}:51820"]
state_dir = "{self.tmp}/state-{name}"

[policy]
posture = "calico"
""" + (f"\n[relay]\n{relay[name]}\n" if relayed else ""))
            self.spawn(self.ns[name], [os.path.join(ROOT, "target/release/meshd"), "--foreground",
                                       "--config", config])
            self.wait_socket(f"/var/run/meshd/br{name}.sock")

    def iperf(self, args, seconds):
        return self.iperf3(self.ns["a"], self.ns["b"], self.target, args, seconds)

    def close(self):
        self.close_in(self.ns.values())


def main():
    bench_main(__doc__, "relay.py", "routed,meshd-routed,meshd-relay,wireguard-go", "meshd-relay",
               "iperf3 between two nodes through two relays (or a routed underlay)",
               lambda mode: Line(mode, f"rl{os.getpid() % 10000}"), TESTS)


if __name__ == "__main__":
    main()
