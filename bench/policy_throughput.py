#!/usr/bin/env python3
"""Throughput through meshd with 1,000 policies in force, against meshd with none, same run.

Two mesh-mode meshd nodes (client and server identities from one CA) in network namespaces joined
by a veth. Variant "no policy": Calico posture and no policy set, so every flow is allowed without
a rule (connection tracking still runs). Variant "1,000 policies": zero-trust posture and a signed
set of 1,000 policies pushed through the mesh: 950 NetworkPolicies selecting other services, 48
GlobalNetworkPolicies that select every identity and deny other ports (so a new flow walks them),
and the two allow-lists the iperf3 flow needs (client egress, server ingress on 5201).

For reference, the same run also measures meshd in plain WireGuard mode (configured with `wg`, no
policy engine at all), so the cost of enforcement itself shows too.

Prints the median of N iperf3 runs (TCP, one stream and four) in Gbit/s and the ratios.

Run as root from the workspace root:  python3 bench/policy_throughput.py [--runs 3] [--seconds 5]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import Topology, sh, teardown, veth_pair  # noqa: E402  (the plain-mode setup, helpers)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target/release")


def meshctl(*args):
    return sh(os.path.join(BIN, "meshctl"), *args).stdout


def policy_set(n=1000):
    docs = ["apiVersion: v1\nkind: Namespace\nmetadata: {name: bench, labels: {team: perf}}\n"]
    docs.append("""apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: server-allow, namespace: bench}
spec:
  order: 500
  selector: app == 'server'
  ingress:
  - action: Allow
    protocol: TCP
    source: {serviceAccounts: {names: [client]}}
    destination: {ports: [5201]}
""")
    docs.append("""apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: client-egress, namespace: bench}
spec:
  order: 500
  selector: app == 'client'
  types: [Egress]
  egress:
  - action: Allow
    protocol: TCP
    destination: {serviceAccounts: {names: [server]}, ports: [5201]}
""")
    for i in range(48):
        docs.append(f"""apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {{name: guard-{i}}}
spec:
  order: {i}
  selector: all()
  types: [Ingress, Egress]
  ingress:
  - action: Deny
    protocol: TCP
    destination: {{ports: [{9000 + i}]}}
  egress:
  - action: Deny
    protocol: UDP
    destination: {{ports: [{9000 + i}]}}
""")
    for i in range(n - 50):
        docs.append(f"""apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {{name: svc{i}-allow, namespace: bench}}
spec:
  order: {100 + i % 100}
  selector: app == 'svc{i}'
  ingress:
  - action: Allow
    protocol: TCP
    source: {{serviceAccounts: {{names: [svc{(i + 1) % 900}, svc{(i + 7) % 900}]}}}}
    destination: {{ports: [{8000 + i % 50}]}}
""")
    assert len(docs) == n + 1  # the Namespace is not a policy
    return "---\n".join(docs)


class Mesh:
    def __init__(self, prefix, tmp, posture, policies):
        self.a, self.b = prefix + "a", prefix + "b"
        self.ia, self.ib = prefix + "ma", prefix + "mb"
        self.tmp, self.procs = tmp, []
        # A setup that fails half-way (a daemon that does not start) removes what it made: the
        # caller never gets the object to close.
        try:
            self.build(tmp, posture, policies)
        except BaseException:
            self.close()
            raise

    def build(self, tmp, posture, policies):
        veth_pair(self.a, self.b)
        for ns, ifname, name, seed in ((self.b, self.ib, "server", ""),
                                       (self.a, self.ia, "client", '"198.18.0.2:51820"')):
            state = os.path.join(tmp, f"state-{posture}-{name}")
            cfg = os.path.join(tmp, f"{name}-{posture}.toml")
            with open(cfg, "w") as f:
                f.write(f"""[interface]
