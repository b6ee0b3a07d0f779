"""Paired comparison of two evaluation runs, and re-scoring a run's saved outputs.

    python -m minift.evaluate compare runs/eval/base runs/eval/sft       # paired significance, B - A
    python -m minift.evaluate rescore runs/eval/base                     # re-score saved outputs

A run directory is what `minift.evaluate` writes: predictions.jsonl (one record per item, keyed by task and
id) and summary.json. `compare` pairs two runs item by item; each task names its paired tests.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from minift.errors import MinifTError
from minift.evaluate import EvalConfig, load_items, print_summary, read_jsonl, write_run
from minift.tasks import get_task


def read_run(run: str) -> dict[tuple[str, str], dict]:
    """{(task, id): record} from a run directory's predictions.jsonl (or that file itself)."""
    path = Path(run) / "predictions.jsonl" if Path(run).is_dir() else Path(run)
    return {(r["task"], r["id"]): r for _, r in read_jsonl(path)}


def compare(run_a: str, run_b: str, n_boot: int = 10000, seed: int = 0) -> list[dict]:
    """Paired tests of B - A per task and metric, on the items both runs share (they must be the same)."""
    a, b = read_run(run_a), read_run(run_b)
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))[:3]
        raise MinifTError(f"{run_a} and {run_b} were evaluated on different items (e.g. {only}); "
                          "evaluate both on the same data and --limit")
    results = []
    for name in dict.fromkeys(k[0] for k in a):  # tasks in file order
        keys = [k for k in a if k[0] == name]
        for res in get_task(name).paired_tests([a[k] for k in keys], [b[k] for k in keys], n_boot, seed):
            results.append({"task": name, **res})
    return results


def rescore(run: str) -> dict:
    """Score a run's saved outputs again (after a parser or metric change), with no generation."""
    old = json.loads((Path(run) / "summary.json").read_text()) if (Path(run) / "summary.json").is_file() \
        else None
    if old is None:
        raise MinifTError(f"{run}: no summary.json (not an evaluation run directory)")
    cfg = EvalConfig(**dict(old["config"], out=str(run)))
    preds = read_run(run)
    items = load_items(cfg)
    outputs = {}
    for name, rows in items.items():
        missing = [r["id"] for r in rows if (name, r["id"]) not in preds]
        if missing:
            raise MinifTError(f"{run}: no saved output for {name} item {missing[0]}")
        outputs[name] = [preds[(name, r["id"])]["output"] for r in rows]
    return write_run(cfg, items, outputs, {n: s.get("seconds") for n, s in old["tasks"].items()})


def print_compare(results: list[dict], run_a: str, run_b: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"B - A   (A = {run_a}, B = {run_b})")
    for col in ("task", "metric", "test", "n", "A", "B", "B - A", "95% CI", "p"):
        table.add_column(col)
    for r in results:
        ci = f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]" if "ci_low" in r else f"n10={r['n10']} n01={r['n01']}"
        table.add_row(r["task"], r["metric"], r["test"], str(r["n"]), f"{r['a']:.3f}", f"{r['b']:.3f}",
                      f"{r['diff']:+.3f}", ci, f"{r['p_value']:.4f}")
    Console().print(table)


def main(argv: list[str]) -> None:
    """argv[0] is the subcommand: `compare A B [...]` or `rescore RUN`."""
    if argv[0] == "rescore":
        ap = argparse.ArgumentParser(prog="python -m minift.evaluate rescore",
                                     description="Score a run's saved outputs again, without generating.")
        ap.add_argument("run")
        print_summary(rescore(ap.parse_args(argv[1:]).run))
        return
    ap = argparse.ArgumentParser(prog="python -m minift.evaluate compare",
                                 description="Paired significance of run B versus run A (same items).")
    ap.add_argument("run_a")
    ap.add_argument("run_b")
    ap.add_argument("--n-boot", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv[1:])
    results = compare(args.run_a, args.run_b, args.n_boot, args.seed)
    print_compare(results, args.run_a, args.run_b)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
