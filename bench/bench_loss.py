"""Loss-path benchmark: per-token log-probs of hidden @ weight.T, forward + backward, four ways.

    naive   logits = hidden @ weight.T materialized, fp32 log_softmax, gather, autograd backward
    torch   kernels.linear_token_logprobs(impl="torch"): chunked, in place, no [N, V] tensor
    triton  kernels.linear_token_logprobs(impl="triton"): the same chunk loop with the Triton row kernels
    liger   Liger-Kernel's fused linear cross-entropy (when installed, CUDA only)

Each variant computes the same SFT-style loss, -sum(logp) / (number of kept tokens), and its backward; the
weight is frozen (the LoRA case) unless --train-weight. Time is the median of --repeats runs after one
warm-up. Peak memory of the loss path is measured per variant in a fresh subprocess (see MEMORY_METHOD).

    python bench/bench_loss.py            # CPU: N=4096 H=576 V=49152 fp32; CUDA: N=8192 H=4096 V=128256 bf16
    python bench/bench_loss.py --smoke    # tiny shapes, 1 repeat (CI)
"""
import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: import kernels from this checkout
from minift import kernels  # noqa: E402

IGNORE = -100
MEMORY_METHOD = ("peak memory: each variant runs in its own subprocess: inputs are made, the step runs once "
                 "(warm-up), freed heap is returned to the OS (malloc_trim), the kernel's peak-RSS mark is reset "
                 "(/proc/self/clear_refs), the step runs again; peak = VmHWM - VmRSS just before that step. It "
                 "counts every buffer of the loss path, the gradient of hidden included; not the inputs. On CUDA: "
                 "torch.cuda.max_memory_allocated over the memory allocated before the step, in-process.")


def naive_logprobs(hidden, weight, targets):
    logits = hidden @ weight.T  # (N, V) in the input dtype, as the model's lm_head makes them
    logp = logits.float().log_softmax(-1)  # (N, V) fp32
    keep = targets != IGNORE
    picked = logp.gather(1, torch.where(keep, targets, 0)[:, None]).squeeze(1)  # (N,)
    return torch.where(keep, picked, 0.0)


def make_step(variant):
    """step(hidden, weight, targets) -> loss, after backward (grads land in hidden.grad / weight.grad)."""
    if variant == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        ce = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="mean")

        def step(h, w, t):
            loss = ce(w, h, t)
            loss = loss[0] if isinstance(loss, tuple) else loss
            loss.backward()
            return loss.detach()
        return step
    fn = naive_logprobs if variant == "naive" else (
        lambda h, w, t: kernels.linear_token_logprobs(h, w, t, IGNORE, impl=variant))

    def step(h, w, t):
        loss = -fn(h, w, t).sum() / (t != IGNORE).sum()
        loss.backward()
        return loss.detach()
    return step


def skip_reason(variant, device):
    if variant == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "needs CUDA (TRITON_INTERPRET=1 runs it on the CPU, for tests only)"
    if variant == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as e:
            return f"triton not importable: {e}"
    if variant == "liger":
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return "liger-kernel is not installed"
        if device != "cuda":
            return "Liger-Kernel runs on CUDA only"
    return None


def make_inputs(args, device, dtype):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.N, args.H, generator=g)
    weight = torch.randn(args.V, args.H, generator=g).mul_(args.H ** -0.5 * 4)  # logits of std ~4 (peaked rows)
    targets = torch.randint(0, args.V, (args.N,), generator=g)
    targets[torch.rand(args.N, generator=g) < 0.1] = IGNORE  # some prompt tokens
    hidden, weight = hidden.to(device, dtype), weight.to(device, dtype)
    return hidden.requires_grad_(), weight.requires_grad_(args.train_weight), targets.to(device)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_variants(variants, args, device, inputs):
    """Median seconds per variant. Rounds interleave the variants (naive, torch, ..., naive, torch, ...), so
    that a change in the machine's background load hits all of them alike; round 0 is the warm-up."""
    steps = {v: make_step(v) for v in variants}
    h, w, t = inputs
    times, last = {v: [] for v in variants}, {}
    for r in range(1 + args.repeats):
        for v in variants:
            h.grad = w.grad = None
            sync(device)
            t0 = time.perf_counter()
            loss = steps[v](h, w, t)
            sync(device)
            if r:
                times[v].append(time.perf_counter() - t0)
            last[v] = (loss.float().item(), h.grad.float())
    return {v: (statistics.median(times[v]),) + last[v] for v in variants}


