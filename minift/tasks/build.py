"""Write the bundled clinical data sets, byte-identical on every run:

    python -m minift.tasks.build [--out data] [--seed 0]

data/<task>/{sft,dpo,val,test}.jsonl for each task, and data/clinical/{sft,dpo,val,test}.jsonl, a smaller
mix of the four tasks that the trainers use by default. val is what the study chooses its settings on.
"""
from __future__ import annotations

import argparse
import json
import os

from minift.tasks import TASKS

SIZES = {"sft": 300, "dpo": 300, "test": 120, "val": 120}   # per task
MIXED = {"sft": 50, "dpo": 50, "test": 20, "val": 30}       # per task in data/clinical (x4 tasks)


def build(seed: int = 0) -> dict[str, dict[str, list[dict]]]:
    """{set name: {"sft"|"dpo"|"test": rows}} for the four tasks and the clinical mix."""
    out = {name: task.rows(SIZES["sft"], SIZES["dpo"], SIZES["test"], seed, SIZES["val"])
           for name, task in TASKS.items()}
    mixed = {}
    for kind, n in MIXED.items():
        # round-robin over tasks so that any prefix of the file holds all four tasks
        mixed[kind] = [out[name][kind][i] for i in range(n) for name in TASKS]
    out["clinical"] = mixed
    return out


def dumps(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows)


def write(out_dir: str, seed: int = 0) -> list[str]:
    paths = []
    for name, sets in build(seed).items():
        os.makedirs(os.path.join(out_dir, name), exist_ok=True)
        for kind, rows in sets.items():
            path = os.path.join(out_dir, name, f"{kind}.jsonl")
            with open(path, "w", encoding="utf-8", newline="\n") as f:
                f.write(dumps(rows))
            paths.append(path)
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description="Regenerate the bundled synthetic clinical data sets.")
    ap.add_argument("--out", default="minift/datasets", help="output folder (default: minift/datasets)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for p in write(args.out, args.seed):
        with open(p, encoding="utf-8") as f:
            print(f"{p}: {sum(1 for _ in f)} rows")


if __name__ == "__main__":
    main()
