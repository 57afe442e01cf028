"""Paired A/B of two versions of model/moe.py (files given), top-k route + dispatch per call, one process.

    python docs/results/topk/route_ab.py OLD/moe.py NEW/moe.py
"""
import importlib.util, statistics, timeit, sys
import numpy as np
def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path); m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); return m
old = load(sys.argv[1], "moe_old")
new = load(sys.argv[2], "moe_new")
rng = np.random.default_rng(0)
for name, e, k in [("mixtral 2/8", 8, 2), ("olmoe 8/64", 64, 8), ("qwen3 8/128", 128, 8)]:
    for tokens in (1, 64):
        lg = (rng.normal(size=(1, tokens, e))*2).astype(np.float32); x = rng.normal(size=(1, tokens, 16)).astype(np.float32)
        al = np.arange(e) % 3 == 0
        for mode, mask in (("all", None), ("1/3 sub", al)):
            res = {}
            for _ in range(5):
                for tag, m in (("old", old), ("new", new)):
                    f = lambda: m.dispatch(m.route_topk(lg, k, mask, True), x, lambda i, xs: xs)
                    n = 500 if tokens == 1 else 50
                    res.setdefault(tag, []).append(min(timeit.repeat(f, number=n, repeat=3))/n*1e6)
            o, nw = statistics.median(res["old"]), statistics.median(res["new"])
            print(f"| {name} | {tokens} | {mode} | {o:.1f} | {nw:.1f} | {nw/o:.2f} |")
