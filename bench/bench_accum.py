"""Peak memory against gradient accumulation: one DPO step of `train_dpo.py` with micro-batches of one shape.

The data are 40 copies of one clinical pair, so every micro-batch has the same shape and any growth of the peak
with --grad-accum comes from the loop holding several micro-batches at once, not from a longer batch. Each run is
a fresh process (`--max-steps 1`, live reference `--ref adapters-off`, micro-batch 2, no eval); its peak RSS is
the kernel's high-water mark of that process (`ru_maxrss` of the child). The model load is inside that peak
and the same for every run, so the difference between runs is the loop's. By default the children run with
MALLOC_MMAP_THRESHOLD_=65536 (as bench/common.py's memory method): big tensors are mmapped and leave RSS when
freed, so the peak counts live tensors and not glibc's heap growing with the number of alloc/free rounds
(`--default-malloc` measures with glibc's dynamic threshold instead, which is what a plain run gets).

    python bench/bench_accum.py                    # embedded SmolLM2-135M-Instruct, --grad-accum 1 and 8
    python bench/bench_accum.py --accum 1,2,4,8
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mib(argv, fixed_threshold=True):
    """Run argv as a child process; return its peak RSS in MiB (it must exit 0)."""
    env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": "65536"} if fixed_threshold else {})}
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(map(str, argv))} failed:\n{proc.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024  # KiB on Linux


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--accum", default="1,8")
    ap.add_argument("--ckpt", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--default-malloc", action="store_true", help="glibc's dynamic mmap threshold (no fixed one)")
    args = ap.parse_args()
    row = (ROOT / "minift" / "datasets" / "clinical" / "dpo.jsonl").read_text().splitlines()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        data.write_text((row + "\n") * 40)
        for accum in [int(a) for a in args.accum.split(",")]:
            argv = [sys.executable, str(ROOT / "train_dpo.py"), "--data", data, "--out", Path(tmp) / f"run{accum}",
                    "--batch-size", 2, "--grad-accum", accum, "--max-steps", 1, "--ref", "adapters-off",
                    "--eval-fraction", 0, "--eval-every", 0, "--no-progress"]
            argv += ["--ckpt", args.ckpt] if args.ckpt else []
            rows.append({"grad_accum": accum,
                         "peak_rss_mib": peak_rss_mib([str(a) for a in argv], not args.default_malloc)})
            print(f"grad-accum {accum:2d}: peak RSS {rows[-1]['peak_rss_mib']:.0f} MiB", flush=True)
    base = rows[0]["peak_rss_mib"]
    for r in rows:
        r["vs_first"] = r["peak_rss_mib"] / base
    print("| grad-accum | peak RSS MiB | vs grad-accum " + str(rows[0]["grad_accum"]) + " |\n|---:|---:|---:|")
    for r in rows:
        print(f"| {r['grad_accum']} | {r['peak_rss_mib']:.0f} | {r['vs_first']:.2f}x |")
    out = ROOT / "bench" / "results" / "bench_accum.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    malloc = "glibc default" if args.default_malloc else "MALLOC_MMAP_THRESHOLD_=65536"
    out.write_text(json.dumps({"micro_batch": 2, "pairs": "40 copies of data/clinical/dpo.jsonl row 1",
                               "malloc": malloc, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
