"""What every training run does around its recipe: seed and load the model, read and split the data, attach
LoRA, and save the adapter at the end. recipes.py (SFT, DPO) and pref_recipes.py (SimPO, ORPO, KTO) share it."""
import json
from pathlib import Path

import torch

from minift.defaults import DEFAULT_MODEL_HUB_ID, pick_device, pick_dtype
from minift.model import lora
from minift.model.checkpoint import load
from minift.train import distributed
from minift.train.data import split_eval
from minift.train.trainer import console


def setup(cfg):
    """Seed, then load the model for the configured device and dtype."""
    torch.manual_seed(cfg.seed)
    d = distributed.current()  # torchrun: this rank's place (run_sft / run_dpo joined the group); else one process
    console.quiet = not d.main  # rank 0 alone prints and draws the progress bar
    device = d.device if d.on else pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    if cfg.ckpt is None and d.on:  # the embedded model is fetched and converted once, by rank 0
        if d.main:
            from minift.model.fetch import default_checkpoint

            default_checkpoint()
        distributed.barrier()
    # FSDP: a shell without weights; distributed.wrap fills each rank's shards after LoRA is attached.
    model, tok = load(cfg.ckpt, dtype=dtype, device=device, shell=d.parallel == "fsdp")
    model.gradient_checkpointing = cfg.gradient_checkpointing
    return model, tok, device


def split(cfg, reader, tok, splitter=split_eval):
    """(data path, train, eval) examples: --eval-data when given, else --eval-fraction of --data."""
    data = Path(cfg.data) if cfg.data else cfg.default_data()
    stats = {}
    examples = reader(data, tok, cfg.max_length, cfg.skip_bad_rows, stats)
    if cfg.eval_data:
        held = reader(cfg.eval_data, tok, cfg.max_length, cfg.skip_bad_rows)
    else:
        examples, held = splitter(examples, cfg.eval_fraction, cfg.seed)
    counts = ", ".join(f"{k} {v}" for k, v in stats.items())
    console.print(f"data: {data} -> {len(examples)} train / {len(held)} eval examples ({counts})")
    return data, examples, held


def attach_lora(cfg, model, keep_reference=False):
    """Train --adapter further (with a frozen copy as the reference when the loss needs one), or a fresh LoRA."""
    if cfg.adapter:  # (SFT continued, or a preference run from the SFT adapter)
        lora.load_adapter(model, cfg.adapter, trainable=True)
        if keep_reference:
            lora.add_adapter_copy(model, "default", "reference")
    else:
        lora.apply_lora(model, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.rslora)
    console.print(lora.lora_summary(model))


def finish(cfg, model, tok, ckpt_name):
    out, d = Path(cfg.out), distributed.current()
    lora_params = [n for n, _ in model.named_parameters() if "lora_" in n]
    with distributed.gathered(model, lora_params):  # FSDP: every rank gathers the adapter, rank 0 writes it
        if d.main:
            (out / "run_config.json").write_text(json.dumps(vars(cfg), indent=2, default=str))
            lora.save_adapter(model, out, base_model_name_or_path=ckpt_name)
            if cfg.merge:
                lora.save_merged(model, tok, out / "merged")
    console.print(f"saved adapter to {out}" + (f" and merged model to {out / 'merged'}" if cfg.merge else ""))


def ckpt_dir(cfg):
    if cfg.ckpt:
        return Path(cfg.ckpt)
    from minift.model.fetch import default_checkpoint

    return default_checkpoint()


def ckpt_name(cfg):
    return str(cfg.ckpt) if cfg.ckpt else DEFAULT_MODEL_HUB_ID
