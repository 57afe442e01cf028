"""Budget sweep: policies x budgets x planners on one data set, each cell in its own process.

    sweep("artifact/", "val.jsonl", "runs/sweep", budgets=("100%", "50%", "25%"))

writes ``cells/<cell>.json`` (every measure of one cell, with its per-document outputs),
``sweep.csv``, ``sweep.json`` and three plots: ROUGE-2, decode time per token and peak RSS
against the budget (the last with the line y = budget: a cell above it broke its budget).

- A cell runs in a fresh ``python -m swapmoe_edge.lab.sweep --cell ...`` that prints one JSON
  line, so its peak RSS is its own and not the sweep's.
- ``full`` runs once, first, at 100%, whether or not it is in ``policies``: it is the
  reference that every other cell's fidelity is measured against (from its saved outputs).
- ``on-demand`` runs with the first planner only: its output is exact whatever the split,
  and the planner only moves LRU slots between layers.
- Resumable: a cell whose JSON is already in ``cells/`` is not run again (if it was made
  with other settings, the sweep stops and says so). A cell that fails with a typed error
  (e.g. a budget too small for the model) is a result and is saved; a crash is not, and is
  retried next time.
- ``deterministic``: True, every cell's runtime swaps only at request boundaries (RuntimeConfig),
  so a cell's outputs do not depend on the machine's load; False, never; None, each policy's
  default. Each row says whether its outputs were deterministic.
- It needs the ``eval`` extra (rouge-score, and matplotlib for the plots): without it, it stops
  before it runs or writes anything.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from swapmoe_edge.artifact.manifest import load_manifest
from swapmoe_edge.core.errors import InputError, SwapMoEError
from swapmoe_edge.core.units import format_size
from swapmoe_edge.lab.evaluate import evaluate, lead_baseline, read_pairs, require_eval_extra
from swapmoe_edge.lab.streams import parse_sections
from swapmoe_edge.residency.importance import Profile
from swapmoe_edge.residency.policies import POLICIES

FULL_BUDGET = "100%"
PLANNER_FREE = ("full", "on-demand", "ladder")  # ladder: placed by bytes, not by the count split
CSV_COLUMNS = (
    "cell", "policy", "planner", "budget", "budget_bytes", "baseline_bytes", "peak_rss_bytes", "exact", "documents",
    "rouge1", "rouge2", "rougeL", "fidelity_rouge1", "fidelity_rouge2", "fidelity_rougeL", "exact_match",
    "ttft_ms", "decode_ms_per_token", "request_ms", "bytes_read", "loads", "swaps", "stall_ms",
    "first_choice_resident", "low_precision_tokens", "resident_experts", "resident_expert_bytes", "wall_s",
    "deterministic", "boundary_wait_ms", "error",
)


@dataclass(frozen=True)
class Cell:
    policy: str
    budget: str
    planner: str | None  # None where the planner does not matter (full)

    @property
    def name(self) -> str:
        budget = re.sub(r"[^A-Za-z0-9.]+", "_", self.budget.replace("%", "pct"))
        return "__".join(p for p in (self.policy, budget, self.planner) if p)

    def label(self) -> str:
        return " ".join(p for p in (self.policy, self.budget, self.planner) if p)


def plan_cells(budgets: Sequence[str], policies: Sequence[str], planners: Sequence[str]) -> list[Cell]:
    """``full`` once at 100% first, then every other policy x budget x planner."""
    if not budgets or not planners:
        raise InputError("a sweep needs at least one budget and one planner")
    cells = [Cell("full", FULL_BUDGET, None)]
    for policy in policies:
        if policy == "full":
            continue
        for budget in budgets:
            for planner in planners[:1] if policy in PLANNER_FREE else planners:
                cells.append(Cell(policy, budget, planner))
    return cells


# -- one cell ---------------------------------------------------------------------------------------


def _cell_command(cell: Cell, settings: dict[str, Any], reference: Path | None, quiet: bool) -> list[str]:
    cmd = [sys.executable, "-m", "swapmoe_edge.lab.sweep", "--cell", cell.policy, cell.budget, cell.planner or "-",
           "--artifact", settings["artifact"], "--data", settings["data"],
           "--max-new-tokens", str(settings["max_new_tokens"]), "--batch-size", str(settings["batch_size"])]
    if settings["num_beams"] is not None:
        cmd += ["--num-beams", str(settings["num_beams"])]
    if settings["limit"] is not None:
        cmd += ["--limit", str(settings["limit"])]
    if settings["threads"] is not None:
        cmd += ["--threads", str(settings["threads"])]
    if reference is not None:
        cmd += ["--reference", str(reference)]
    cmd += ["--order", settings["order"]]
    if settings["sections"]:
        cmd += ["--sections", ",".join(settings["sections"])]
    if settings["exclude_sections"]:
        cmd += ["--exclude-sections", ",".join(settings["exclude_sections"])]
    if settings["profile"] is not None:
        cmd += ["--profile", settings["profile"]]
    if settings["deterministic"] is not None:
        cmd.append("--deterministic" if settings["deterministic"] else "--no-deterministic")
    if quiet:
        cmd.append("--quiet")
    return cmd


def _run_cell_process(cmd: list[str], timeout_s: float | None) -> tuple[dict | None, str]:
    """Run one cell; (its JSON, or None and why)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # importable even without an install
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout_s} s"
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        return None, f"exit status {proc.returncode} (its stderr is above)"
    try:
        return json.loads(lines[-1]), ""
    except ValueError:
        return None, f"its last output line is not JSON: {lines[-1][:200]!r}"


