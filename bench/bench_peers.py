"""minift vs TRL + PEFT + transformers on the same work: model, data, LoRA, batch, lengths and starting adapter.

Runs (each trains --repeats + 1 steps on the same batch of --pairs clinical pairs; step 0 is the warm-up):
  trl_sft        trl.SFTTrainer with a peft LoraConfig (completion-only loss), transformers' Llama (SDPA attention)
  minift_sft     minift.train.trainer.Trainer + SFTRecipe (fused log-probs on the completion rows)
  trl_dpo        trl.DPOTrainer with the LoraConfig: reference = the same model with the adapter disabled, computed
                 in each step (TRL's default with PEFT and no ref_model)
  minift_dpo     minift.train.trainer.Trainer + DPORecipe, shared-prompt layout, reference with the adapters off computed
                 in each step (--ref adapters-off: the same reference TRL computes)
  minift_dpo_cached   minift's default: the reference log-probs computed once before training (--ref cached)
Each run goes once per --checkpointing setting, the same on both sides: "off" (every activation kept) and "on"
(gradient checkpointing: each block's input kept, its inside recomputed in backward; run keys end in _gc). TRL 1.x
turns it on by default (SFTConfig / DPOConfig gradient_checkpointing=True) and minift leaves it off, so the
settings are always set explicitly and a run is only compared with its peer under the same setting.
Both sides drive their own trainers (not a hand-written loop): TRL's Trainer through `train()`, timed from
on_step_begin to on_step_end (forward, backward, clipping, AdamW, scheduler; the batch is collated before),
minift's through `Trainer.run_step()` (which also builds the batch and, for DPO, the live reference).
Equal work: both start from the same adapter (minift initialises it, B random so that the policy is not the
reference, and saves it in PEFT format; set_peft_model_state_dict puts it into the model TRL wrapped), get the
same token ids (TRL receives pre-tokenized rows; its DPO dataset step is bypassed because TRL 1.x always
tokenizes text there), LoRA dropout 0, and the same optimizer (torch AdamW, lr 1e-4, clip 1.0, no weight
decay; the learning-rate schedules differ, which changes no step's cost). The step-0 losses must agree.

    python bench/bench_peers.py            # SmolLM2-135M-Instruct, 4 clinical pairs, a process per run
    python bench/bench_peers.py --smoke    # tiny random model, in one process (CI)
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the checkout on sys.path)

RUNS = ("trl_sft", "minift_sft", "trl_dpo", "minift_dpo", "minift_dpo_cached")
NAMES = {"trl_sft": "TRL SFT", "minift_sft": "minift SFT", "trl_dpo": "TRL DPO",
         "minift_dpo": "minift DPO, live ref (--ref adapters-off)", "minift_dpo_cached": "minift DPO (default: cached ref)"}
LR = 1e-4


def trl_missing():
    try:
        import datasets  # noqa: F401
        import peft  # noqa: F401
        import trl  # noqa: F401
    except ImportError as e:
        return f"TRL + PEFT not installed ({e.name}); pip install trl peft to compare"
    return None


def prepare(args, work):
    """The shared starting point: pairs and an adapter dir both sides load. Returns (pairs, adapter_dir)."""
    import minift
    from minift.model import lora

    torch.manual_seed(args.seed)
    model, tok = minift.load(args.ckpt, dtype=args.dtype, device="cpu")
    lora.apply_lora(model, common.LORA["targets"], common.LORA["r"], common.LORA["alpha"], dropout=0.0)
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():  # B != 0: policy != reference, so the DPO loss is not log 2 on both sides by construction
        for _, m in lora.lora_modules(model):
            m.lora_B["default"].weight.copy_(0.02 * torch.randn(m.lora_B["default"].weight.shape, generator=g))
    adapter = lora.save_adapter(model, Path(work) / "start_adapter")
    pairs = common.clinical_pairs(tok, args.pairs, seed=args.seed, smoke=args.smoke)
    return pairs, adapter


class StepTimer:
    """A transformers TrainerCallback (built lazily: transformers is imported only when TRL runs)."""

    def __new__(cls, device):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.times, self.memory = [], common.PeakMemory(device)

            def on_step_begin(self, *a, **k):
                common.sync(device)
                self.t0 = time.perf_counter()

            def on_step_end(self, *a, **k):
                common.sync(device)
                self.times.append(time.perf_counter() - self.t0)
                if len(self.times) == 1:
                    self.memory.start()  # after the warm-up step, as for minift

        return _Timer()


def trl_run(kind, args, pairs, adapter, work, ckpt_on):
    """(step times, step-0 loss, peak bytes) of TRL's trainer on the PEFT model."""
    from datasets import Dataset
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    ckpt = args.ckpt or __import__("minift.model.fetch", fromlist=["x"]).default_checkpoint()
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=args.dtype).to(args.device)
    # A fresh adapter through peft_config (TRL's reference is then the base, adapters disabled, as minift's
    # default); a PeftModel with a loaded adapter would make TRL copy it as a frozen "ref" adapter instead.
    peft_config = LoraConfig(r=common.LORA["r"], lora_alpha=common.LORA["alpha"], lora_dropout=0.0,
                             target_modules="all-linear", task_type="CAUSAL_LM")
    common_args = dict(output_dir=str(Path(work) / f"trl_{kind}"), per_device_train_batch_size=len(pairs),
                       max_steps=args.repeats + 1, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                       weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", logging_steps=10_000,
                       save_strategy="no", report_to="none", disable_tqdm=True, seed=args.seed,
                       dataloader_num_workers=0, use_cpu=args.device == "cpu", bf16=args.device == "cuda",
                       max_length=None, gradient_checkpointing=ckpt_on)
    losses = []
    timer = StepTimer(args.device)
    if kind == "sft":
        rows = [{"input_ids": p.prompt_ids + p.chosen_ids,
                 "completion_mask": [0] * len(p.prompt_ids) + [1] * len(p.chosen_ids)} for p in pairs]

        class Trainer(SFTTrainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                losses.append(float((out[0] if return_outputs else out).detach()))
                return out

        trainer = Trainer(model=model, args=SFTConfig(**common_args, completion_only_loss=True),
                          train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[timer],
                          peft_config=peft_config)
    else:
        rows = [{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids}
                for p in pairs]

        class Trainer(DPOTrainer):
            def _prepare_dataset(self, dataset, *a, **k):
                return dataset  # already the token ids TRL's own tokenization produces ({prompt,chosen,rejected}_ids)

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                losses.append(float((out[0] if return_outputs else out).detach()))
                return out

        trainer = Trainer(model=model, args=DPOConfig(**common_args, beta=0.1),
                          train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[timer],
                          peft_config=peft_config)
    # the starting adapter minift saved (PEFT format): the same weights on both sides
    loaded = set_peft_model_state_dict(trainer.model, load_file(str(Path(adapter) / "adapter_model.safetensors")))
    if loaded.unexpected_keys:
        raise RuntimeError(f"adapter keys PEFT did not place: {loaded.unexpected_keys[:3]} ...")
    trainer.train()
    return timer.times, losses[0], timer.memory.stop()


def minift_run(kind, args, pairs, adapter, work, ckpt_on):
    """The same through minift's Trainer.run_step."""
    import minift
    from minift.model import lora
    from minift.train.recipes import DPORecipe, SFTRecipe
    from minift.train.reference import Reference
    from minift.train.train_config import DPOConfig, TrainConfig
    from minift.train.trainer import Trainer

    model, tok = minift.load(args.ckpt, dtype=args.dtype, device=args.device)
    lora.load_adapter(model, adapter, trainable=True)
    model.gradient_checkpointing = ckpt_on
    shared = dict(gradient_checkpointing=ckpt_on, out=str(Path(work) / f"minift_{kind}"), batch_size=len(pairs), max_steps=args.repeats + 1, lr=LR,
                  warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, lora_dropout=0.0, eval_every=0,
                  save_every=0, progress=False)
    if kind == "sft":
        cfg = TrainConfig(**shared)
        recipe, examples = SFTRecipe(tok.pad_id, args.device), common.sft_from_pairs(pairs)
    else:
        cfg = DPOConfig(**shared, beta=0.1, loss="sigmoid", layout="shared-prompt",
                        ref="cached" if kind == "dpo_cached" else "adapters-off")
        ref = Reference(cfg.ref, model, out_dir=cfg.out, key_parts={"bench": "peers"}, log=lambda m: None)
        recipe = DPORecipe(ref, cfg.layout, tok.pad_id, args.device, beta=cfg.beta, loss_type=cfg.loss)
        examples = list(enumerate(pairs))
        if kind == "dpo_cached":  # before training, outside the timed steps (as train_dpo.py does)
            ref.prepare(lambda: [recipe.make_batch(examples)], len(pairs))
    trainer = Trainer(cfg, model, recipe, examples, [], cfg.out)
    times, losses, mem = [], [], common.PeakMemory(args.device)
    for _ in range(cfg.max_steps):
        common.sync(args.device)
        t0 = time.perf_counter()
        out = trainer.run_step()
        common.sync(args.device)
        times.append(time.perf_counter() - t0)
        losses.append(out["loss"])
        if len(times) == 1:
            mem.start()  # after the warm-up step, as for TRL
    return times, losses[0], mem.stop()


def split_key(key):
    """'minift_dpo_cached_gc' -> ('minift_dpo_cached', True): the run and its checkpointing setting."""
    return (key[:-3], True) if key.endswith("_gc") else (key, False)


def one_run(key, args, pairs, adapter, work):
    run, ckpt_on = split_key(key)
    side, kind = run.split("_", 1)
    fn = trl_run if side == "trl" else minift_run
    times, loss0, peak = fn(kind, args, pairs, adapter, work, ckpt_on)
    timed = times[1:] or times  # step 0 is the warm-up
    step = statistics.median(timed)
    n_tok = common.data_tokens(pairs, "sft" if kind == "sft" else "dpo")
    return {"run": NAMES[run] + (", grad ckpt" if ckpt_on else ""), "key": key, "checkpointing": ckpt_on,
            "times_s": times, "step_s": step, "steps_per_s": 1 / step,
            "tokens_per_step": n_tok, "tokens_per_s": n_tok / step, "loss0": loss0, "peak_bytes": peak}


def subprocess_run(run, args, work, repeats, env=None):
    cmd = [sys.executable, __file__, "--one", run, "--work", work, "--pairs", str(args.pairs), "--device",
           args.device, "--repeats", str(repeats), "--seed", str(args.seed),
           "--threads", str(torch.get_num_threads())] + (["--ckpt", str(args.ckpt)] if args.ckpt else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if out.returncode != 0:
        raise RuntimeError(f"{run} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", help="HF checkpoint dir (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--smoke", action="store_true", help="tiny random model, 1 timed step, one process (CI)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="timed steps after the warm-up step")
    p.add_argument("--runs", default=",".join(RUNS))
    p.add_argument("--checkpointing", default="off,on", help="gradient checkpointing settings to run, both sides "
                   "alike: off, on, or off,on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's; --smoke: 1)")
    p.add_argument("--json", type=Path, help="default: bench/results/bench_peers[_smoke].json")
    p.add_argument("--one", metavar="RUN", help=argparse.SUPPRESS)  # subprocess mode: one run, JSON on stdout
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    args.threads = args.threads or (1 if args.smoke else None)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.repeats = 1
        if not args.ckpt and not args.one:
            args.ckpt = common.tiny_checkpoint(Path(tempfile.mkdtemp(prefix="bench_tiny_")) / "ckpt")
    if args.one:
        pairs, adapter = prepare(args, args.work)
        print(json.dumps(one_run(args.one, args, pairs, adapter, args.work)))
        return
    modes = [m for m in args.checkpointing.split(",") if m]
    if bad := [m for m in modes if m not in ("off", "on")]:
        p.error(f"--checkpointing takes off and/or on, got {bad}")
    runs = [r + ("_gc" if m == "on" else "") for m in modes for r in args.runs.split(",") if r]
    missing = trl_missing()
    work = tempfile.mkdtemp(prefix="bench_peers_")
    pairs, adapter = prepare(args, work)
    rows = []
    for run in runs:
        if run.startswith("trl") and missing:
            rows.append({"run": NAMES[split_key(run)[0]], "key": run, "skipped": missing})
            continue
        if args.smoke:  # one process: imports once (memory then measured after the earlier runs, close enough)
            rows.append(one_run(run, args, pairs, adapter, work))
            continue
        # Timing and memory in separate processes: the allocator setting that makes RSS exact costs page faults
        row = subprocess_run(run, args, work, repeats=args.repeats)
        row["peak_bytes"] = subprocess_run(run, args, work, repeats=1, env=common.MALLOC_ENV)["peak_bytes"]
        rows.append(row)
    by = {r["key"]: r for r in rows if not r.get("skipped")}
    for r in rows:
        run, ckpt_on = split_key(r["key"])
        trl = by.get(("trl_sft" if run.endswith("sft") else "trl_dpo") + ("_gc" if ckpt_on else ""))
        if r.get("skipped") or trl is None:
            continue
        r["dloss_vs_trl"] = abs(r["loss0"] - trl["loss0"])
        r["speed_vs_trl"] = r["tokens_per_s"] / trl["tokens_per_s"]
        r["memory_vs_trl"] = r["peak_bytes"] / trl["peak_bytes"] if trl["peak_bytes"] > 0 else None
    cond = common.conditions(args.device, args.dtype, model=str(args.ckpt or "SmolLM2-135M-Instruct (embedded)"),
                             pairs_per_step=args.pairs, data=common.shape_stats(pairs), repeats=args.repeats,
                             lora=common.LORA, memory_method=common.MEMORY_METHOD)
    import report

    report.print_peers(cond, rows)
    for r in rows:
        if r.get("skipped"):
            print(f"skipped {r['run']}: {r['skipped']}")
    out = common.write_json("bench_peers", args.smoke, {"conditions": cond, "results": rows}, args.json)
    png = report.chart_peers(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
