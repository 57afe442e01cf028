"""Switch top-1 decode before/after a change of the routing code, two source trees side by side.

    python docs/results/topk/bench_switch_decode.py ARTIFACT TREE_A TREE_B [--policy full]
        [--budget 100%] [--requests 24] [--tokens 32] [--json OUT]

One worker process per tree (its ``swapmoe_edge`` imported from that tree), each holding one
Runtime (one thread) on ARTIFACT. The parent hands both the same random request in turn, A
first on even requests and B first on odd ones, and reads back each request's decode ms/token
(its decoder fed --tokens random tokens, so that every request decodes as many steps), the
request's CPU time a token (less sensitive to other processes than wall time), and, for every
fourth request, the greedy tokens it generates. Printed: medians per side and the median of the per-request ratios B/A (both
sides see the same load at the same moment: the robust figure on a shared machine), and
whether the greedy requests gave the same tokens on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = r"""
import json, sys, time
import numpy as np
from swapmoe_edge.runtime.facade import Runtime, RuntimeConfig
art, policy, budget, tokens, device = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
rt = Runtime(art, RuntimeConfig(policy=policy, budget=budget, threads=1, device=device))
rt.wait_ready()
vocab = rt.manifest.config.vocab_size
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    seed = int(line)
    rng = np.random.default_rng(seed)
    ids = [[int(t) for t in rng.integers(5, vocab, 59)] + [1]]
    greedy = rt.generate(ids, max_new_tokens=tokens)[0].token_ids if seed % 4 == 0 else None
    forced = [[int(t) for t in rng.integers(5, vocab, tokens)]]  # every request decodes `tokens` steps
    cpu = time.process_time()
    r = rt.generate(ids, max_new_tokens=tokens, forced_ids=forced)[0]
    cpu_ms = (time.process_time() - cpu) * 1e3 / tokens  # the whole request's CPU time, a token
    print(json.dumps({"ms": r.stats["decode_ms_per_token"], "cpu_ms": cpu_ms, "tokens": greedy}), flush=True)
rt.close()
"""


def start(tree: str, a) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1")
    device = os.path.join(tree, "devices", a.device + ".json")  # the tree's own profile format
    p = subprocess.Popen([sys.executable, "-c", WORKER, a.artifact, a.policy, a.budget, str(a.tokens), device], env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")
    assert json.loads(p.stdout.readline())["ready"]
    return p


def ask(p: subprocess.Popen, seed: int) -> dict:
    p.stdin.write(f"{seed}\n")
    p.stdin.flush()
    return json.loads(p.stdout.readline())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("tree_a")
    ap.add_argument("tree_b")
    ap.add_argument("--policy", default="full")
    ap.add_argument("--budget", default="100%")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--device", default="cpu-x86_64", help="device profile name (read from each tree)")
    ap.add_argument("--json")
    a = ap.parse_args()
    procs = [start(a.tree_a, a), start(a.tree_b, a)]
    ms: list[list[float]] = [[], []]
    cpu: list[list[float]] = [[], []]
    same = True
    for i in range(a.requests + 2):  # the first two warm both sides up and are not counted
        out = [None, None]
        for j in ((0, 1) if i % 2 == 0 else (1, 0)):
            out[j] = ask(procs[j], 1000 + i)
        same &= out[0]["tokens"] == out[1]["tokens"]
        if i >= 2:
            for j in (0, 1):
                ms[j].append(out[j]["ms"])
                cpu[j].append(out[j]["cpu_ms"])
    for p in procs:
        p.stdin.close()
        p.wait(timeout=60)
    med = statistics.median
    res = {"artifact": a.artifact, "tree_a": a.tree_a, "tree_b": a.tree_b, "policy": a.policy, "budget": a.budget,
           "requests": a.requests, "tokens": a.tokens,
           "a_ms_per_token": med(ms[0]), "b_ms_per_token": med(ms[1]),
           "ratio_b_over_a": med(b / a_ for a_, b in zip(*ms)),
           "a_cpu_ms_per_token": med(cpu[0]), "b_cpu_ms_per_token": med(cpu[1]),
           "cpu_ratio_b_over_a": med(b / a_ for a_, b in zip(*cpu)), "same_tokens": same}
    print(json.dumps(res))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
