"""What a float16 artifact's dense subgraphs cost in memory and time, as ORT folds them and unfolded.

    python scripts/bench_dense_fp16.py ART [--parts embed dec.L00.step lm_head] [--calls 20] [--json OUT]

The exporter stores float16 dense weights behind a Cast to float32. With the runtime's session
options (ORT_ENABLE_ALL) ORT's constant folding replaces each Cast(initializer) by a float32
copy when the session opens: the weights then take twice their stored bytes in RAM. With
``disabled_optimizers=["ConstantFolding"]`` they stay float16 and every call casts them again.
Each (part, mode) opens in a fresh process, so the RSS it adds is its own; one token is run
(past length 64) --calls times after a warm-up: median ms per call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time, statistics
import numpy as np, onnxruntime as ort
from swapmoe_edge.artifact.manifest import load_manifest
from swapmoe_edge.model.sessions import session_options
from swapmoe_edge.system import memory
art, part, mode, calls = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
m = load_manifest(art)
c = m.extra["causal_config"]
D, H, Hkv, Dh, P = c["hidden_size"], c["num_heads"], c["num_kv_heads"], c["head_dim"], 64
opts = session_options(1)
memory.trim()
before = memory.current_rss()
t = time.perf_counter()
kw = {"disabled_optimizers": ["ConstantFolding"]} if mode == "unfolded" else {}
sess = ort.InferenceSession(str(m.path(m.subgraphs[part].file)), opts, providers=["CPUExecutionProvider"], **kw)
open_s = time.perf_counter() - t
names = [i.name for i in sess.get_inputs()]
rng = np.random.default_rng(0)
feeds = {}
for n in names:
    if n == "input_ids": feeds[n] = np.array([[5]], np.int64)
    elif n == "hidden": feeds[n] = rng.standard_normal((1, 1, D), dtype=np.float32)
    elif n == "position_ids": feeds[n] = np.array([[P]], np.int64)
    elif n == "attn_bias": feeds[n] = np.zeros((1, 1, 1, P + 1), np.float32)
    elif n in ("past_key", "past_value"): feeds[n] = rng.standard_normal((1, Hkv, P, Dh), dtype=np.float32)
    else: raise SystemExit(f"unknown input {n}")
sess.run(None, feeds)
ms = []
for _ in range(calls):
    t = time.perf_counter(); sess.run(None, feeds); ms.append((time.perf_counter() - t) * 1e3)
memory.trim()
print(json.dumps({"part": part, "mode": mode, "rss_added": memory.current_rss() - before, "open_s": open_s,
                  "ms_median": statistics.median(ms), "stored": sum(m.files[f].size for f in m.files
                  if f.startswith(m.subgraphs[part].file))}))
"""


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--parts", nargs="+", default=["embed", "dec.L00.step", "lm_head"])
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2, help="alternate the two modes this many times")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    rows = []
    for r in range(a.rounds):
        for part in a.parts:
            for mode in (("folded", "unfolded") if r % 2 == 0 else ("unfolded", "folded")):
                p = subprocess.run([sys.executable, "-c", CHILD, a.artifact, part, mode, str(a.calls)],
                                   capture_output=True, text=True)
                if p.returncode != 0:
                    raise SystemExit(p.stderr[-2000:])
                rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    print(f"{'part':14s} {'mode':9s} {'stored MiB':>10s} {'RSS added MiB':>13s} {'ms/call':>8s}")
    for part in a.parts:
        for mode in ("folded", "unfolded"):
            rs = [x for x in rows if x["part"] == part and x["mode"] == mode]
            print(f"{part:14s} {mode:9s} {rs[0]['stored'] / 2**20:10.1f} "
                  f"{statistics.median(x['rss_added'] for x in rs) / 2**20:13.1f} "
                  f"{statistics.median(x['ms_median'] for x in rs):8.2f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return rows


if __name__ == "__main__":
    main()
