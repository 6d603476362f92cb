#!/usr/bin/env python3
"""Pod-to-pod throughput across two meshd nodes against node-to-node, in the same run.

Two node namespaces N1 and N2 joined by a veth (underlay 198.18.0.1 <-> 198.18.0.2). The issuer
(`meshctl ca serve`) runs beside N1's meshd; both nodes join with single-use tokens. A pod on each
node is made by the CNI plugin exactly as a kubelet would call it (its own network namespace, a
veth, its certificate from the issuer). One GlobalNetworkPolicy allows everything, so both modes
pay the same policy checks. iperf3 runs:
  underlay   N1 to N2's underlay address: the ceiling;
  node       N1 to N2's overlay address, through both meshd;
  pod        pod 1 (on N1) to pod 2 (on N2): pod veth, meshd, tunnel, meshd, pod veth.
Prints the median of N runs in Gbit/s and the ratio of pod to the others. Then the time from the
start of a pod's CNI ADD to the first packet another node's pod gets through to it (ping every
10 ms), the median of N pods: each alone, and back to back.

Run as root from the workspace root:  python3 bench/pods.py [--runs 3] [--seconds 5]
"""

import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import ROOT, Setup, bench_main, meshctl, sh, veth_pair  # noqa: E402

TESTS = [("tcp1", "TCP 1 stream", ["-P", "1"]),
         ("tcp4", "TCP 4 streams", ["-P", "4"]),
         ("udp", "UDP 1400 B", ["-u", "-b", "0", "-l", "1400"])]
ISSUER = "198.18.0.1:7100"

POLICY = """apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata:
  name: allow-all
spec:
  selector: all()
  ingress:
    - action: Allow
  egress:
    - action: Allow
"""


