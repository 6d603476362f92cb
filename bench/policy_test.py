#!/usr/bin/env python3
"""How long `meshctl policy test` takes on the microblog example with N test cases, for a
pre-commit hook: the example's policies plus one PolicyTest of N cases (every ordered pair of
the five services on ports 8080, 5432 and 9090, repeated), timed over --runs runs, median.
Compared with `meshctl policy check` of one flow in the same run (the cost of reading and
compiling the files, which every command pays once). Every case expects Deny, so some fail:
the time is the same, and the exit code is not looked at."""

import argparse
import itertools
import os
import shutil
import statistics
import subprocess
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BIN = os.path.join(ROOT, "target", "release")
SERVICES = ["api", "post", "search", "user", "storage"]


def cases(n):
    pairs = [(a, b, p) for a, b in itertools.permutations(SERVICES, 2) for p in (8080, 5432, 9090)]
    out = []
    for i in range(n):
        a, b, p = pairs[i % len(pairs)]
        out.append(
            f'    - {{from: "microblog/{a},app={a}", to: "microblog/{b},app={b}", port: {p}, expect: Deny}}'
        )
    return "\n".join(out)


def timed(cmd, runs):
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=11)
    ap.add_argument("--cases", type=int, nargs="+", default=[10, 100, 500, 2000])
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "meshctl"], cwd=ROOT, check=True)
    meshctl = os.path.join(BIN, "meshctl")
    d = tempfile.mkdtemp(prefix="policy-test-bench-")
    try:
        for f in ("namespace.yaml", "post-allow-list.yaml", "allow-lists.yaml"):
            shutil.copy(os.path.join(ROOT, "examples", "microblog", f), d)
        check = [meshctl, "policy", "check", "-f", d, "--from", "microblog/api,app=api",
                 "--to", "microblog/post,app=post", "--port", "8080"]
        base = timed(check, a.runs)
        print(f"policy check, one flow (read + compile + decide): {base * 1000:.1f} ms")
        print(f"{'cases':>6}  {'policy test':>12}  {'per case':>9}  {'x check':>8}")
        for n in a.cases:
            with open(os.path.join(d, "tests.yaml"), "w") as f:
                f.write("apiVersion: mesh.io/v1\nkind: PolicyTest\nmetadata:\n  name: bench\nspec:\n  cases:\n")
                f.write(cases(n) + "\n")
            t = timed([meshctl, "policy", "test", "-f", d], a.runs)
            print(f"{n:>6}  {t * 1000:>9.1f} ms  {t / n * 1e6:>6.1f} us  {t / base:>7.2f}x")
    finally:
        shutil.rmtree(d)


if __name__ == "__main__":
    main()