def _cell_main(argv: Sequence[str] | None = None) -> None:
    """``python -m swapmoe_edge.lab.sweep --cell POLICY BUDGET PLANNER ...``: print one JSON line."""
    ap = argparse.ArgumentParser(prog="python -m swapmoe_edge.lab.sweep", description="Run one sweep cell.")
    ap.add_argument("--cell", nargs=3, required=True, metavar=("POLICY", "BUDGET", "PLANNER"))
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--num-beams", type=int, default=None, help="default: the checkpoint's generation config's")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reference", default=None, help="a full cell's JSON: fidelity is measured against its outputs")
    ap.add_argument("--order", default="file")
    ap.add_argument("--sections", default="")
    ap.add_argument("--exclude-sections", default="")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                    help="swaps only at request boundaries (default: the policy's)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    policy, budget, planner = args.cell
    try:
        reference = json.loads(Path(args.reference).read_text())["outputs"] if args.reference else None
        res = evaluate(args.artifact, args.data, policy, budget, "importance" if planner == "-" else planner,
                       limit=args.limit, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                       batch_size=args.batch_size, reference_outputs=reference, compare_to_full=False,
                       keep_outputs=True, threads=args.threads, quiet=args.quiet, order=args.order,
                       sections=parse_sections(args.sections), exclude_sections=parse_sections(args.exclude_sections),
                       profile=args.profile, config={"deterministic": args.deterministic})
    except SwapMoEError as e:
        res = {"policy": policy, "budget": budget, "error": str(e), "error_type": type(e).__name__}
    print(json.dumps(res), flush=True)


# -- the sweep ---------------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _load_done(path: Path, settings: dict[str, Any]) -> dict | None:
    if not path.is_file():
        return None
    try:
        done = json.loads(path.read_text())
    except ValueError:
        return None  # a torn file from a killed run: run the cell again
    if done.get("settings") != settings:
        old = done.get("settings") or {}
        diff = {k: (old.get(k, "not recorded"), v) for k, v in settings.items() if k not in old or old[k] != v}
        raise InputError(f"{path} was made with other settings ({', '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in diff.items())}); "
                         "sweep into a new output directory, or delete that file to run the cell again.")
    return done


def _row(cell: Cell, res: dict[str, Any]) -> dict[str, Any]:
    """One flat CSV/JSON row (no per-document outputs)."""
    row = {k: v for k, v in res.items() if k not in ("outputs", "fidelity", "settings")}
    row.update(cell=cell.name, policy=cell.policy, planner=cell.planner or "", budget=cell.budget)
    fid = res.get("fidelity") or {}
    for k in ("rouge1", "rouge2", "rougeL"):
        row[f"fidelity_{k}"] = fid.get(k)
    row["exact_match"] = fid.get("exact_match")
    row.setdefault("error", "")
    return row


