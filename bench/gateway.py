#!/usr/bin/env python3
"""Throughput to an external host through a gateway, in the same run on the same machine.

Three namespaces in a line: a client C (underlay 198.18.0.1), a gateway G (198.18.0.2 towards C,
198.19.0.1 towards the outside) and an external host X (198.19.0.5), which is in no mesh. iperf3
from C to X through:
  direct        G as a plain router (C routes 198.19.0.0/24 via 198.18.0.2): the ceiling;
  meshd         C and G in one mesh; G's certificate grants 198.19.0.0/16 and it serves
                198.19.0.0/24; zero-trust policy allows C's egress to the external network, so
                C checks its egress and G checks it again;
  wireguard-go  C and G as stock wireguard-go peers, G's allowed IPs holding 198.19.0.0/24.
X routes the overlay back via G in every mode (no masquerade). Prints the median of N runs in
Gbit/s and the ratio of meshd to each of the others.

Run as root from the workspace root:  python3 bench/gateway.py [--runs 3] [--seconds 5]
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import ROOT, Setup, bench_main, meshctl, sh  # noqa: E402

TESTS = [("tcp1", "TCP 1 stream", ["-P", "1"]),
         ("udp", "UDP 1400 B", ["-u", "-b", "0", "-l", "1400"])]
EXT = "198.19.0.5"

POLICY = """apiVersion: projectcalico.org/v3
kind: GlobalNetworkSet
metadata:
  name: outside
  labels:
    role: outside
spec:
  nets: [198.19.0.0/24]
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata:
  name: client-out
spec:
  selector: app == 'client'
  egress:
    - action: Allow
      destination:
        selector: role == 'outside'
"""



class Line(Setup):
    """C — G — X, and the daemons of one mode."""

    def __init__(self, mode, prefix):
        super().__init__(mode, "meshbench-gw-")
        self.c, self.g, self.x = prefix + "c", prefix + "g", prefix + "x"
        self.built(lambda: self.build(mode))

    def build(self, mode):
        for ns in (self.c, self.g, self.x):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        for a, b, ia, ib, aip, bip in ((self.c, self.g, "u0", "u0", "198.18.0.1/24", "198.18.0.2/24"),
                                      (self.g, self.x, "u1", "u0", "198.19.0.1/24", EXT + "/24")):
            sh("ip", "link", "add", "t" + ia, "netns", a, "type", "veth", "peer", "name", "t" + ib,
               "netns", b)
            sh("ip", "-n", a, "link", "set", "t" + ia, "name", ia)
            sh("ip", "-n", b, "link", "set", "t" + ib, "name", ib)
            for ns, ifc, ip in ((a, ia, aip), (b, ib, bip)):
                sh("ip", "-n", ns, "addr", "add", ip, "dev", ifc)
                sh("ip", "-n", ns, "link", "set", ifc, "up")
        sh("ip", "netns", "exec", self.g, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        if mode == "direct":
            sh("ip", "-n", self.c, "route", "add", "198.19.0.0/24", "via", "198.18.0.2")
            sh("ip", "-n", self.x, "route", "add", "198.18.0.0/24", "via", "198.19.0.1")
        elif mode == "wireguard-go":
            self.wireguard_go()
        else:
            self.meshd()
        sh("ip", "netns", "exec", self.c, "ping", "-c", "2", "-W", "2", EXT)

    def wireguard_go(self):
        keys = {}
        for side, ns in (("c", self.c), ("g", self.g)):
            self.spawn(ns, ["wireguard-go", "-f", "bw" + side], {"WG_PROCESS_FOREGROUND": "1"})
            self.wait_socket(f"/var/run/wireguard/bw{side}.sock")
            path = os.path.join(self.tmp, side + ".key")
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                f.write(sh("wg", "genkey").stdout)
            keys[side] = (path, sh("wg", "pubkey", input=open(path).read()).stdout.strip())
        sh("wg", "set", "bwc", "private-key", keys["c"][0], "listen-port", "51820", "peer",
           keys["g"][1], "endpoint", "198.18.0.2:51820", "allowed-ips", "100.64.0.2/32,198.19.0.0/24")
        sh("wg", "set", "bwg", "private-key", keys["g"][0], "listen-port", "51820", "peer",
           keys["c"][1], "endpoint", "198.18.0.1:51820", "allowed-ips", "100.64.0.1/32")
        for ns, ifc, ip in ((self.c, "bwc", "100.64.0.1/24"), (self.g, "bwg", "100.64.0.2/24")):
            sh("ip", "-n", ns, "addr", "add", ip, "dev", ifc)
            sh("ip", "-n", ns, "link", "set", ifc, "mtu", "1420", "up")
        sh("ip", "-n", self.c, "route", "add", "198.19.0.0/24", "dev", "bwc")
        sh("ip", "-n", self.x, "route", "add", "100.64.0.0/24", "via", "198.19.0.1")

    def meshd(self):
        ca = os.path.join(self.tmp, "ca")
        meshctl("ca", "init", "--trust-domain", "example.org", "--out", ca)
        admin = os.path.join(self.tmp, "admin.key")
        meshctl("policy", "admin-key", "--out", admin)
        for side, ns, ip, under, extra in (
                ("c", self.c, "100.64.0.1/32", "198.18.0.1", ["--label", "app=client"]),
                ("g", self.g, "100.64.0.2/32", "198.18.0.2",
                 ["--label", "app=gateway", "--route", "198.19.0.0/16"])):
            meshctl("identity", "issue", "--ca", ca, "--namespace", "bench", "--name", side,
                    "--ip", ip, "--out", self.tmp, *extra)
            seeds = '"198.18.0.2:51820"' if side == "c" else ""
            gateway = '[gateway]\nroutes = ["198.19.0.0/24"]\n' if side == "g" else ""
            config = os.path.join(self.tmp, side + ".toml")
            with open(config, "w") as f:
                f.write(f"""[interface]
name = "bm{side}"

[identity]
certificate = "{self.tmp}/{side}.crt"
private_key = "{self.tmp}/{side}.key"

[trust]
bundle = ["{ca}/ca.crt"]
policy_admins = ["{admin}.pub"]

[peering]
seeds = [{seeds}]
state_dir = "{self.tmp}/state-{side}"

{gateway}""")
            self.spawn(ns, [os.path.join(ROOT, "target/release/meshd"), "--foreground", "--config", config])
            self.wait_socket(f"/var/run/meshd/bm{side}.sock")
        policy = os.path.join(self.tmp, "policy.yaml")
        with open(policy, "w") as f:
            f.write(POLICY)
        meshctl("policy", "apply", "-f", policy, "--key", admin, "-i", "bmc")
        sh("ip", "-n", self.x, "route", "add", "100.64.0.0/24", "via", "198.19.0.1")
        for _ in range(200):
            if "198.19.0.0/24" in sh("ip", "-n", self.c, "route").stdout:
                return
            time.sleep(0.05)
        raise RuntimeError("the client never routed 198.19.0.0/24 to the gateway")

    def iperf(self, args, seconds):
        return self.iperf3(self.c, self.x, EXT, args, seconds)

    def close(self):
        self.close_in((self.c, self.g, self.x))


def main():
    bench_main(__doc__, "gateway.py", "direct,meshd,wireguard-go", "meshd",
               "iperf3 from a client through a gateway to an external host",
               lambda mode: Line(mode, f"gb{os.getpid() % 10000}"), TESTS)


if __name__ == "__main__":
    main()
