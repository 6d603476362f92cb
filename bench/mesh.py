#!/usr/bin/env python3
"""Mesh formation and control-protocol cost.

For N in (5, 10, 20): N network namespaces on one bridge (underlay 198.18.2.0/24), identities
from one CA (made with meshctl), every node seeded with node 1 only, zero-trust posture. Measures
  - members: time from launching the N daemons until every node has the N-1 others as peers;
  - policy: time from `meshctl policy apply` on node 1 (a set allowing ICMP echo everywhere)
    until every node enforces it, pulled over the control protocol;
  - connected: time from launch until every ordered pair has pinged through its direct tunnel;
  - control bytes per node per minute at rest (control-protocol UDP payload sent, from
    `meshctl status`), over --rest-seconds after convergence, with the policy set in force
    (so the periodic policy offers are counted).

Run as root from the workspace root:  python3 bench/mesh.py [--sizes 5,10,20] [--rest-seconds 60]
"""

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import teardown  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target/release")


def sh(*args, check=True):
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


def status(ifname):
    out = sh(f"{BIN}/meshctl", "status", "-i", ifname, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


PING_POLICY = """apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: ping}
spec:
  selector: all()
  types: [Ingress, Egress]
  ingress:
  - action: Allow
    protocol: ICMP
  egress:
  - action: Allow
    protocol: ICMP
"""


def run_size(n, rest_seconds):
    prefix = f"mm{os.getpid() % 1000}"
    tmp = tempfile.mkdtemp(prefix="meshbench-")
    sw = prefix + "sw"
    nodes, procs = [], []
    try:
        sh("ip", "netns", "add", sw)
        sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", sw, "link", "set", "br0", "up")
        sh(f"{BIN}/meshctl", "ca", "init", "--trust-domain", "bench.example", "--out", f"{tmp}/ca")
        sh(f"{BIN}/meshctl", "policy", "admin-key", "--out", f"{tmp}/admin.key")
        with open(f"{tmp}/ping.yaml", "w") as f:
            f.write(PING_POLICY)
        for i in range(1, n + 1):
            ns, ifname = f"{prefix}n{i}", f"{prefix}m{i}"
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "link", "add", "u0", "netns", ns, "type", "veth", "peer", "name", f"p{ns}", "netns", sw)
            sh("ip", "-n", sw, "link", "set", f"p{ns}", "master", "br0")
            sh("ip", "-n", sw, "link", "set", f"p{ns}", "up")
            sh("ip", "-n", ns, "addr", "add", f"198.18.2.{i}/24", "dev", "u0")
            sh("ip", "-n", ns, "link", "set", "u0", "up")
            sh(f"{BIN}/meshctl", "identity", "issue", "--ca", f"{tmp}/ca", "--namespace", "bench",
               "--name", f"node{i}", "--ip", f"100.64.2.{i}/32", "--out", f"{tmp}/ids")
            seeds = "" if i == 1 else '"198.18.2.1:51820"'
            cfg = f"{tmp}/{ifname}.toml"
            with open(cfg, "w") as f:
                f.write(f'[interface]\nname = "{ifname}"\n\n[identity]\ncertificate = "{tmp}/ids/node{i}.crt"\n'
                        f'private_key = "{tmp}/ids/node{i}.key"\n\n[trust]\nbundle = ["{tmp}/ca/ca.crt"]\n'
                        f'policy_admins = ["{tmp}/admin.key.pub"]\n\n'
                        f'[peering]\nseeds = [{seeds}]\nstate_dir = "{tmp}/state{i}"\n')
            nodes.append((ns, ifname, cfg, f"100.64.2.{i}"))
        t0 = time.monotonic()
        for ns, ifname, cfg, _ in nodes:
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns, f"{BIN}/meshd", "--foreground", "--config", cfg],
                                          env=dict(os.environ, RUST_LOG="warn"),
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        members = None
        while time.monotonic() - t0 < 120:
            sts = [status(ifname) for _, ifname, _, _ in nodes]
            if all(s and len(s["peers"]) == n - 1 for s in sts):
                members = time.monotonic() - t0
                break
            time.sleep(0.05)
        if members is None:
            raise RuntimeError(f"N={n}: membership incomplete after 120 s")
        t1 = time.monotonic()
        sh(f"{BIN}/meshctl", "policy", "apply", "-f", f"{tmp}/ping.yaml", "--key", f"{tmp}/admin.key",
           "-i", nodes[0][1])
        policy = None
        while time.monotonic() - t1 < 60:
            sts = [status(ifname) for _, ifname, _, _ in nodes]
            if all(s and (s.get("policy") or {}).get("serial") == 1 for s in sts):
                policy = time.monotonic() - t1
                break
            time.sleep(0.02)
        if policy is None:
            raise RuntimeError(f"N={n}: the policy set did not reach every node in 60 s")

        def ping_all(src):
            ns = src[0]
            for dst in nodes:
                if dst[0] == ns:
                    continue
                while sh("ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "1", dst[3], check=False).returncode:
                    if time.monotonic() - t0 > 120:
                        raise RuntimeError(f"{ns} cannot reach {dst[3]}")
        with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
            list(pool.map(ping_all, nodes))
        connected = time.monotonic() - t0

        time.sleep(5)
        before = [status(ifname)["control_tx_bytes"] for _, ifname, _, _ in nodes]
        time.sleep(rest_seconds)
        after = [status(ifname)["control_tx_bytes"] for _, ifname, _, _ in nodes]
        per_min = sum(a - b for a, b in zip(after, before)) / n * 60 / rest_seconds
        return members, policy, connected, per_min
    finally:
        teardown(procs, [ns for ns, _, _, _ in nodes] + [sw])
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="5,10,20")
    ap.add_argument("--rest-seconds", type=int, default=60)
    opts = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/mesh.py needs root (network namespaces, TUN)")
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "meshd", "-p", "meshctl"], cwd=ROOT, check=True)
    rows = []
    for n in [int(x) for x in opts.sizes.split(",")]:
        members, policy, connected, per_min = run_size(n, opts.rest_seconds)
        print(f"  N={n}: members {members:.2f} s, policy {policy:.2f} s, connected {connected:.2f} s, "
              f"{per_min:.0f} B/node/min", file=sys.stderr)
        rows.append((n, members, policy, connected, per_min))
    print(f"\nMesh formation from one seed; control bytes sent per node per minute at rest over {opts.rest_seconds} s\n")
    print("| nodes | all members known (s) | policy set on every node (s, from apply) | all pairs pinged (s) | control bytes / node / min at rest |")
    print("|---|---|---|---|---|")
    for n, m, p, c, b in rows:
        print(f"| {n} | {m:.2f} | {p:.2f} | {c:.2f} | {b:.0f} |")


if __name__ == "__main__":
    main()