def _status_kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(variant, args, device, dtype):
    """Peak bytes of one step over the memory held just before it (this process runs only this)."""
    inputs = make_inputs(args, device, dtype)
    step = make_step(variant)
    step(*inputs)  # warm-up: lazy initialisations are not the loss path's memory
    inputs[0].grad = inputs[1].grad = None
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(*inputs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (the peak RSS mark) to the current RSS
    step(*inputs)
    return (_status_kb("VmHWM") - base) * 1024


def memory_in_subprocess(variant, args):
    cmd = [sys.executable, __file__, "--measure-memory", variant, "--N", str(args.N), "--H", str(args.H),
           "--V", str(args.V), "--dtype", args.dtype, "--device", args.device]
    cmd += ["--train-weight"] if args.train_weight else []
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory subprocess for {variant} failed:\n{out.stderr}")
    return int(out.stdout.strip().splitlines()[-1])


def conditions(args, device, dtype):
    cpu = platform.processor() or "?"
    if Path("/proc/cpuinfo").exists():
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    rows = kernels.chunk_rows(args.N, args.V, None, device)
    NHV = args.N * args.H * args.V
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "cpu": cpu, "threads": torch.get_num_threads(), "dtype": args.dtype,
        "N": args.N, "H": args.H, "V": args.V, "weight": "trainable" if args.train_weight else "frozen (LoRA)",
        "chunk_rows": rows, "repeats": args.repeats, "torch": torch.__version__, "triton": triton_version,
        "load_avg_1min": round(os.getloadavg()[0], 2),  # other work on the machine makes timings noisy
        "matmul_gflop": {  # 2 flops per multiply-add; the row ops (exp, sums) are O(N*V), not counted
            "naive": (6 if args.train_weight else 4) * NHV / 1e9,
            "fused": (8 if args.train_weight else 4) * NHV / 1e9,
        },
        "flop_formula": ("naive: 2NHV forward + 2NHV dhidden (+2NHV dweight); fused, frozen weight: 2NHV logits + "
                         "2NHV for (onehot - softmax) @ weight in the forward, dhidden = g * that; fused, trainable "
                         "weight: 2NHV forward + 2NHV recompute + 2NHV dhidden + 2NHV dweight"),
        "memory_method": MEMORY_METHOD,
    }


def print_report(cond, rows):
    from rich.console import Console
    from rich.table import Table

    con = Console(width=120)
    info = Table(title="bench_loss: conditions", show_header=False)
    for k, v in cond.items():
        if k not in ("flop_formula", "memory_method"):
            info.add_row(k, ", ".join(f"{a} {b:.1f}" for a, b in v.items()) if isinstance(v, dict) else str(v))
    con.print(info)
    tab = Table(title="forward + backward of the loss path (median time; ratios against naive, from this run)")
    for col in ["variant", "time s", "speed vs naive", "peak MiB", "memory vs naive", "|Δloss|", "Δdhidden", "note"]:
        tab.add_column(col, justify="left" if col in ("variant", "note") else "right")
    for r in rows:
        if r.get("skipped"):
            tab.add_row(r["variant"], "-", "-", "-", "-", "-", "-", "skipped: " + r["skipped"])
            continue
        tab.add_row(r["variant"], f"{r['time_s']:.3f}", f"{r['speed_vs_naive']:.2f}x", f"{r['peak_mib']:.1f}",
                    f"1/{1 / r['memory_vs_naive']:.1f}" if r["memory_vs_naive"] else "-",
                    f"{r['dloss']:.1e}", f"{r['ddh']:.1e}", r.get("note", ""))
    con.print(tab)
    con.print("speed vs naive = naive time / time (>= 1: no slower). Δdhidden = max |dh - dh_naive| / max |dh_naive|.")
    con.print("matmul FLOPs: " + cond["flop_formula"] + ".")
    con.print(MEMORY_METHOD)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes and 1 repeat (CI)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--N", type=int)
    p.add_argument("--H", type=int)
    p.add_argument("--V", type=int)
    p.add_argument("--dtype", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--train-weight", action="store_true", help="weight requires grad (full fine-tuning)")
    p.add_argument("--json", type=Path, help="default: bench/results/bench_loss[_smoke].json")
    p.add_argument("--measure-memory", metavar="VARIANT", help=argparse.SUPPRESS)  # subprocess mode
    args = p.parse_args()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    args.device = device
    big = dict(N=8192, H=4096, V=128256, dtype="bfloat16") if device == "cuda" else \
        dict(N=4096, H=576, V=49152, dtype="float32")
    shapes = dict(N=64, H=32, V=1000, dtype="float32") if args.smoke else big
    for k, v in shapes.items():
        setattr(args, k, getattr(args, k) or v)
    args.repeats = 1 if args.smoke else args.repeats
    dtype = getattr(torch, args.dtype)
    if args.measure_memory:
        print(measure_memory(args.measure_memory, args, device, dtype))
        return
    cond = conditions(args, device, dtype)
    inputs = make_inputs(args, device, dtype)
    skipped = {v: skip_reason(v, device) for v in ["naive", "torch", "triton", "liger"]}
    timed = time_variants([v for v, why in skipped.items() if not why], args, device, inputs)
    rows, ref = [], None
    for variant, reason in skipped.items():
        if reason:
            rows.append({"variant": variant, "skipped": reason})
            continue
        t, loss, dh = timed[variant]
        peak = memory_in_subprocess(variant, args)
        ref = ref or {"time": t, "loss": loss, "dh": dh, "peak": peak}
        rows.append({"variant": variant, "time_s": t, "speed_vs_naive": ref["time"] / t, "peak_mib": peak / 2**20,
                     "memory_vs_naive": peak / ref["peak"] if ref["peak"] > 0 else None,
                     "dloss": abs(loss - ref["loss"]),
                     "ddh": ((dh - ref["dh"]).abs().max() / ref["dh"].abs().max()).item()})
        if variant == "liger":
            rows[-1]["note"] = "mean CE (its own reduction)"
    cond["load_avg_1min"] = f"{cond['load_avg_1min']} at start, {os.getloadavg()[0]:.2f} at end"
    print_report(cond, rows)
    out = args.json or ROOT / "bench" / "results" / ("bench_loss_smoke.json" if args.smoke else "bench_loss.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"conditions": cond, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