class Pods(Setup):
    """Two nodes, the issuer, and (in pod mode) a pod on each node."""

    def __init__(self, mode, prefix):
        super().__init__(mode, "meshbench-pods-")
        self.n1, self.n2 = prefix + "a", prefix + "b"
        self.namespaces = [self.n1, self.n2]
        self.prefix = prefix
        self.hosts = 1
        self.built(self.build)

    def build(self):
        veth_pair(self.n1, self.n2)
        if self.mode == "underlay":
            self.target = "198.18.0.2"
            return
        self.ca = os.path.join(self.tmp, "ca")
        meshctl("ca", "init", "--trust-domain", "example.org", "--out", self.ca)
        admin = os.path.join(self.tmp, "admin.key")
        meshctl("policy", "admin-key", "--out", admin)
        self.spawn(self.n1, [os.path.join(ROOT, "target/release/meshctl"), "ca", "serve", "--ca",
                             self.ca, "--listen", ISSUER])
        for _ in range(500):
            if os.path.exists(os.path.join(self.ca, "issuer", "static.key")):
                break
            time.sleep(0.02)
        time.sleep(0.2)
        for i, ns in ((1, self.n1), (2, self.n2)):
            token = meshctl("ca", "token", "create", "--ca", self.ca, "--namespace", "nodes",
                            "--name", f"node-{i}", "--ip", f"100.64.0.{i}/32", "--issuer", ISSUER,
                            "--ttl", "5m").stdout.strip()
            ids = os.path.join(self.tmp, f"node-{i}")
            joined = sh("ip", "netns", "exec", ns, os.path.join(ROOT, "target/release/meshctl"),
                        "join", "--token", token, "--out", ids).stdout
            issuer = joined.split('[issuer]', 1)[1]
            seeds = '"198.18.0.1:51820"' if i == 2 else ""
            config = os.path.join(self.tmp, f"node-{i}.toml")
            with open(config, "w") as f:
                f.write(f"""[interface]
name = "{self.ifname(i)}"

[identity]
certificate = "{ids}/node.crt"
private_key = "{ids}/node.key"

[trust]
bundle = ["{ids}/ca.crt"]
workload_cas = ["{ids}/workload-ca.crt"]
policy_admins = ["{admin}.pub"]

[peering]
seeds = [{seeds}]
state_dir = "{self.tmp}/state-{i}"

[issuer]{issuer}
""")
            self.spawn(ns, [os.path.join(ROOT, "target/release/meshd"), "--foreground", "--config",
                            config])
            self.wait_socket(f"/var/run/meshd/{self.ifname(i)}.sock")
        policy = os.path.join(self.tmp, "policy.yaml")
        with open(policy, "w") as f:
            f.write(POLICY)
        meshctl("policy", "apply", "-f", policy, "--key", admin, "-i", self.ifname(1))
        self.wait_ping(self.n1, "100.64.0.2")
        self.target = "100.64.0.2"
        if self.mode == "pod":
            self.add_pod(1, "p1")
            _, self.target = self.add_pod(2, "p2")
            self.wait_ping(self.pod_ns("p1"), self.target)

    def ifname(self, i):
        return f"{self.prefix}m{i}"

    def pod_ns(self, name):
        return f"{self.prefix}{name}"

    def add_pod(self, node, name):
        """Registers pod `name` on node `node` (100.64.<node>.<n>) and adds it with the CNI
        plugin; when ADD started, and the pod's address."""
        self.hosts += 1
        n = self.hosts
        meshctl("workload", "register", "--ca", self.ca, "--namespace", "bench", "--name", name,
                "--uid", f"uid-{name}", "--service-account", "bench", "--node", f"nodes/node-{node}",
                "--ip", f"100.64.{node}.{n}/32")
        ns = self.pod_ns(name)
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        conf = ('{"cniVersion": "1.0.0", "name": "mesh", "type": "meshd-cni", '
                f'"meshInterface": "{self.ifname(node)}"}}')
        env = dict(os.environ, CNI_COMMAND="ADD", CNI_CONTAINERID=f"bench-{name}",
                   CNI_NETNS=f"/var/run/netns/{ns}", CNI_IFNAME="eth0", CNI_PATH="/opt/cni/bin",
                   CNI_ARGS=f"IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={name};"
                            f"K8S_POD_UID=uid-{name}")
        start = time.monotonic()
        subprocess.run(["ip", "netns", "exec", self.n1 if node == 1 else self.n2,
                        os.path.join(ROOT, "target/release/meshd-cni")], input=conf, env=env,
                       check=True, capture_output=True, text=True)
        return start, f"100.64.{node}.{n}"

    def wait_ping(self, ns, target, limit=30):
        for _ in range(limit * 10):
            if sh("ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "0.1", target,
                  check=False).returncode == 0:
                return
        raise RuntimeError(f"{self.mode}: {target} never answered from {ns}")

    def first_packet(self, name):
        """Seconds from the start of pod `name`'s CNI ADD on node 2 until pod p1 on node 1 gets a
        ping answered by it."""
        start, addr = self.add_pod(2, name)
        while time.monotonic() - start < 30:
            if sh("ip", "netns", "exec", self.pod_ns("p1"), "ping", "-c", "1", "-W", "0.01", addr,
                  check=False).returncode == 0:
                return time.monotonic() - start
            time.sleep(0.01)
        raise RuntimeError(f"{addr} never answered")

    def iperf(self, args, seconds):
        client = self.pod_ns("p1") if self.mode == "pod" else self.n1
        server = self.pod_ns("p2") if self.mode == "pod" else self.n2
        return self.iperf3(client, server, self.target, args, seconds)

    def close(self):
        self.close_in(self.namespaces)


def main():
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "meshd-cni"], cwd=ROOT, check=True)
    prefix = f"pb{os.getpid() % 10000}"
    bench_main(__doc__, "pods.py", "underlay,node,pod", "pod",
               "iperf3 between two meshd nodes: node to node, and pod to pod across them",
               lambda mode: Pods(mode, prefix), TESTS)
    runs = int(sys.argv[sys.argv.index("--runs") + 1]) if "--runs" in sys.argv else 3
    setup = Pods("pod", prefix)
    n = max(runs, 5)
    try:
        # A pod alone (the node announced nothing for a second), then pods back to back (each
        # change within 0.5 s of the last announcement waits for the next one).
        alone, burst = [], []
        for i in range(n):
            time.sleep(1.0)
            alone.append(setup.first_packet(f"a{i}"))
        for i in range(n):
            burst.append(setup.first_packet(f"b{i}"))
    finally:
        setup.close()
    print("\nFrom the start of a pod's CNI ADD to the first packet another node's pod gets "
          "through to it:")
    for what, times in (("a pod alone", alone), ("pods back to back", burst)):
        print(f"  {what}: median {statistics.median(times) * 1000:.0f} ms of {len(times)} "
              "(each: " + ", ".join(f"{t * 1000:.0f}" for t in times) + " ms)")


if __name__ == "__main__":
    main()
