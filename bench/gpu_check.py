"""One command for the day a GPU is lent: is minift right and fast on it? One table, under 8 minutes on one GPU.

    python bench/gpu_check.py                  # a CUDA machine; --ckpt DIR if the embedded model cannot be fetched
    python bench/gpu_check.py --dry-run        # the same table code on the CPU at tiny shapes (the tests run this)

Rows of the table, each with its time, its peak memory and its error against a reference:
  kernels     token_logprobs and linear_token_logprobs (frozen and trainable weight), forward + backward, the
              Triton kernels compiled for the GPU and the torch path, each against fp64 computed from the same
              rounded inputs, at Llama 3 8B's vocabulary projection (V = 128256, H = 4096) in bf16 and fp32
  train       a few bf16 SFT and DPO steps on the embedded model on the GPU against the same steps in fp32 on
              the CPU (LoRA dropout off, so that both runs take the same steps)
  bench_loss  bench/bench_loss.py at N = 8192, H = 4096, V = 128256, bf16, Liger-Kernel beside it when installed
  generate    host-device syncs per generated token (torch.cuda.set_sync_debug_mode), and greedy text on the
              GPU in bf16 against the CPU in fp32
Without CUDA (and without --dry-run) it refuses with one `error:` line and exit code 2. Results go to
bench/results/gpu_check.json (--json); measured figures belong in bench/README.md.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
from minift import kernels  # noqa: E402
from minift.errors import MinifTError  # noqa: E402

IGNORE = -100
FULL = dict(N=4096, H=4096, V=128256)  # Llama 3 8B's lm_head; 4096 tokens: the fp64 reference logits are 4.2 GB
TINY = dict(N=64, H=32, V=1000)
# Error bounds (max |logp - fp64|, and max |grad - fp64| / max |grad_fp64|), from the one rounding each dtype adds:
# fp32: the GEMM over H accumulates in fp32 (TF32 off): ~sqrt(H) * 2^-24 * |logit| << 1e-3.
# bf16: the chunk of logits leaves the GEMM rounded to bf16 (2^-8 relative), so a logit z is off by up to
# |z| 2^-9 and logp = z_t - lse by twice that: bound 2^-8 * max|z|. Gradients go through onehot - softmax
# stored in bf16 and a bf16 GEMM (and, trainable weight, dW summed chunk by chunk in bf16): 2^-5 relative.
BOUNDS = {"float32": (lambda zmax: 1e-3, 1e-3), "bfloat16": (lambda zmax: 2 ** -8 * zmax, 2 ** -5)}
BOUNDS_DOC = ("kernels: max |logp - fp64| and max |grad - fp64| / max |grad fp64|; fp32 1e-3 and 1e-3, bf16 "
              "2^-8 max|logit| and 2^-5. train: max over steps of |bf16 GPU - fp32 CPU| / |fp32 CPU|, 0.02.")
TRAIN_BOUND = 0.02  # bf16 on the GPU vs fp32 on the CPU, relative: weights and activations rounded to 2^-8
#                     in every layer; errors partly cancel over the ~1000 tokens a loss averages


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


class Peak:
    """Peak device memory of a block over what was allocated when it began (None on the CPU). Blocks reset CUDA's
    one peak counter, so the highest absolute peak of the whole run is kept aside, in Peak.highest_mib."""
    highest_mib = None

    def __init__(self, device):
        self.device, self.mib = device, None

    def _keep_highest(self):
        Peak.highest_mib = max(Peak.highest_mib or 0, torch.cuda.max_memory_allocated() / 2 ** 20)

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self._keep_highest()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self._keep_highest()
            self.mib = (torch.cuda.max_memory_allocated() - self.base) / 2 ** 20


def row(section, case, time_s=None, peak_mib=None, error=None, bound=None, ok=None, note=""):
    return dict(section=section, case=case, time_s=time_s, peak_mib=peak_mib, error=error, bound=bound, ok=ok,
                note=note)


# ------------------------------------------------------------------------------------------------- kernels
def kernel_inputs(shape, device, dtype):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(shape["N"], shape["H"], generator=g).to(device, dtype)
    weight = (torch.randn(shape["V"], shape["H"], generator=g) * shape["H"] ** -0.5 * 4).to(device, dtype)  # logits std ~4
    targets = torch.randint(0, shape["V"], (shape["N"],), generator=g)
    targets[torch.rand(shape["N"], generator=g) < 0.1] = IGNORE  # some prompt tokens
    upstream = torch.randn(shape["N"], generator=g)  # any upstream gradient (the contract), not only the SFT mean
    return hidden, weight, targets.to(device), upstream.to(device)


def fp64_reference(fn, hidden, weight, targets, g):
    """(logp, grads, max |logit|) in fp64 from the same rounded inputs; no autograd, one [N, V] at a time."""
    h, w = hidden.double(), weight.double()
    z = h @ w.T  # (N, V)
    zmax = z.abs().max().item()
    keep = targets != IGNORE
    t = torch.where(keep, targets, 0)
    lse = z.logsumexp(-1)
    logp = torch.where(keep, z.gather(1, t[:, None]).squeeze(1) - lse, 0.0)
    z = (z - lse[:, None]).exp_().neg_()  # (N, V) -softmax, in place
    z.scatter_add_(1, t[:, None], torch.ones_like(z[:, :1]))  # onehot - softmax
    z.mul_(torch.where(keep, g.double(), 0.0)[:, None])  # dlogits
    if fn == "token":
        return logp, [z], zmax
    grads = [z @ w] + ([z.T @ h] if fn == "linear_trainable" else [])
    return logp, grads, zmax


def kernel_call(fn, impl, hidden, weight, targets, g):
    """Forward + backward; (logp, [grads])."""
    if fn == "token":
        logits = (hidden @ weight.T).requires_grad_()  # given logits, as a caller of token_logprobs holds them
        leaves = [logits]
        logp = kernels.token_logprobs(logits, targets, IGNORE, impl=impl)
    else:
        leaves = [hidden.requires_grad_()] + ([weight.requires_grad_()] if fn == "linear_trainable" else [])
        logp = kernels.linear_token_logprobs(hidden, weight, targets, IGNORE, impl=impl)
    (logp * g).sum().backward()
    grads = [x.grad for x in leaves]
    hidden.requires_grad_(False).grad = None
    weight.requires_grad_(False).grad = None
    return logp.detach(), grads


def kernel_rows(shape, device, dtypes, repeats):
    rows = []
    triton_skip = None
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        triton_skip = "compiled Triton needs CUDA (TRITON_INTERPRET=1 runs it interpreted on the CPU)"
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        hidden, weight, targets, g = kernel_inputs(shape, device, dtype)
        for fn in ("token", "linear_frozen", "linear_trainable"):
            ref_logp, ref_grads, zmax = fp64_reference(fn, hidden, weight, targets, g)
            bound_logp, bound_grad = BOUNDS[dtype_name][0](zmax), BOUNDS[dtype_name][1]
            name = "token_logprobs" if fn == "token" else f"linear_token_logprobs ({fn.split('_')[1]} weight)"
            for impl in ("torch", "triton"):
                case = f"{name} {dtype_name} {impl}"
                if impl == "triton" and triton_skip:
                    rows.append(row("kernels", case, note="skipped: " + triton_skip))
                    continue
                kernel_call(fn, impl, hidden, weight, targets, g)  # warm-up: Triton compiles here
                times = []
                for _ in range(repeats):
                    sync(device)
                    t0 = time.perf_counter()
                    with Peak(device) as peak:
                        logp, grads = kernel_call(fn, impl, hidden, weight, targets, g)
                    times.append(time.perf_counter() - t0)
                err_logp = (logp.double() - ref_logp).abs().max().item()
                err_grad = max(((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(grads, ref_grads))
                rows.append(row("kernels", case, statistics.median(times), peak.mib,
                                f"logp {err_logp:.1e}, grad {err_grad:.1e}",
                                f"{bound_logp:.1e}, {bound_grad:.1e}",
                                err_logp <= bound_logp and err_grad <= bound_grad))
                del logp, grads
            del ref_logp, ref_grads
        del hidden, weight
    return rows


# ------------------------------------------------------------------------------------------------- training
def small_data(work, n_rows):
    """The first n_rows of the bundled clinical sft and dpo sets (a few steps need no more)."""
    from minift.defaults import bundled

    out = {}
    for split in ("sft", "dpo"):
        lines = bundled("clinical", split).read_text(encoding="utf-8").splitlines()[:n_rows]
        out[split] = work / f"{split}.jsonl"
        out[split].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def train(kind, ckpt, data, out, device, dtype, steps, adapter=None):
    """metrics.jsonl records of a short run (batch 2, no dropout, no eval) and its peak device memory."""
    from minift.train.recipes import run_dpo, run_sft
    from minift.train.train_config import DPOConfig, TrainConfig, parse_config

    argv = ["--data", str(data), "--out", str(out), "--max-steps", str(steps), "--batch-size", "2",
            "--max-length", "1024", "--lora-dropout", "0", "--eval-fraction", "0", "--eval-every", "0",
            "--save-every", "0", "--no-progress", "--device", device, "--dtype", dtype]
    argv += (["--ckpt", str(ckpt)] if ckpt else []) + (["--adapter", str(adapter)] if adapter else [])
    with Peak(device) as peak:
        if kind == "sft":
            run_sft(parse_config(TrainConfig, argv))
        else:
            run_dpo(parse_config(DPOConfig, argv))
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()], peak.mib


def rel_err(got, ref, key, steps):
    return max(abs(a[key] - b[key]) / max(abs(b[key]), 1e-12) for a, b in list(zip(got, ref))[steps])


def train_rows(ckpt, work, device, steps):
    """SFT from a fresh adapter, then DPO from that SFT adapter, on the device in bf16 and on the CPU in fp32.

    A fresh LoRA A is drawn from the generator of the device it is made on, so the two SFT runs share their
    weights at step 1 only (B = 0 hides A): step 1 is checked, later steps are shown. Both DPO runs start from
    the CPU run's SFT adapter, so every DPO step is checked. DPO's loss is log 2 at step 1 in any dtype (policy
    = reference), so its policy log-probs are compared as well."""
    rows, data = [], small_data(work, 2 * steps)  # batch 2: one pass over the rows is the run
    ref, _ = train("sft", ckpt, data["sft"], work / "sft_cpu", "cpu", "float32", steps)
    got, peak = train("sft", ckpt, data["sft"], work / "sft_dev", device, "bfloat16", steps)
    first, later = rel_err(got, ref, "loss", slice(0, 1)), rel_err(got, ref, "loss", slice(1, None))
    rows.append(row("train", f"sft: step 1 of {steps}, bf16 on {device} vs fp32 on cpu", median_step(got), peak,
                    f"loss {first:.1e}", f"{TRAIN_BOUND:.0e} relative", first <= TRAIN_BOUND,
                    note=f"time: median step; steps 2+ (other LoRA init): loss {later:.1e}"))
    adapter = work / "sft_cpu"
    ref, _ = train("dpo", ckpt, data["dpo"], work / "dpo_cpu", "cpu", "float32", steps, adapter)
    got, peak = train("dpo", ckpt, data["dpo"], work / "dpo_dev", device, "bfloat16", steps, adapter)
    errs = {k: rel_err(got, ref, k, slice(None)) for k in ("logps/chosen", "logps/rejected", "loss")}
    rows.append(row("train", f"dpo: {steps} steps from the SFT adapter, bf16 on {device} vs fp32 on cpu",
                    median_step(got), peak, ", ".join(f"{k} {v:.1e}" for k, v in errs.items()),
                    f"{TRAIN_BOUND:.0e} relative", max(errs.values()) <= TRAIN_BOUND, note="time: median step"))
    return rows


def median_step(records):
    """Median seconds of the steps after the first (the first one compiles and warms up)."""
    return statistics.median(r["seconds"] for r in records[1:]) if len(records) > 1 else records[0]["seconds"]


# ------------------------------------------------------------------------------------------------- bench_loss
def bench_loss_rows(work, dry_run):
    out = work / "bench_loss.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_loss.py"), "--json", str(out)] + (["--smoke"] if dry_run else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return [row("bench_loss", "bench/bench_loss.py", ok=False, note="failed: " + proc.stderr.strip()[-300:])]
    data = json.loads(out.read_text())
    c = data["conditions"]
    rows = []
    for r in data["results"]:
        case = f"{r['variant']} N={c['N']} H={c['H']} V={c['V']} {c['dtype']}"
        if r.get("skipped"):
            rows.append(row("bench_loss", case, note="skipped: " + r["skipped"]))
            continue
        rows.append(row("bench_loss", case, r["time_s"], r["peak_mib"],
                        f"Δloss {r['dloss']:.1e}, Δdh {r['ddh']:.1e} vs naive", note=r.get("note", "")))
    return rows


# ------------------------------------------------------------------------------------------------- generation
def generate_rows(ckpt, device):
    if device != "cuda":
        return [row("generate", "host-device syncs per token", note="skipped: counted by CUDA's sync debug mode")]
    from minift.eval.generate import generate, load_for_generation

    rows, texts = [], {}
    for dev, dt in (("cuda", "bfloat16"), ("cpu", "float32")):
        model, tok = load_for_generation(ckpt, None, dev, dt)
        prompt = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}],
                                 add_generation_prompt=True)
        texts[dev] = tok.decode(generate(model, tok, [prompt], max_new_tokens=30)[0], skip_special_tokens=True)
        if dev == "cuda":
            n, batch = 64, 8
            generate(model, tok, [prompt] * batch, max_new_tokens=4, stop_ids=set())  # warm-up
            torch.cuda.set_sync_debug_mode("warn")  # every host-device sync now warns
            with warnings.catch_warnings(record=True) as caught, Peak("cuda") as peak:
                warnings.simplefilter("always")
                t0 = time.perf_counter()
                generate(model, tok, [prompt] * batch, max_new_tokens=n, stop_ids=set())
                seconds = time.perf_counter() - t0
            torch.cuda.set_sync_debug_mode(0)
            syncs = sum("synchroniz" in str(w.message) for w in caught)
            allowed = n // 16 + 4  # one per 16 tokens, plus the prompt's copies and the one copy of the result
            rows.append(row("generate", f"{n} tokens x {batch} rows, bf16: host-device syncs", seconds, peak.mib,
                            f"{syncs} syncs ({syncs / n:.2f} per token)", f"<= {allowed}", syncs <= allowed,
                            note=f"{n * batch / seconds:.0f} tokens/s"))
        del model
    same = texts["cuda"].split()[:5] == texts["cpu"].split()[:5]
    rows.append(row("generate", "greedy answer, cuda bf16 vs cpu fp32", error=f"{texts['cuda'][:40]!r}",
                    bound=f"{texts['cpu'][:40]!r}", ok="Paris" in texts["cuda"],
                    note="first 5 words " + ("equal" if same else "differ (bf16 rounding can flip a greedy tie)")))
    return rows


# ------------------------------------------------------------------------------------------------- report
def print_table(rows, cond):
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"gpu_check on {cond['device']} (torch {cond['torch']}, triton {cond['triton']}), "
                        f"{cond['seconds']:.0f} s, highest device memory "
                        + ("-" if cond["peak_mib"] is None else f"{cond['peak_mib']:.0f} MiB"))
    for col in ("section", "case", "time ms", "peak MiB", "error", "bound", "ok", "note"):
        table.add_column(col, justify="right" if col in ("time ms", "peak MiB") else "left")
    for r in rows:
        ok = "-" if r["ok"] is None else ("yes" if r["ok"] else "NO")
        table.add_row(r["section"], r["case"], "-" if r["time_s"] is None else f"{1000 * r['time_s']:.1f}",
                      "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}", r["error"] or "", r["bound"] or "",
                      ok, r["note"])
    Console(width=200).print(table)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="the table code on the CPU at tiny shapes (tests)")
    ap.add_argument("--ckpt", default=None, help="HF checkpoint dir (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--steps", type=int, default=3, help="training steps per run")
    ap.add_argument("--repeats", type=int, default=3, help="timed kernel runs (median)")
    ap.add_argument("--skip", default="", help="comma-separated sections to leave out: kernels,train,bench_loss,generate")
    ap.add_argument("--json", type=Path, default=None, help="default: bench/results/gpu_check[_dry_run].json")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise MinifTError("bench/gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                          "--dry-run runs its table code on the CPU at tiny shapes")
    device = "cpu" if args.dry_run else "cuda"
    t0 = time.perf_counter()
    skip = set(filter(None, args.skip.split(",")))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = args.ckpt
        if args.dry_run and ckpt is None:
            from bench.common import tiny_checkpoint

            ckpt = tiny_checkpoint(work / "tiny")
        elif ckpt is None:
            from minift.model.fetch import default_checkpoint

            default_checkpoint()  # fetched and converted first: a machine without the network fails here, at once
        sections = {"kernels": lambda: kernel_rows(TINY if args.dry_run else FULL, device, ("float32", "bfloat16"),
                                                   args.repeats),
                    "train": lambda: train_rows(ckpt, work, device, args.steps),
                    "bench_loss": lambda: bench_loss_rows(work, args.dry_run),
                    "generate": lambda: generate_rows(ckpt, device)}
        rows = []
        with Peak(device):
            for name, run in sections.items():
                if name not in skip:
                    t1 = time.perf_counter()
                    rows += run()
                    print(f"gpu_check: {name} done in {time.perf_counter() - t1:.0f} s", flush=True)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    cond = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)", "torch": torch.__version__,
            "triton": triton_version, "seconds": time.perf_counter() - t0,
            "peak_mib": Peak.highest_mib,
            "shapes": TINY if args.dry_run else FULL, "bounds": BOUNDS_DOC}
    print_table(rows, cond)
    out = args.json or ROOT / "bench" / "results" / ("gpu_check_dry_run.json" if args.dry_run else "gpu_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"conditions": cond, "rows": rows}, indent=2) + "\n")
    failed = [r["case"] for r in rows if r["ok"] is False]
    print(f"wrote {out}; {len(rows)} rows, {len(failed)} outside their bound" + (f": {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MinifTError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
