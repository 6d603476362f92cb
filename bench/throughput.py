#!/usr/bin/env python3
"""Throughput of meshd against its peers, measured in the same run on the same machine.

Builds two network namespaces joined by a veth (underlay 198.18.0.1 <-> 198.18.0.2) and runs
iperf3 through: the bare veth, meshd, Debian's wireguard-go and boringtun-cli (when installed:
`cargo install boringtun-cli`). For each: TCP one stream, TCP four streams, and UDP with 1400-byte
datagrams at full rate. Prints the median of N runs in Gbit/s, the tunnel daemons' CPU seconds
per GB carried (both ends, from /proc), and the ratio meshd / each peer.

Run as root from the workspace root:  python3 bench/throughput.py [--runs 3] [--seconds 5]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = [("tcp1", "TCP 1 stream", ["-P", "1"]),
         ("tcp4", "TCP 4 streams", ["-P", "4"]),
         ("udp", "UDP 1400 B", ["-u", "-b", "0", "-l", "1400"])]


def sh(*args, check=True, **kw):
    return subprocess.run(list(args), check=check, capture_output=True, text=True, **kw)


def received_bps(iperf_json):
    """Bits per second received, from `iperf3 -J` output: TCP's received sum, or UDP's sum less
    the datagrams lost."""
    end = json.loads(iperf_json)["end"]
    if "sum_received" in end:
        return end["sum_received"]["bits_per_second"]
    return end["sum"]["bits_per_second"] * (1 - end["sum"].get("lost_percent", 0) / 100)


def compare(make, modes, tests, runs, seconds, lead, title):
    """Measures every test of `tests` ((key, label, iperf3 arguments)) `runs` times in each mode,
    each run on a fresh setup (`make(mode)` returns one with `iperf(args, seconds)` in Gbit/s and
    `close()`); prints progress, then a Markdown table of the medians and the ratio of mode `lead`
    to every other."""
    results = {}
    for mode in modes:
        for key, _, args in tests:
            got = []
            for _ in range(runs):
                setup = make(mode)
                try:
                    got.append(setup.iperf(args, seconds))
                finally:
                    setup.close()
            results[(mode, key)] = statistics.median(got)
            print(f"  {mode:13} {key:5} {results[(mode, key)]:6.2f} Gbit/s  runs: "
                  + " ".join(f"{x:.2f}" for x in got), file=sys.stderr)
    others = [m for m in modes if m != lead] if lead in modes else []
    print(f"\n{title}, median of {runs} runs of {seconds} s\n")
    columns = ["test"] + [f"{m} Gbit/s" for m in modes] + [f"{lead} / {m}" for m in others]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for key, label, _ in tests:
        row = [label] + [f"{results[(m, key)]:.2f}" for m in modes]
        row += [f"{results[(lead, key)] / results[(m, key)]:.2f}" for m in others]
        print("| " + " | ".join(row) + " |")


def meshctl(*args, **kw):
    return sh(os.path.join(ROOT, "target/release/meshctl"), *args, **kw)


class Setup:
    """What a multi-namespace benchmark setup shares: its daemons, a scratch directory, iperf3."""

    def __init__(self, mode, tmp_prefix):
        self.mode = mode
        self.procs = []
        self.tmp = tempfile.mkdtemp(prefix=tmp_prefix)

    def spawn(self, ns, cmd, env=None):
        p = subprocess.Popen(["ip", "netns", "exec", ns] + cmd,
                             env=dict(os.environ, RUST_LOG="warn", **(env or {})),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(p)

    def wait_socket(self, path):
        for _ in range(500):
            if os.path.exists(path):
                return
            time.sleep(0.02)
        raise RuntimeError(f"{self.mode} did not open {path}")

    def iperf3(self, client_ns, server_ns, target, args, seconds):
        """Gbit/s received from one iperf3 run of `seconds` from `client_ns` to `target`."""
        server = subprocess.Popen(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-B", target],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        out = sh("ip", "netns", "exec", client_ns, "iperf3", "-c", target, "-t", str(seconds), "-J",
                 *args, timeout=seconds + 30)
        server.wait(timeout=10)
        return received_bps(out.stdout) / 1e9

    def built(self, build):
        """Runs `build()`; if it fails half-way (a daemon that does not start), removes what it
        made, since the caller never gets the object to close."""
        try:
            build()
        except BaseException:
            self.close()
            raise

    def close_in(self, namespaces):
        teardown(self.procs, namespaces)
        shutil.rmtree(self.tmp, ignore_errors=True)


def bench_main(doc, name, modes, lead, title, make, tests):
    """The command line of a multi-namespace benchmark: --runs, --seconds, --modes; as root; builds
    meshd and meshctl, then [`compare`]s the modes."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--modes", default=modes)
    opts = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit(f"bench/{name} needs root (network namespaces, TUN)")
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "meshd", "-p", "meshctl"], cwd=ROOT, check=True)
    compare(make, opts.modes.split(","), tests, opts.runs, opts.seconds, lead, title)


