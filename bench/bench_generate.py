"""The cost of on-policy sampling beside one greedy pass over the same prompts.

The study's on-policy pairs (minift/study/pairs.py) sample k answers per preference prompt from the SFT model.
Three ways over the same prompts, each task with its own generation budget, batches of 16 prompts:
  greedy     one answer per prompt (what an evaluation does): the unit
  k samples  generate(num_samples=k): each prompt prefilled once, its k rows copied from that cache, and rows
             that have stopped leave the decode batch (what the study runs)
  k copies   each prompt given k times, every row decoded to the longest (drop_finished=False): the old path
Prints and writes (bench/results/bench_generate.json) wall seconds, generated tokens and each way's ratio to
greedy, all measured in one run on one machine.

    python bench/bench_generate.py --adapter runs/export/sft            # 16 prompts per task, k = 4
    python bench/bench_generate.py --per-task 2 --k 2                   # a smoke run
"""
import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script from anywhere: import minift from this checkout

import torch  # noqa: E402

from minift.eval.evaluate import messages  # noqa: E402
from minift.eval.generate import generate, load_for_generation  # noqa: E402
from minift.tasks import TASKS  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PAIRS = ROOT / "minift" / "datasets" / "clinical" / "dpo.jsonl"


def run(model, tok, prompts, budget, batch, k, way, seed=0):
    """(seconds, generated tokens) for one way over one task's prompts."""
    tokens, t0 = 0, time.perf_counter()
    for s in range(0, len(prompts), batch):
        chunk = prompts[s:s + batch]
        if way == "greedy":
            outs = generate(model, tok, chunk, max_new_tokens=budget, temperature=0.0)
        elif way == "k samples":
            outs = generate(model, tok, chunk, max_new_tokens=budget, temperature=1.0, seed=seed + s, num_samples=k)
        else:  # k copies, no dropping
            outs = generate(model, tok, [p for p in chunk for _ in range(k)], max_new_tokens=budget,
                            temperature=1.0, seed=seed + s, drop_finished=False)
        tokens += sum(len(o) for o in outs)
    return time.perf_counter() - t0, tokens


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default=None, help="HF checkpoint dir (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--adapter", default=None, help="the SFT adapter the study samples from")
    ap.add_argument("--per-task", type=int, default=16, help="preference prompts per task")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16, help="prompts per batch (the study's sampler: 16)")
    ap.add_argument("--out", default=str(RESULTS / "bench_generate.json"))
    args = ap.parse_args(argv)

    model, tok = load_for_generation(args.ckpt, args.adapter)
    rows = [json.loads(x) for x in PAIRS.read_text().splitlines() if x.strip()]
    ways = ("greedy", "k samples", "k copies")
    totals = {w: [0.0, 0] for w in ways}
    per_task = {}
    with torch.inference_mode():
        for name, task in TASKS.items():
            mine = [r for r in rows if r["task"] == name][:args.per_task]
            prompts = [tok.encode_chat(messages(r), add_generation_prompt=True) for r in mine]
            prompts.sort(key=len, reverse=True)  # similar lengths batch together, as the study's sampler does
            run(model, tok, prompts[:2], 4, args.batch, args.k, "greedy")  # warm-up
            per_task[name] = {}
            for w in ways:
                sec, n = run(model, tok, prompts, task.max_new_tokens, args.batch, args.k, w)
                per_task[name][w] = {"seconds": round(sec, 2), "tokens": n}
                totals[w][0] += sec
                totals[w][1] += n
    g = totals["greedy"][0]
    conditions = {"date": str(date.today()), "machine": platform.processor() or platform.machine(),
                  "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
                  "model": args.ckpt or "embedded SmolLM2-135M-Instruct", "adapter": args.adapter,
                  "prompts": args.per_task * len(TASKS), "k": args.k, "batch": args.batch,
                  "dtype": str(model.embed.weight.dtype), "device": str(model.embed.weight.device)}
    res = {"conditions": conditions, "per_task": per_task,
           "total": {w: {"seconds": round(s, 2), "tokens": n, "vs_greedy": round(s / g, 2),
                         "tokens_per_s": round(n / s, 1)} for w, (s, n) in totals.items()}}
    print(f"{conditions['prompts']} preference prompts, k = {args.k}, batch {args.batch} prompts, "
          f"{conditions['threads']} threads, {conditions['dtype']} on {conditions['device']}")
    print(f"{'way':<10} {'seconds':>8} {'tokens':>7} {'tok/s':>7} {'vs greedy':>9}")
    for w, t in res["total"].items():
        print(f"{w:<10} {t['seconds']:>8.1f} {t['tokens']:>7} {t['tokens_per_s']:>7.1f} {t['vs_greedy']:>8.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
