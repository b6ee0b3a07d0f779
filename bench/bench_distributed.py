"""Data parallelism on one machine: tokens/s and per-rank memory of the same SFT run as 1 process x W threads
and as W processes x 1 thread under torchrun, DDP and FSDP2 (on a GPU machine: 1 GPU vs W GPUs, per GPU, with
the scaling efficiency).

Every configuration trains the same global batch (--batch per rank x W ranks, grad-accum 1) for --steps steps
through the real command line (train_sft.py), so the numbers include what a user gets: data split, the global
count all-reduce, DDP's gradient all-reduce or FSDP's all-gathers and reduce-scatters, the optimizer.
  tokens/s       real tokens of the whole step (all ranks) / step wall time, median over the steps after
                 the first (warm-up); per device = that / W on GPU
  peak memory    per rank: CPU VmHWM (peak RSS) of the process, with MALLOC_MMAP_THRESHOLD_ so freed tensors
                 leave RSS at once (bench/common.py); GPU max_memory_allocated
  frozen weights per rank: bytes of the frozen base parameters this rank holds (its shards under FSDP),
                 measured on the wrapped model
    python bench/bench_distributed.py                # embedded SmolLM2-135M-Instruct, bundled clinical SFT data
    python bench/bench_distributed.py --smoke        # tiny random model, 2 steps (a check that it runs)
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import MALLOC_ENV, RESULTS, conditions  # noqa: E402


def worker(out_json, argv):
    """One rank (or the single process): train, then report peak memory and frozen-weight bytes."""
    from minift import cli
    from minift.train import distributed

    record = {}
    wrap = distributed.wrap

    def measured_wrap(model, *a, **kw):  # the frozen bytes this rank holds once the model is wrapped
        wrapped = wrap(model, *a, **kw)
        record["frozen_bytes"] = distributed.local_bytes(distributed.unwrap(wrapped))
        return wrapped

    distributed.wrap = measured_wrap
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    cli._sft(argv)
    if torch.cuda.is_available():
        record["peak_bytes"] = torch.cuda.max_memory_allocated()
    else:
        status = Path("/proc/self/status").read_text().splitlines()
        record["peak_bytes"] = next(int(l.split()[1]) * 1024 for l in status if l.startswith("VmHWM:"))
    rank = int(os.environ.get("RANK", 0))
    Path(f"{out_json}.rank{rank}").write_text(json.dumps(record))


def launch(name, world, threads, parallel, args, tmp, timeout):
    out = Path(tmp) / name
    probe = Path(tmp) / f"{name}.json"
    train = [*args, "--out", str(out), "--batch-size", str(args_batch(args) * (1 if parallel else world))]
    if parallel:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
               __file__, "--worker", str(probe), "--", *train, "--parallel", parallel]
    else:
        cmd = [sys.executable, __file__, "--worker", str(probe), "--", *train]
    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": str(threads)}
    t0, load = time.perf_counter(), os.getloadavg()[0]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l]
    steps = [r for r in rows if "tokens/s" in r]
    ranks = sorted(Path(tmp).glob(f"{name}.json.rank*"))
    per_rank = [json.loads(p.read_text()) for p in ranks]
    return {"config": name, "processes": world if parallel else 1, "threads_per_process": threads,
            "parallel": parallel or "none", "tokens_per_s": statistics.median(r["tokens/s"] for r in steps[1:]),
            "step_s": statistics.median(r["seconds"] for r in steps[1:]),
            "tokens_per_step": statistics.median(r["tokens"] for r in steps),
            "losses": [r["loss"] for r in steps],
            "peak_bytes_per_rank": [r["peak_bytes"] for r in per_rank],
            "frozen_bytes_per_rank": [r.get("frozen_bytes") for r in per_rank],
            "wall_s": time.perf_counter() - t0, "load_avg_1m": [load, os.getloadavg()[0]]}


def args_batch(args):
    return int(args[args.index("--batch-size") + 1])


def smoke_checkpoint(tmp):
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_hf_model, save_checkpoint

    d = Path(tmp) / "ckpt"
    save_checkpoint(make_hf_model("llama", tie_word_embeddings=True), d, shard=False)
    return d


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2, help="examples per rank per step")
    ap.add_argument("--world", type=int, default=0, help="processes (0: 2 on CPU, every GPU on a GPU machine)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", default=str(RESULTS / "bench_distributed.json"))
    ap.add_argument("--only", help="comma-separated configs (single, ddp, fsdp) to run again; the others are "
                                   "kept from --json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a.rest)
    cuda = torch.cuda.is_available()
    world = a.world or (torch.cuda.device_count() if cuda else 2)
    steps = 2 if a.smoke else a.steps
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = ["--ckpt", str(smoke_checkpoint(tmp))] if a.smoke else []
        args = [*ckpt, "--max-steps", str(steps), "--batch-size", str(a.batch), "--eval-every", "0",
                "--save-every", "0", "--no-progress", "--max-length", "512"]
        # CPU: the same 2 cores either as 2 threads of one process or as 1 thread in each of 2 processes.
        # GPU: one GPU vs `world` GPUs (threads do not matter there).
        one_threads = 1 if cuda else world
        load_start = os.getloadavg()
        only = a.only.split(",") if a.only else ["single", "ddp", "fsdp"]
        kept = {r["config"]: r for r in json.loads(Path(a.json).read_text())["runs"]} if a.only else {}
        runs = []
        for name in ("single", "ddp", "fsdp"):
            if name not in only:
                runs.append(kept[name])
            elif name == "single":  # GPU: the baseline is one GPU doing one rank's share (per-GPU throughput)
                runs.append(launch("single", 1 if cuda else world, one_threads, None, args, tmp, 1800))
            else:
                runs.append(launch(name, world, 1, name, args, tmp, 1800))
        load_end = os.getloadavg()
    base = runs[0]
    for r in runs:
        r["tokens_per_s_vs_single"] = r["tokens_per_s"] / base["tokens_per_s"]
        if cuda:
            r["tokens_per_s_per_device"] = r["tokens_per_s"] / r["processes"]
            r["scaling_efficiency"] = r["tokens_per_s"] / (r["processes"] * base["tokens_per_s"])
        r["frozen_vs_single"] = (max(b for b in r["frozen_bytes_per_rank"] if b)
                                 / max(b for b in base["frozen_bytes_per_rank"] if b))
    cond = conditions("cuda" if cuda else "cpu", torch.bfloat16 if cuda else torch.float32,
                      model="tiny random (smoke)" if a.smoke else "SmolLM2-135M-Instruct (embedded)",
                      data="bundled clinical SFT set", steps=steps, batch_per_rank=a.batch, world=world,
                      global_batch=a.batch * world, load_avg_at_start=load_start, load_avg_at_end=load_end,
                      cpu_count=os.cpu_count(), memory_method="peak RSS (VmHWM) per process, MALLOC_MMAP_THRESHOLD_=65536")
    result = {"conditions": cond, "runs": runs}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(cond, indent=2))
    print(table(runs, cuda))
    print(f"wrote {a.json}")


def table(runs, cuda):
    mb = 2 ** 20
    head = ("| config | processes x threads | tokens/s | vs 1 process | peak memory per rank (MB) | frozen weights per "
            "rank (MB) | load average (1 min) start, end |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in runs:
        peaks = " / ".join(f"{p / mb:.0f}" for p in r["peak_bytes_per_rank"])
        frozen = " / ".join(f"{p / mb:.1f}" for p in r["frozen_bytes_per_rank"] if p)
        extra = f" (per GPU {r['tokens_per_s_per_device']:.0f}, efficiency {r['scaling_efficiency']:.2f})" if cuda else ""
        lines.append(f"| {r['config']} | {r['processes']} x {r['threads_per_process']} | {r['tokens_per_s']:.0f}{extra} "
                     f"| {r['tokens_per_s_vs_single']:.2f}x | {peaks} | {frozen} "
                     f"| {r['load_avg_1m'][0]:.1f}, {r['load_avg_1m'][1]:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