def veth_pair(a, b):
    """Namespaces `a` and `b` joined by a veth: underlay 198.18.0.1 (a) and 198.18.0.2 (b)."""
    for ns in (a, b):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "link", "add", "v" + a, "netns", a, "type", "veth", "peer", "name", "v" + b, "netns", b)
    for ns, ip in ((a, "198.18.0.1/24"), (b, "198.18.0.2/24")):
        sh("ip", "-n", ns, "addr", "add", ip, "dev", "v" + ns)
        sh("ip", "-n", ns, "link", "set", "v" + ns, "up")


def teardown(procs, namespaces):
    """Stops the daemons (SIGTERM, then SIGKILL after 5 s) and removes the namespaces."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
    for ns in namespaces:
        sh("ip", "netns", "del", ns, check=False)


class Topology:
    """Two namespaces a and b joined by a veth, and the tunnel daemons running in them."""

    def __init__(self, mode, prefix):
        self.mode, self.a, self.b = mode, prefix + "a", prefix + "b"
        self.ia, self.ib = prefix + "wa", prefix + "wb"
        self.procs = []
        self.tmp = tempfile.mkdtemp(prefix="meshbench-")
        # A setup that fails half-way (a daemon that does not start) removes what it made:
        # the caller never gets the object to close.
        try:
            veth_pair(self.a, self.b)
            self.target = "198.18.0.2"
            if mode != "veth":
                self.start_tunnel()
                self.target = "100.64.0.2"
        except BaseException:
            self.close()
            raise

    def daemon_cmd(self, ifname):
        if self.mode in ("meshd", "meshd-nooffload"):
            offloads = "off" if self.mode == "meshd-nooffload" else "on"
            return [os.path.join(ROOT, "target/release/meshd"), "--foreground",
                    "--offloads", offloads, ifname]
        if self.mode == "wireguard-go":
            return ["wireguard-go", "-f", ifname]
        if self.mode == "gotatun":
            return [find_cargo_bin("gotatun"), "-f", "--disable-drop-privileges", ifname]
        return [find_cargo_bin("boringtun-cli"), "-f", "--disable-drop-privileges", ifname]

    def start_tunnel(self):
        keys = {}
        for side, ns, ifname in (("a", self.a, self.ia), ("b", self.b, self.ib)):
            env = dict(os.environ, RUST_LOG="warn", WG_PROCESS_FOREGROUND="1", WG_SUDO="1")
            p = subprocess.Popen(["ip", "netns", "exec", ns] + self.daemon_cmd(ifname), env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.procs.append(p)
            sock = f"/var/run/wireguard/{ifname}.sock"
            for _ in range(500):
                if os.path.exists(sock):
                    break
                time.sleep(0.02)
            else:
                raise RuntimeError(f"{self.mode} did not open {sock}")
            path = os.path.join(self.tmp, side + ".key")
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                f.write(sh("wg", "genkey").stdout)
            keys[side] = (path, sh("wg", "pubkey", input=open(path).read()).stdout.strip())
        time.sleep(0.2)
        sh("wg", "set", self.ia, "private-key", keys["a"][0], "listen-port", "51820", "peer",
           keys["b"][1], "endpoint", "198.18.0.2:51821", "allowed-ips", "100.64.0.2/32")
        sh("wg", "set", self.ib, "private-key", keys["b"][0], "listen-port", "51821", "peer",
           keys["a"][1], "endpoint", "198.18.0.1:51820", "allowed-ips", "100.64.0.1/32")
        for ns, ifname, ip in ((self.a, self.ia, "100.64.0.1/24"), (self.b, self.ib, "100.64.0.2/24")):
            sh("ip", "-n", ns, "addr", "add", ip, "dev", ifname)
            sh("ip", "-n", ns, "link", "set", ifname, "mtu", "1420", "up")
        sh("ip", "netns", "exec", self.a, "ping", "-c", "2", "-W", "2", self.target)

    def cpu_seconds(self):
        """CPU time (user + system) of the tunnel daemons so far; 0 for the bare veth."""
        total = 0
        for p in self.procs:
            try:
                with open(f"/proc/{p.pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            except OSError:
                pass
        return total / os.sysconf("SC_CLK_TCK")

    def iperf(self, args, seconds):
        server = subprocess.Popen(["ip", "netns", "exec", self.b, "iperf3", "-s", "-1", "-B", self.target],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        cpu0 = self.cpu_seconds()
        out = sh("ip", "netns", "exec", self.a, "iperf3", "-c", self.target, "-t", str(seconds),
                 "-J", *args, timeout=seconds + 30)
        cpu = self.cpu_seconds() - cpu0
        server.wait(timeout=10)
        bps = received_bps(out.stdout)
        gb = bps * seconds / 8 / 1e9
        return bps / 1e9, (cpu / gb if gb > 0 and self.procs else None)

    def ping_ms(self, count=50):
        """Average round-trip time of `count` pings, 20 ms apart, in milliseconds."""
        out = sh("ip", "netns", "exec", self.a, "ping", "-q", "-c", str(count), "-i", "0.02",
                 self.target).stdout
        # rtt min/avg/max/mdev = 0.041/0.060/0.101/0.012 ms
        return float(out.rsplit("=", 1)[1].split("/")[1])

    def close(self):
        teardown(self.procs, (self.a, self.b))
        shutil.rmtree(self.tmp, ignore_errors=True)


def find_cargo_bin(tool):
    """Where `cargo install TOOL` put it (or wherever it is on PATH)."""
    return shutil.which(tool) or os.path.expanduser(f"~/.cargo/bin/{tool}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--modes", default="veth,meshd,meshd-nooffload,wireguard-go,boringtun,gotatun")
    ap.add_argument("--tests", default=",".join(k for k, _, _ in TESTS),
                    help="which of " + ", ".join(k for k, _, _ in TESTS))
    opts = ap.parse_args()
    tests = [t for t in TESTS if t[0] in opts.tests.split(",")]
    if os.geteuid() != 0:
        sys.exit("bench/throughput.py needs root (network namespaces, TUN)")
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "meshd"], cwd=ROOT, check=True)
    modes = opts.modes.split(",")
    for mode, tool, package in (("boringtun", "boringtun-cli", "boringtun-cli"),
                                ("gotatun", "gotatun", "gotatun-cli")):
        if mode in modes and not os.path.exists(find_cargo_bin(tool)):
            print(f"{tool} not installed (cargo install {package}): skipping it", file=sys.stderr)
            modes.remove(mode)

    results = {}
    for mode in modes:
        for key, _, args in tests:
            runs = []
            for r in range(opts.runs):
                topo = Topology(mode, f"mb{os.getpid() % 10000}")
                try:
                    runs.append(topo.iperf(args, opts.seconds))
                finally:
                    topo.close()
            gbps = statistics.median(x[0] for x in runs)
            cpus = [x[1] for x in runs if x[1] is not None]
            results[(mode, key)] = (gbps, statistics.median(cpus) if cpus else None)
            print(f"  {mode:13} {key:5} {gbps:6.2f} Gbit/s  runs: "
                  + " ".join(f"{x[0]:.2f}" for x in runs), file=sys.stderr)

    rtts = {}
    for mode in modes:
        got = []
        for r in range(opts.runs):
            topo = Topology(mode, f"mb{os.getpid() % 10000}")
            try:
                got.append(topo.ping_ms())
            finally:
                topo.close()
        rtts[mode] = statistics.median(got)
        print(f"  {mode:13} ping  {rtts[mode]:6.3f} ms  runs: " + " ".join(f"{x:.3f}" for x in got),
              file=sys.stderr)

    peers = [m for m in modes if m != "meshd"]
    print(f"\niperf3, median of {opts.runs} runs of {opts.seconds} s; CPU s/GB = tunnel daemons' CPU "
          "time (both ends) per GB received\n")
    head = "| test | " + " | ".join(f"{m} Gbit/s" for m in modes) + " | " + \
        " | ".join(f"{m} CPU s/GB" for m in modes if m != "veth") + " | " + \
        " | ".join(f"meshd / {m}" for m in peers) + " |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for key, label, _ in tests:
        row = [label] + [f"{results[(m, key)][0]:.2f}" for m in modes]
        row += [f"{results[(m, key)][1]:.2f}" if results[(m, key)][1] else "-" for m in modes if m != "veth"]
        if "meshd" in modes:
            row += [f"{results[('meshd', key)][0] / results[(m, key)][0]:.2f}" for m in peers]
        print("| " + " | ".join(row) + " |")
    row = ["ping RTT ms (lower is better)"] + [f"{rtts[m]:.3f}" for m in modes]
    row += ["-" for m in modes if m != "veth"]
    if "meshd" in modes:
        row += [f"{rtts['meshd'] / rtts[m]:.2f}" for m in peers]
    print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
