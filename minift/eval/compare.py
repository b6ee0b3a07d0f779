"""Paired comparison of two evaluation runs, and re-scoring a run's saved outputs.

    python -m minift.evaluate compare runs/eval/base runs/eval/sft       # paired significance, B - A
    python -m minift.evaluate rescore runs/eval/base                     # re-score saved outputs

A run directory is what `minift.eval.evaluate` writes: predictions.jsonl (one record per item, keyed by task and
id) and summary.json. `compare` pairs two runs item by item; each task names its paired tests.
"""
from __future__ import annotations

import json
from pathlib import Path

from minift.errors import MinifTError
from minift.eval.evaluate import EvalConfig, load_items, print_summary, read_jsonl, write_run
from minift.tasks import TASKS, get_task


def read_run(run: str) -> dict[tuple[str, str], dict]:
    """{(task, id): record} from a run directory's predictions.jsonl (or that file itself)."""
    path = Path(run) / "predictions.jsonl" if Path(run).is_dir() else Path(run)
    if Path(run).is_dir() and not path.is_file():
        raise MinifTError(f"{run}: no predictions.jsonl (not an evaluation run directory)")
    records = {}
    for n, r in read_jsonl(path):
        if not isinstance(r, dict) or not isinstance(r.get("task"), str) or not isinstance(r.get("id"), str):
            raise MinifTError(f"{path}:{n}: not an evaluation record (an object with 'task' and 'id' strings)")
        if r["task"] not in TASKS:
            raise MinifTError(f"{path}:{n}: unknown task {r['task']!r}")
        if (r["task"], r["id"]) in records:
            raise MinifTError(f"{path}:{n}: {r['task']} item {r['id']!r} appears twice")
        records[(r["task"], r["id"])] = r
    return records


def compare(run_a: str, run_b: str, n_boot: int = 10000, seed: int = 0) -> list[dict]:
    """Paired tests of B - A per task and metric, on the items both runs share (they must be the same)."""
    a, b = read_run(run_a), read_run(run_b)
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))[:3]
        raise MinifTError(f"{run_a} and {run_b} were evaluated on different items (e.g. {only}); "
                          "evaluate both on the same data and --limit")
    differ = [k for k in a if a[k].get("gold") != b[k].get("gold")]
    if differ:
        raise MinifTError(f"{run_a} and {run_b} give item {differ[0][0]} {differ[0][1]} different gold answers "
                          f"({a[differ[0]].get('gold')!r} vs {b[differ[0]].get('gold')!r}): not the same data")
    results = []
    for name in dict.fromkeys(k[0] for k in a):  # tasks in file order
        keys = [k for k in a if k[0] == name]
        try:
            tests = get_task(name).paired_tests([a[k] for k in keys], [b[k] for k in keys], n_boot, seed)
        except (KeyError, TypeError, ValueError) as e:  # a record without the fields its task scores
            raise MinifTError(f"{run_a} / {run_b}: {name} records lack what the paired tests read "
                              f"({type(e).__name__}: {e}); were they written by minift.eval.evaluate?") from None
        results += [{"task": name, **res} for res in tests]
    return results


def rescore(run: str) -> dict:
    """Score a run's saved outputs again (after a parser or metric change), with no generation."""
    path = Path(run) / "summary.json"
    if not path.is_file():
        raise MinifTError(f"{run}: no summary.json (not an evaluation run directory)")
    try:
        old = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MinifTError(f"{path}: not valid JSON ({e})") from None
    known = set(EvalConfig.__dataclass_fields__)
    if not (isinstance(old, dict) and isinstance(old.get("config"), dict) and isinstance(old.get("tasks"), dict)
            and set(old["config"]) <= known):
        raise MinifTError(f"{path}: not an evaluation summary (needs 'config' with {', '.join(sorted(known))} "
                          "and 'tasks')")
    c = old["config"]
    for key, ok in (("task", lambda v: isinstance(v, str)), ("split", lambda v: isinstance(v, str)),
                    ("data", lambda v: v is None or isinstance(v, str)),
                    ("limit", lambda v: v is None or (isinstance(v, int) and v >= 1))):
        if key in c and not ok(c[key]):
            raise MinifTError(f"{path}: config {key!r} is {c[key]!r}, not what an evaluation writes")
    cfg = EvalConfig(**dict(c, out=str(run)))
    preds = read_run(run)
    items = load_items(cfg)
    outputs = {}
    for name, rows in items.items():
        missing = [r["id"] for r in rows if (name, r["id"]) not in preds]
        if missing:
            raise MinifTError(f"{run}: no saved output for {name} item {missing[0]}")
        outputs[name] = [preds[(name, r["id"])]["output"] for r in rows]
    seconds = {n: s.get("seconds") if isinstance(s, dict) else None for n, s in old["tasks"].items()}
    return write_run(cfg, items, outputs, seconds)


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
    from minift.args import SEED, ArgumentParser, number

    if argv[0] == "rescore":
        ap = ArgumentParser(prog="python -m minift.evaluate rescore",
                            description="Score a run's saved outputs again, without generating.")
        ap.add_argument("run")
        print_summary(rescore(ap.parse_args(argv[1:]).run))
        return
    ap = ArgumentParser(prog="python -m minift.evaluate compare",
                        description="Paired significance of run B versus run A (same items).")
    ap.add_argument("run_a")
    ap.add_argument("run_b")
    ap.add_argument("--n-boot", type=number(int, ge=100, le=10_000_000), default=10000,
                    help="bootstrap resamples (fewer than 100 cannot give a 95%% interval)")
    ap.add_argument("--seed", type=SEED, default=0)
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv[1:])
    out = Path(args.out) if args.out else None
    if out is not None and (out.is_dir() or not out.parent.is_dir()):
        raise MinifTError(f"--out {out}: {'a directory' if out.is_dir() else 'its directory does not exist'}; "
                          "give a file path for the JSON results")
    for run in (args.run_a, args.run_b):
        if not Path(run).exists():
            raise MinifTError(f"{run}: not found (an evaluation run directory or its predictions.jsonl)")
    results = compare(args.run_a, args.run_b, args.n_boot, args.seed)
    print_compare(results, args.run_a, args.run_b)
    if out is not None:
        out.write_text(json.dumps(results, indent=2) + "\n")
