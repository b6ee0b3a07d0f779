"""Training-step benchmark: SFT vs DPO on real steps, explained by a FLOP model, and what each part of minift's
design takes off DPO's cost.

One step = forward + backward + gradient clipping + AdamW step, LoRA r=16 on all linear layers of the blocks,
batch of --pairs preference pairs (SFT: the prompt + chosen of the same pairs, so both do equal work):
  sft_naive       SFT with the logits of every position (model.lm_head, fp32 log_softmax, gather), pads computed
  sft             SFT as minift does it: fused log-prob kernel on the completion rows only, pads not computed
  dpo_naive       DPO, concat layout (chosen and rejected rows each repeat the prompt), full logits,
                  reference computed on the fly with the adapters off
  dpo_fused       + kernels.linear_token_logprobs over all positions (no [rows x V] logits tensor)
  dpo_completion  + only completion rows through the vocab projection (minift.train.losses, concat layout)
  dpo_shared      + the shared-prompt layout: [prompt | chosen | rejected], the prompt computed once
  dpo_unpadded    + the pads of the rows not computed (batch.lengths -> model.Unpadded)
                    (train_dpo.py --ref adapters-off)
  dpo_cached      + cached reference: its log-probs precomputed once (minift.train.reference, --ref cached); the step
                    runs no reference forward (minift's default)
  simpo           SimPO (minift.train.pref_losses): the dpo_unpadded batch, no reference at all (nothing to cache)
  orpo            ORPO: the same, + the chosen completion's NLL (from the same log-probs: no extra FLOPs)
  kto             KTO on the same P pairs as 2P unpaired examples (minift.train.unpaired), each one row
                  [prompt | completion | KL completion y'] (shared-prompt layout, pads not computed), cached reference
  ref_pass        not a training step: the cached reference's one-time no-grad pass over the same pairs (what
                  building the cache costs per step's worth of data, paid once per data set and reference)
Rounds interleave the variants (a load change hits them all alike); round 0 is the warm-up, starts every variant
from the same weights and records its loss (all DPO variants compute the same loss). The FLOP model is in
bench/common.py. Peak memory: see common.MEMORY_METHOD.

    python bench/bench_step.py                 # embedded SmolLM2-135M-Instruct, clinical + balanced shapes
    python bench/bench_step.py --smoke         # tiny random model, 1 repeat (CI)
    python bench/bench_step.py --profile dpo_naive,sft
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the checkout on sys.path)

from minift import kernels  # noqa: E402
import minift  # noqa: E402
from minift.model import lora  # noqa: E402
from minift.train.losses import dpo_loss_sums, dpo_losses, sequence_logps, sft_loss_sum  # noqa: E402
from minift.train.pref_losses import kto_loss_sums, orpo_loss_sums, simpo_loss_sums  # noqa: E402
from minift.train.unpaired import assign_kl, kto_batch, pairs_to_unpaired  # noqa: E402
from minift.train.reference import Reference  # noqa: E402

VARIANTS = {
    "sft_naive": "SFT, full logits",
    "sft": "SFT, minift (fused, completion rows)",
    "dpo_naive": "DPO naive: concat, full logits, live ref",
    "dpo_fused": "+ fused log-prob kernel (all rows)",
    "dpo_completion": "+ completion-only vocab projection",
    "dpo_shared": "+ shared-prompt layout",
    "dpo_unpadded": "+ pads not computed",
    "dpo_cached": "+ cached reference (minift default)",
    "simpo": "SimPO: no reference",
    "orpo": "ORPO: no reference, + chosen NLL",
    "kto": "KTO: 2P unpaired rows, cached ref",
    "ref_pass": "cache build: no-grad ref pass (once)",
}
DPO_CFG = SimpleNamespace(beta=0.1, loss="sigmoid", label_smoothing=0.0, sft_weight=0.0)
IGNORE = -100
REF_FREE = ("simpo", "orpo", "dpo_cached")  # one training pass over the shared-prompt batch, no reference forward
PREF = ("simpo", "orpo", "kto")  # other losses: no naive counterpart to compare the loss with


def dense_labels(batch):
    """(B, T) next-token targets at the positions that predict them, IGNORE elsewhere (prompt, pads)."""
    labels = torch.full((batch.ids.numel(),), IGNORE, dtype=torch.long, device=batch.ids.device)
    labels[batch.pred_index] = batch.targets
    return labels.view(batch.ids.shape)  # (B, T)


def full_logits_row_logps(model, batch, labels):
    """Per-row sums of target log-probs with the [B, T, V] logits materialized (the plain way)."""
    hidden = model(batch.ids, batch.positions, batch.mask)  # (B, T, H)
    logp = model.lm_head(hidden).float().log_softmax(-1)  # (B, T, V) fp32
    picked = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)  # (B, T)
    return torch.where(labels != IGNORE, picked, 0.0).sum(1)  # (B,)


def fused_all_row_logps(model, batch, labels):
    """The same through the fused kernel, every position a row of it (ignored rows still projected)."""
    hidden = model(batch.ids, batch.positions, batch.mask)  # (B, T, H)
    logp = kernels.linear_token_logprobs(hidden.flatten(0, 1), model.lm_head.weight, labels.flatten(), IGNORE)
    return logp.view(labels.shape).sum(1)  # (B*T,) -> (B, T) -> (B,)


class Bench:
    """Model with LoRA, optimizer, the three batches of one data shape, and the two references."""

    def __init__(self, model, tok, pairs, device, workdir):
        self.model, self.device, self.pairs = model, device, pairs
        self.batches = {k: b.to(device) for k, b in common.make_batches(pairs, tok.pad_id).items()}
        # the same batches with no `lengths`: the model computes every slot, pads included (the plain way)
        self.padded = {k: replace(b, lengths=None) for k, b in self.batches.items()}
        self.labels = {k: dense_labels(self.batches[k]) for k in ("sft", "concat")}
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)
        self.P = len(pairs)
        self.ref_live = Reference("adapters-off", model)
        self.ref_cached = Reference("cached", model, out_dir=workdir, key_parts={"bench": "step"}, log=lambda m: None)
        self.batches["shared-prompt"].index = list(range(self.P))  # the pairs' rows in the cached table
        self.ref_cached.prepare(lambda: [self.batches["shared-prompt"]], self.P)
        # KTO: each pair gives a desirable and an undesirable example, each with its KL completion y'
        examples = assign_kl(pairs_to_unpaired(pairs))
        kto = kto_batch(examples, "shared-prompt", tok.pad_id)
        self.kto = kto.to(device)
        self.kto.index, self.kto.desirable = list(range(len(examples))), kto.desirable.to(device)
        self.ref_kto = Reference("cached", model, out_dir=Path(workdir) / "kto", key_parts={"bench": "kto"},
                                 log=lambda m: None)
        self.ref_kto.prepare(lambda: [self.kto], len(examples))
        self.start = [p.detach().clone() for p in self.params]

    def reset(self):
        """Back to the starting adapter weights and a fresh optimizer state (for the loss check)."""
        with torch.no_grad():
            for p, s in zip(self.params, self.start):
                p.copy_(s)
        self.opt.state.clear()

    def _dpo_all_rows(self, row_logps):
        batch, labels, P = self.padded["concat"], self.labels["concat"], self.P
        pol = row_logps(self.model, batch, labels)  # (2P,): rows 0..P-1 chosen, P..2P-1 rejected
        with torch.no_grad(), lora.adapters_disabled(self.model):
            ref = row_logps(self.model, batch, labels)
        losses, _, _ = dpo_losses(pol[:P], pol[P:], ref[:P], ref[P:], DPO_CFG.beta, DPO_CFG.loss)
        return losses.mean()

    def _dpo_minift(self, layout, cached, unpadded=True):
        batch = (self.batches if unpadded else self.padded)[layout]
        policy = sequence_logps(self.model, batch)
        ref = self.ref_cached.logps(batch) if cached else self.ref_live.logps(batch)
        loss_sum, _ = dpo_loss_sums(policy, ref, DPO_CFG.beta, DPO_CFG.loss)
        return loss_sum / self.P

    def _pref(self, variant):
        if variant == "kto":
            policy = sequence_logps(self.model, self.kto)
            loss_sum, _ = kto_loss_sums(policy, self.ref_kto.logps(self.kto), self.kto.desirable, DPO_CFG.beta)
            return loss_sum / (2 * self.P)
        policy = sequence_logps(self.model, self.batches["shared-prompt"])
        loss_sum, _ = (simpo_loss_sums(policy, beta=2.0, gamma=0.5) if variant == "simpo" else
                       orpo_loss_sums(policy, orpo_lambda=0.1))  # minift's defaults
        return loss_sum / self.P

    def loss(self, variant):
        if variant in PREF:
            return self._pref(variant)
        if variant == "sft_naive":
            b, labels = self.padded["sft"], self.labels["sft"]
            return -full_logits_row_logps(self.model, b, labels).sum() / b.n_targets
        if variant == "sft":
            nll, n = sft_loss_sum(self.model, self.batches["sft"])
            return nll / n
        if variant == "dpo_naive":
            return self._dpo_all_rows(full_logits_row_logps)
        if variant == "dpo_fused":
            return self._dpo_all_rows(fused_all_row_logps)
        if variant == "dpo_completion":
            return self._dpo_minift("concat", cached=False, unpadded=False)
        if variant == "dpo_shared":
            return self._dpo_minift("shared-prompt", cached=False, unpadded=False)
        return self._dpo_minift("shared-prompt", cached=variant == "dpo_cached")

    def step(self, variant):
        if variant == "ref_pass":  # what Reference.prepare runs per batch: no backward, no optimizer
            return float(self.ref_cached.compute(self.batches["shared-prompt"]).sum())
        loss = self.loss(variant)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()

    def flops(self, variant, dims):
        b = self.kto if variant == "kto" else self.batches[
            "sft" if variant.startswith("sft") else
            "concat" if variant in ("dpo_naive", "dpo_fused", "dpo_completion") else "shared-prompt"]
        rows = b.ids.numel() if variant in ("sft_naive", "dpo_naive", "dpo_fused") else b.n_targets
        padded = variant in ("sft_naive", "dpo_naive", "dpo_fused", "dpo_completion", "dpo_shared")
        tokens = b.ids.numel() if padded else b.n_tokens  # slots computed: pads included or not
        train = common.pass_flops(dims, tokens, common.attn_pairs(b), rows, train=True)
        if variant == "ref_pass":
            return common.pass_flops(dims, tokens, common.attn_pairs(b), rows, train=False, lora_on=False)
        if variant.startswith("sft") or variant in REF_FREE + ("kto",):  # no reference forward in the step
            return train
        ref = common.pass_flops(dims, tokens, common.attn_pairs(b), rows, train=False, lora_on=False)
        return {k: train[k] + ref[k] for k in train}


def setup(args, shape):
    torch.manual_seed(args.seed)
    model, tok = minift.load(args.ckpt, dtype=args.dtype, device=args.device)
    model.train()
    lora.apply_lora(model, common.LORA["targets"], common.LORA["r"], common.LORA["alpha"], dropout=0.0)
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():  # B != 0: the policy differs from the reference, so the DPO losses are not all log 2
        for _, m in lora.lora_modules(model):
            w = m.lora_B["default"].weight
            w.copy_(0.02 * torch.randn(w.shape, generator=g))
    pairs = common.load_shape(shape, tok, args.pairs, args.smoke)
    work = tempfile.mkdtemp(prefix="bench_step_")
    return Bench(model, tok, pairs, args.device, work), model


def measure_memory(args):
    """Subprocess mode: peak memory of one step of each listed variant, printed as one JSON line."""
    bench, _ = setup(args, args.shape)
    peaks = {}
    for v in args.measure_memory.split(","):
        bench.step(v)  # warm-up: one-time buffers and the Adam state exist before the measurement
        with common.PeakMemory(args.device) as m:
            bench.step(v)
        peaks[v] = m.peak
    print(json.dumps(peaks))


def memory_in_subprocess(args, variants, shape):
    """{variant: peak bytes}. Full runs: one subprocess per variant. Smoke: one per shape, variants in turn
    (after malloc_trim each starts from what is left; close enough for a CI check, and 7x fewer model loads)."""
    groups = [variants] if args.smoke else [[v] for v in variants]
    peaks = {}
    for group in groups:
        cmd = [sys.executable, __file__, "--measure-memory", ",".join(group), "--shape", shape,
               "--pairs", str(args.pairs), "--device", args.device, "--seed", str(args.seed),
               "--threads", str(torch.get_num_threads())]
        cmd += (["--ckpt", str(args.ckpt)] if args.ckpt else []) + (["--smoke"] if args.smoke else [])
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **common.MALLOC_ENV})
        if out.returncode != 0:
            raise RuntimeError(f"memory subprocess for {group} failed:\n{out.stderr[-3000:]}")
        peaks.update(json.loads(out.stdout.strip().splitlines()[-1]))
    return peaks


def run_shape(args, shape, peak_flops):
    bench, model = setup(args, shape)
    dims = common.Dims.of(model.config, common.LORA["r"])
    times, losses = {v: [] for v in args.variants}, {}
    for r in range(1 + args.repeats):
        for v in args.variants:
            if r == 0:
                bench.reset()
            common.sync(args.device)
            t0 = time.perf_counter()
            loss = bench.step(v)
            common.sync(args.device)
            if r == 0:
                losses[v] = loss
            else:
                times[v].append(time.perf_counter() - t0)
    peaks = {} if args.no_memory else memory_in_subprocess(args, args.variants, shape)
    rows = []
    for v in args.variants:
        kind = "sft" if v.startswith("sft") else "dpo"
        t = statistics.median(times[v])
        fl = bench.flops(v, dims)
        rows.append({"variant": v, "what": VARIANTS[v], "step_s": t, "times_s": times[v],
                     "tokens_per_step": common.data_tokens(bench.pairs, kind),
                     "tokens_per_s": common.data_tokens(bench.pairs, kind) / t,
                     "flops": fl, "gflop": fl["total"] / 1e9, "mfu": fl["total"] / t / peak_flops, "loss": losses[v],
                     "peak_bytes": peaks.get(v)})
    by = {r["variant"]: r for r in rows}
    for r in rows:
        for base in ("sft_naive", "sft"):
            if base in by:
                r[f"ratio_vs_{base}"] = r["step_s"] / by[base]["step_s"]
                r[f"pred_vs_{base}"] = r["flops"]["total"] / by[base]["flops"]["total"]
        ref = by.get("sft_naive" if r["variant"].startswith("sft") else "dpo_naive")
        other = r["variant"] in ("ref_pass",) + PREF  # not a step of the naive loss's computation
        r["dloss_vs_naive"] = abs(r["loss"] - ref["loss"]) if ref and not other else None
    if {"dpo_cached", "ref_pass", "sft"} <= set(by):
        # The cache is built once per data set: over E epochs each step carries 1/E of a reference pass.
        c, once, sft = by["dpo_cached"]["step_s"], by["ref_pass"]["step_s"], by["sft"]["step_s"]
        by["dpo_cached"]["ratio_vs_sft_with_cache_build"] = {e: (c + once / e) / sft for e in (1, 3)}
    b = bench.batches
    info = {**common.shape_stats(bench.pairs), "sft_rows_x_T": list(b["sft"].ids.shape),
            "concat_rows_x_T": list(b["concat"].ids.shape), "shared_rows_x_T": list(b["shared-prompt"].ids.shape),
            "completion_rows": b["concat"].n_targets}
    return info, rows


def profile(args, variants):
    from torch.profiler import ProfilerActivity, profile as torch_profile

    bench, _ = setup(args, args.profile_shape)
    for v in variants:
        bench.step(v)  # warm-up
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with torch_profile(activities=acts) as prof:
            bench.step(v)
        key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
        print(f"\n=== profile: {v} ({args.profile_shape}), one step, top ops by self time ===")
        print(prof.key_averages().table(sort_by=key, row_limit=args.profile_rows, max_name_column_width=40))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", help="HF checkpoint dir (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--smoke", action="store_true", help="tiny random model, short rows, 1 repeat (CI)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--pairs", type=int, default=4, help="preference pairs per step (SFT: as many sequences)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per variant after the warm-up")
    p.add_argument("--shapes", default="clinical,balanced")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's; --smoke: 1, which is immune to "
                   "the stalls of OpenMP threads on a busy machine)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    p.add_argument("--profile", metavar="VARIANTS", help="profile one step of each (comma list) and exit")
    p.add_argument("--profile-shape", default="clinical")
    p.add_argument("--profile-rows", type=int, default=18)
    p.add_argument("--json", type=Path, help="default: bench/results/bench_step[_smoke].json")
    p.add_argument("--measure-memory", metavar="VARIANT", help=argparse.SUPPRESS)  # subprocess mode
    p.add_argument("--shape", default="clinical", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = torch.float32 if args.device == "cpu" else torch.bfloat16  # bf16 matmul is ~100x slower on CPU
    args.variants = [v for v in args.variants.split(",") if v]
    if bad := [v for v in args.variants if v not in VARIANTS]:
        p.error(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    args.threads = args.threads or (1 if args.smoke else None)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure_memory:
        return measure_memory(args)
    if args.smoke:
        args.repeats = 1
        if not args.ckpt:
            args.ckpt = common.tiny_checkpoint(Path(tempfile.mkdtemp(prefix="bench_tiny_")) / "ckpt")
    if args.profile:
        return profile(args, args.profile.split(","))
    peak = common.matmul_peak(args.device, args.dtype, n=256 if args.smoke else None)
    cond = common.conditions(args.device, args.dtype, model=str(args.ckpt or "SmolLM2-135M-Instruct (embedded)"),
                             pairs_per_step=args.pairs, repeats=args.repeats, lora=common.LORA,
                             matmul_peak_gflops=peak / 1e9, memory_method=common.MEMORY_METHOD,
                             flop_model=common.FLOP_MODEL)
    results = {}
    for shape in args.shapes.split(","):
        info, rows = run_shape(args, shape, peak)
        results[shape] = {"data": info, "rows": rows}
    cond["load_avg_1m_at_end"] = os.getloadavg()[0]
    # the peak measured again after the run; the higher one counts, and MFU is recomputed against it
    end_peak = common.matmul_peak(args.device, args.dtype, n=256 if args.smoke else None)
    cond["matmul_peak_gflops_start_end"] = [peak / 1e9, end_peak / 1e9]
    if end_peak > peak:
        cond["matmul_peak_gflops"] = end_peak / 1e9
        for res in results.values():
            for r in res["rows"]:
                r["mfu"] = r["flops"]["total"] / r["step_s"] / end_peak
    import report

    report.print_step(cond, results)
    out = common.write_json("bench_step", args.smoke, {"conditions": cond, "results": results}, args.json)
    png = report.chart_step(results, out.with_suffix(".png"))
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