def _describe(res: dict[str, Any]) -> str:
    if res.get("error"):
        return f"{res.get('error_type', 'error')}: {res['error']}"
    fid = res.get("fidelity")
    fid_s = f", fidelity ROUGE-2 {fid['rouge2']:.4f} (exact match {fid['exact_match']:.0%})" if fid else ""
    return (f"ROUGE-2 {res['rouge2']:.4f}{fid_s}, peak RSS {format_size(res['peak_rss_bytes'])} / budget "
            f"{format_size(res['budget_bytes'])}, decode {res['decode_ms_per_token']:.2f} ms/token")


def sweep(artifact: str | Path, data_path: str | Path, out_dir: str | Path,
          budgets: Sequence[str] = ("100%", "75%", "50%", "33%", "25%"),
          policies: Sequence[str] = ("full", "on-demand", "prune", "swapmoe"),
          planners: Sequence[str] = ("importance", "uniform"), limit: int | None = 500, max_new_tokens: int = 32,
          num_beams: int | None = None, batch_size: int = 8, threads: int | None = None, timeout_s: float | None = None,
          plots: bool = True, quiet: bool = False, order: str = "file", sections: Sequence[str] = (),
          exclude_sections: Sequence[str] = (), profile: str | Path | None = None,
          deterministic: bool | None = None) -> dict[str, Any]:
    """Run (or resume) every cell, then write ``sweep.csv``, ``sweep.json`` and the plots; returns the JSON."""
    require_eval_extra(("rouge_score", "matplotlib") if plots else ("rouge_score",))  # before any work or file
    for p in policies:
        if p not in POLICIES:
            raise InputError(f"unknown policy {p!r}; choose from {', '.join(POLICIES)}")
    docs = read_pairs(data_path, limit, order, sections, exclude_sections)  # fail on bad data now, not in every cell
    load_manifest(artifact)  # and on a bad artifact
    if profile is not None:  # and on a bad profile
        Profile.load(profile)
    settings = {"artifact": str(Path(artifact).resolve()), "data": str(Path(data_path).resolve()), "limit": limit,
                "max_new_tokens": max_new_tokens, "num_beams": num_beams, "batch_size": batch_size, "threads": threads,
                "order": order, "sections": list(sections), "exclude_sections": list(exclude_sections),
                "profile": str(Path(profile).resolve()) if profile is not None else None,
                "deterministic": deterministic}
    out = Path(out_dir)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    say = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))

    cells = plan_cells(list(budgets), list(policies), list(planners))
    rows, failed, reference = [], [], None
    for i, cell in enumerate(cells, 1):
        path = out / "cells" / f"{cell.name}.json"
        tag = f"[{i}/{len(cells)}] {cell.label()}"
        res = _load_done(path, settings)
        if res is not None:
            say(f"{tag}: done before, skipped ({path.name})")
        else:
            say(f"{tag}: running")
            t0 = time.perf_counter()
            res, why = _run_cell_process(_cell_command(cell, settings, reference, quiet), timeout_s)
            if res is None:
                say(f"{tag}: FAILED, {why}; not saved, it runs again next time")
                failed.append({"cell": cell.name, "reason": why})
                continue
            res["settings"] = settings
            res["cell_wall_s"] = time.perf_counter() - t0
            _write_json(path, res)
            say(f"{tag}: {time.perf_counter() - t0:.1f} s, {_describe(res)}")
        if cell.policy == "full" and not res.get("error"):
            reference = path
        rows.append(_row(cell, res))

    summary = {"settings": settings, "documents": len(docs), "lead_baseline": lead_baseline(data_path, limit=limit, sections=sections,
                                                                                   exclude_sections=exclude_sections),
               "cells": rows, "failed": failed, "plots": []}
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (out / "sweep.md").write_text(markdown_table(rows, summary["lead_baseline"]))
    if plots:
        summary["plots"] = [str(p) for p in plot_sweep(rows, out, summary["lead_baseline"])]
    _write_json(out / "sweep.json", summary)
    say(f"wrote {out / 'sweep.csv'}, {out / 'sweep.md'}, {out / 'sweep.json'}"
        + (f" and {len(summary['plots'])} plots" if plots else ""))
    return summary


