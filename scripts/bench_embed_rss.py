"""What a float16 embedding table holds once ONNX Runtime has loaded its graph on the CPU:
the table cast whole and then gathered (ORT folds the Cast into a float32 copy of the table at
load) against rows gathered first and cast after (the exporter's graph).

    python scripts/bench_embed_rss.py [--vocab 50304] [--d-model 2048]

Each graph loads in a fresh process; prints the RSS each session added (median of 3) and the
table's stored bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build(path: Path, vocab: int, d: int, gather_first: bool) -> None:
    table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((vocab, d)).astype(np.float16), "table")
    if gather_first:
        nodes = [helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0),
                 helper.make_node("Cast", ["rows"], ["hidden"], to=TensorProto.FLOAT)]
    else:
        nodes = [helper.make_node("Cast", ["table"], ["table32"], to=TensorProto.FLOAT),
                 helper.make_node("Gather", ["table32", "ids"], ["hidden"], axis=0)]
    graph = helper.make_graph(nodes, "embed", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "T"])],
                              [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["B", "T", d])], [table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")


CHILD = """
import sys, psutil, numpy as np, onnxruntime as ort
p = psutil.Process()
before = p.memory_info().rss
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
s.run(None, {"ids": np.arange(64, dtype=np.int64)[None]})
print(p.memory_info().rss - before)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=50304, help="OLMoE-1B-7B's vocabulary")
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    out = {"vocab": a.vocab, "d_model": a.d_model, "table_float16_bytes": a.vocab * a.d_model * 2}
    with tempfile.TemporaryDirectory() as tmp:
        for name, first in (("cast_then_gather", False), ("gather_then_cast", True)):
            path = Path(tmp) / f"{name}.onnx"
            build(path, a.vocab, a.d_model, first)
            runs = [int(subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True,
                                       check=True).stdout) for _ in range(a.runs)]
            out[name] = {"rss_added_bytes": runs, "median": statistics.median(runs)}
    out["ratio"] = out["cast_then_gather"]["median"] / out["gather_then_cast"]["median"]
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