name = "{ifname}"
[identity]
certificate = "{tmp}/ids/{name}.crt"
private_key = "{tmp}/ids/{name}.key"
[trust]
bundle = ["{tmp}/ca/ca.crt"]
policy_admins = ["{tmp}/admin.key.pub"]
[peering]
seeds = [{seed}]
state_dir = "{state}"
[policy]
posture = "{posture}"
""")
            log = open(os.path.join(tmp, f"{name}-{posture}.log"), "w")
            self.procs.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, os.path.join(BIN, "meshd"), "--foreground", "--config", cfg],
                stdout=log, stderr=log))
        self.wait(lambda s: len(s["peers"]) == 1, "peering")
        if policies:
            path = os.path.join(tmp, "policies.yaml")
            with open(path, "w") as f:
                f.write(policies)
            meshctl("policy", "apply", "-f", path, "--key", os.path.join(tmp, "admin.key"), "-i", self.ia)
            self.wait(lambda s: (s.get("policy") or {}).get("serial") == 1, "policy set 1")
        self.policies = self.status(self.ib)["policy"]["policies"]

    def status(self, ifname):
        return json.loads(meshctl("status", "-i", ifname, "-o", "json"))

    def wait(self, ok, what):
        deadline = time.time() + 30
        for ifname in (self.ia, self.ib):
            while True:
                try:
                    if ok(self.status(ifname)):
                        break
                except (subprocess.CalledProcessError, json.JSONDecodeError):
                    pass
                if time.time() > deadline:
                    raise RuntimeError(f"{ifname}: no {what} within 30 s")
                time.sleep(0.1)

    def iperf(self, args, seconds):
        target = "100.64.0.2"
        server = subprocess.Popen(["ip", "netns", "exec", self.b, "iperf3", "-s", "-1", "-B", target],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        out = sh("ip", "netns", "exec", self.a, "iperf3", "-c", target, "-t", str(seconds),
                 "-J", *args, timeout=seconds + 30)
        server.wait(timeout=10)
        return json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9

    def close(self):
        teardown(self.procs, (self.a, self.b))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "meshd", "-p", "meshctl"], cwd=ROOT, check=True)
    tmp = tempfile.mkdtemp(prefix="meshbench-policy-")
    try:
        meshctl("ca", "init", "--trust-domain", "bench.example", "--out", f"{tmp}/ca")
        meshctl("policy", "admin-key", "--out", f"{tmp}/admin.key")
        for name, ip in (("client", "100.64.0.1/32"), ("server", "100.64.0.2/32")):
            meshctl("identity", "issue", "--ca", f"{tmp}/ca", "--namespace", "bench", "--name", name,
                    "--label", f"app={name}", "--ip", ip, "--out", f"{tmp}/ids")
        tests = [("TCP 1 stream", ["-P", "1"]), ("TCP 4 streams", ["-P", "4"])]
        prefix = f"pb{os.getpid() % 10000}"
        # All three set up at once and measured in turn, run after run, so that a change in the
        # machine's load during the benchmark falls on every variant alike.
        topologies = {}
        try:
            topologies["plain"] = Topology("meshd", prefix + "p")
            topologies["no policy"] = Mesh(prefix + "n", tmp, "calico", None)
            topologies["1,000 policies"] = Mesh(prefix + "z", tmp, "zero-trust", policy_set())
            for label in ("no policy", "1,000 policies"):
                print(f"{label}: {topologies[label].policies} policies in force", flush=True)
            samples = {}
            for _ in range(args.runs):
                for tname, targs in tests:
                    for label, topo in topologies.items():
                        r = topo.iperf(targs, args.seconds)
                        gbps = r[0] if isinstance(r, tuple) else r
                        samples.setdefault((label, tname), []).append(gbps)
            results = {k: statistics.median(v) for k, v in samples.items()}
        finally:
            for t in topologies.values():
                t.close()
        print(f"\nmedian of {args.runs} x {args.seconds} s, variants interleaved, Gbit/s\n")
        print("| test | plain meshd (no engine) | mesh, no policy | mesh, 1,000 policies | 1,000 / no policy | 1,000 / plain |")
        print("|---|---|---|---|---|---|")
        for tname, _ in tests:
            p = results[("plain", tname)]
            a, b = results[("no policy", tname)], results[("1,000 policies", tname)]
            print(f"| {tname} | {p:.2f} | {a:.2f} | {b:.2f} | {b / a:.3f} | {b / p:.3f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