def markdown_table(rows: Sequence[dict[str, Any]], lead: dict[str, Any] | None = None) -> str:
    """The sweep as a Markdown table, decode time also as a ratio to the ``full`` cell of the same run."""
    mib = 1024 * 1024
    full = next((r for r in rows if r["policy"] == "full" and not r.get("error")), None)
    head = ("| policy | planner | budget | budget MiB | peak RSS MiB | peak/budget | experts resident | ROUGE-1 "
            "| ROUGE-2 | ROUGE-L | fidelity ROUGE-2 | same as full | first choice resident | decode ms/token "
            "| decode / full | TTFT ms | swaps | stall ms | deterministic |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['policy']} | {r['planner']} | {r['budget']} | failed: {r['error']} |")
            continue
        ratio = r["decode_ms_per_token"] / full["decode_ms_per_token"] if full else None
        cols = [(r["budget_bytes"] / mib, ".1f"), (r["peak_rss_bytes"] / mib, ".1f"),
                (r["peak_rss_bytes"] / r["budget_bytes"], ".3f"), (r["resident_experts"], ""),
                (r["rouge1"], ".4f"), (r["rouge2"], ".4f"), (r["rougeL"], ".4f"), (r["fidelity_rouge2"], ".4f"),
                (r["exact_match"], ".1%"), (r["first_choice_resident"], ".3f"), (r["decode_ms_per_token"], ".2f"),
                (ratio, ".2f"), (r["ttft_ms"], ".1f"), (r["swaps"], ""), (r["stall_ms"], ".1f")]
        cells = [r["policy"], r["planner"] or "—", r["budget"]] + ["—" if v is None else format(v, f) for v, f in cols]
        cells.append({True: "yes", False: "no"}.get(r.get("deterministic"), "—"))
        lines.append("| " + " | ".join(cells) + " |")
    if lead:
        lines.append(f"\nBaseline, the first {lead['n_words']} words of each document ({lead['documents']} documents): "
                     f"ROUGE-1 {lead['rouge1']:.4f}, ROUGE-2 {lead['rouge2']:.4f}, ROUGE-L {lead['rougeL']:.4f}.")
    return "\n".join(lines) + "\n"


# -- plots ---------------------------------------------------------------------------------------------


def plot_sweep(rows: Sequence[dict[str, Any]], out_dir: str | Path, lead: dict[str, Any] | None = None) -> list[Path]:
    """ROUGE-2, decode ms/token and peak RSS against the budget (MiB), one line per policy/planner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mib = 2**20
    ok = [r for r in rows if not r.get("error")]
    series: dict[str, list[dict]] = {}
    for r in ok:
        series.setdefault(r["policy"] + (f" ({r['planner']})" if r["planner"] else ""), []).append(r)

    def figure(key: str, ylabel: str, title: str, fname: str, scale: float = 1.0, extra=None) -> Path:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for name, rs in series.items():
            rs = sorted(rs, key=lambda r: r["budget_bytes"])
            ax.plot([r["budget_bytes"] / mib for r in rs], [r[key] / scale for r in rs],
                    marker="*" if name == "full" else "o", markersize=10 if name == "full" else 5, label=name)
        if extra:
            extra(ax)
        ax.set_xlabel("budget (MiB, whole process)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(out_dir) / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def lead_line(ax):
        if lead:
            ax.axhline(lead["rouge2"], color="gray", linestyle=":", label=lead["baseline"])

    def budget_line(ax):
        if ok:
            xs = [min(r["budget_bytes"] for r in ok) / mib, max(r["budget_bytes"] for r in ok) / mib]
            ax.plot(xs, xs, color="black", linestyle="--", linewidth=1, label="budget (y = budget)")

    return [
        figure("rouge2", "ROUGE-2 F1", "Quality against the budget", "rouge2_vs_budget.png", extra=lead_line),
        figure("decode_ms_per_token", "decode ms / token (median)", "Decode time against the budget",
               "decode_ms_vs_budget.png"),
        figure("peak_rss_bytes", "peak RSS (MiB)", "Peak RSS against the budget", "peak_rss_vs_budget.png",
               scale=mib, extra=budget_line),
    ]


if __name__ == "__main__":
    _cell_main()
