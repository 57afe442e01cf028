"""The decoder-only families table: for a tiny random model of each family, built in-process,
what exports and whether the artifact's tokens equal Hugging Face ``generate``.

    python scripts/check_families.py [--out docs/results/causal/families] [--work /tmp/families]

Per family (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE; tests/causal_tiny.py's shapes and seeds):
the checkpoint as save_pretrained writes it (per-expert tensors) and with transformers' fused
3-D expert tensors, each exported with validation; then
- greedy tokens of `full` against HF generate, each prompt alone and the three as one
  left-padded batch, and beam search (3 beams) on the batch;
- `on-demand` at the smallest budget that loads (5% steps), greedy on the batch;
- every expert's standalone subgraph against the torch expert (largest |difference|);
- the largest |logit difference| of a left-padded batch's real tokens against HF's forward;
- the export validation's worst layer as a share of its float32 rounding bound, for float32 and
  for float16 dense weights with int8 experts (validated against the model rounded the same way).
Writes OUT.json and OUT.table.md.

    python scripts/check_families.py --checkpoint CK --artifact ART [--new 12]

A checkpoint at real shapes (scripts/make_synthetic_checkpoint.py) and its artifact: greedy
tokens of `full` on a left-padded batch of two random prompts (7 and 12 tokens) against HF
generate on the checkpoint loaded in float32; prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from importlib import util as _importlib_util

_TINY = Path(__file__).resolve().parent.parent / "tests" / "causal_tiny.py"  # the tiny models the tests build
_spec = _importlib_util.spec_from_file_location("causal_tiny", _TINY)
ct = _importlib_util.module_from_spec(_spec)
_spec.loader.exec_module(ct)

from swapmoe_edge.artifact.manifest import load_manifest  # noqa: E402
from swapmoe_edge.core.errors import BudgetError  # noqa: E402
from swapmoe_edge.model.causal import pad_left, position_ids  # noqa: E402
from swapmoe_edge.model.generate import Decoding, last_step  # noqa: E402
from swapmoe_edge.runtime.config import RuntimeConfig  # noqa: E402
from swapmoe_edge.runtime.facade import Runtime  # noqa: E402
from swapmoe_edge.runtime.load import load_model  # noqa: E402
from swapmoe_export import export_checkpoint  # noqa: E402

NEW = 16


def hf_beam(model, rows, beams: int) -> list[list[int]]:
    ids, mask = pad_left(rows, ct.PAD)
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=NEW,
                             do_sample=False, num_beams=beams, pad_token_id=ct.PAD, eos_token_id=ct.EOS)
    return [r[: r.index(ct.EOS) + 1] if ct.EOS in r else r for r in out[:, ids.shape[1]:].tolist()]


def expert_diff(model, art: Path) -> float:
    m = load_manifest(art)
    x = np.random.default_rng(0).standard_normal((8, ct.HIDDEN)).astype(np.float32)
    worst = 0.0
    for key, entry in m.experts.items():
        ex = model.model.layers[key.layer].mlp.experts
        with torch.no_grad():
            gate, up = torch.nn.functional.linear(torch.from_numpy(x), ex.gate_up_proj[key.expert]).chunk(2, dim=-1)
            ref = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, ex.down_proj[key.expert]).numpy()
        got = ort.InferenceSession(str(m.path(entry.graph.file))).run(None, {"x": x})[0]
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst


def smallest_on_demand(art: Path, rows, ref) -> dict:
    for pct in range(5, 101, 5):
        try:
            with Runtime(art, RuntimeConfig(policy="on-demand", budget=f"{pct}%", verify="never")) as rt:
                got = [r.token_ids for r in rt.generate(rows, max_new_tokens=NEW)]
                return {"budget": f"{pct}%", "same": got == ref, "resident": dict(rt.parts.residents.counts())}
        except BudgetError:
            continue
    return {"budget": None, "same": False}


def check(family: str, work: Path) -> dict:
    model = ct.build(family)
    rows = ct.prompts()
    row = {"family": family, "hf_class": type(model).__name__}
    arts = {}
    for layout in ("per-expert", "fused"):
        ck = ct.save(model, work / f"ck-{family}-{layout}", fused=layout == "fused")
        arts[layout] = export_checkpoint(ck, work / f"art-{family}-{layout}", quiet=True, force=True)
        row[f"exports_{layout}"] = bool(load_manifest(arts[layout]).validation["passed"])
    art = arts["per-expert"]
    m = load_manifest(art)
    row["validation_max_abs_logit_diff"] = m.validation["max_abs_diff"]
    row["validation_block_worst_share_of_bound"] = m.validation["block_worst_share_of_bound"]
    lossy = export_checkpoint(work / f"ck-{family}-per-expert", work / f"art-{family}-f16-int8", dtype="float16",
                              expert_dtype="int8", quiet=True, force=True)
    row["validation_f16_int8_block_worst_share_of_bound"] = load_manifest(lossy).validation["block_worst_share_of_bound"]
    parts = load_model(art, RuntimeConfig(policy="full", verify="never"))
    gen = lambda rs, **kw: last_step(parts.family.generate(parts.model, rs, Decoding(max_new_tokens=NEW, **kw)))  # noqa: E731
    ref_batch = ct.hf_greedy(model, rows, NEW)
    row["greedy_alone_same"] = all(gen([r])[0] == ct.hf_greedy(model, [r], NEW)[0] for r in rows)
    row["greedy_left_padded_batch_same"] = gen(rows) == ref_batch
    row["beam3_batch_same"] = gen(rows, num_beams=3) == hf_beam(model, rows, 3)
    row["on_demand_smallest"] = smallest_on_demand(art, rows, ref_batch)
    row["expert_subgraphs_max_abs_diff"] = expert_diff(model, art)
    ids, mask = pad_left(rows, ct.PAD)
    with torch.no_grad():
        hf = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                   position_ids=torch.from_numpy(position_ids(mask, ids.shape[1]))).logits.numpy()
    real = mask.astype(bool)
    row["batch_max_abs_logit_diff"] = float(np.abs(parts.model.forward(ids, mask)[real] - hf[real]).max())
    row["tokens_compared"] = sum(len(r) for r in ref_batch)
    return row


def markdown(rows: list[dict]) -> str:
    yes = lambda b: "yes" if b else "**no**"  # noqa: E731
    lines = [
        "| family (HF class) | exports: per-expert / fused 3-D | greedy = HF: alone / left-padded batch | beam 3 = HF | "
        "on-demand, smallest budget: = HF (residents/layer) | every expert subgraph alone: max abs diff | "
        "max abs logit diff: batch / validation |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        od = r["on_demand_smallest"]
        res = "/".join(str(v) for v in od.get("resident", {}).values())
        lines.append(
            f"| {r['family']} ({r['hf_class']}) | {yes(r['exports_per-expert'])} / {yes(r['exports_fused'])} | "
            f"{yes(r['greedy_alone_same'])} / {yes(r['greedy_left_padded_batch_same'])} | {yes(r['beam3_batch_same'])} | "
            f"{od['budget']}: {yes(od['same'])} ({res}) | {r['expert_subgraphs_max_abs_diff']:.1e} | "
            f"{r['batch_max_abs_logit_diff']:.1e} / {r['validation_max_abs_logit_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def check_checkpoint(ck: str, art: str, new: int) -> dict:
    """Greedy tokens of ``art`` (full) against HF generate on ``ck``, one left-padded batch."""
    import transformers  # deferred: this mode only

    rng = np.random.default_rng(0)
    parts = load_model(art, RuntimeConfig(policy="full", verify="never"))
    vocab = parts.model.cfg.vocab_size
    rows = [[int(t) for t in rng.integers(10, vocab - 10, size=n)] for n in (7, 12)]
    got = last_step(parts.family.generate(parts.model, rows, Decoding(max_new_tokens=new)))
    pad, eos = parts.model.cfg.pad_token_id, parts.model.cfg.eos_token_id
    del parts
    model = transformers.AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32).eval()
    ids, mask = pad_left(rows, pad)
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=new,
                             do_sample=False, num_beams=1, pad_token_id=pad)
    ref = [r[: r.index(eos) + 1] if eos in r else r for r in out[:, ids.shape[1]:].tolist()]
    return {"checkpoint": ck, "artifact": art, "hf_class": type(model).__name__, "same": got == ref,
            "tokens_compared": sum(len(r) for r in ref)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/results/causal/families")
    ap.add_argument("--work", default="/tmp/families")
    ap.add_argument("--checkpoint", help="a checkpoint folder to compare with its --artifact instead")
    ap.add_argument("--artifact")
    ap.add_argument("--new", type=int, default=12)
    args = ap.parse_args()
    if args.checkpoint:
        print(json.dumps(check_checkpoint(args.checkpoint, args.artifact, args.new)))
        return
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows = [check(f, work) for f in ct.FAMILIES]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    table = markdown(rows)
    print(table)
    out.with_suffix(".table.md").write_text(table)


if __name__ == "__main__":
    main()
