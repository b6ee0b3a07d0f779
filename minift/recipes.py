"""SFT and DPO runs: load the model, attach LoRA, read the data, pick the reference, and hand a recipe to the
Trainer. `run_sft(cfg)` and `run_dpo(cfg)` are what train_sft.py and train_dpo.py call."""
import json
from pathlib import Path

import torch

from minift import distributed, lora
from minift.batching import dpo_batch, sft_batch
from minift.checkpoint import load
from minift.defaults import DEFAULT_MODEL_HUB_ID, pick_device, pick_dtype
from minift.data import read_preferences, read_sft, split_eval
from minift.losses import REFERENCE_FREE, UNPAIRED, dpo_loss_sums, sequence_logps, sft_loss_sum
from minift.reference import Reference, key_parts
from minift.trainer import Trainer, console


class SFTRecipe:
    """Examples are SFTExample; the loss is a mean over the step's target tokens."""
    name = "sft"
    progress_keys = ("loss", "eval/loss")
    plot_keys = ("loss",)

    def __init__(self, pad_id, device):
        self.pad_id, self.device = pad_id, device

    def count(self, examples):
        return sum(ex.n_targets for ex in examples)  # target tokens: what the loss is a mean over

    def make_batch(self, examples):
        return sft_batch(examples, self.pad_id).to(self.device)

    def loss_sums(self, model, batch):
        loss_sum, _ = sft_loss_sum(model, batch)
        return loss_sum, {}


class DPORecipe:
    """Examples are (index, PrefExample): the index finds a pair's row in a cached reference table. The loss
    is a mean over the step's pairs."""
    name = "dpo"
    progress_keys = ("loss", "rewards/accuracies", "eval/rewards/accuracies", "eval/rewards/margins")
    plot_keys = ("loss", "rewards/accuracies", "rewards/margins")

    def __init__(self, reference, layout, pad_id, device, **loss_args):
        self.reference, self.layout, self.pad_id, self.device = reference, layout, pad_id, device
        self.loss_args = loss_args  # beta, loss_type, label_smoothing, sft_weight (losses.dpo_loss_sums)

    def count(self, indexed):
        return len(indexed)

    def make_batch(self, indexed, keep=True):
        batch = dpo_batch([ex for _, ex in indexed], self.layout, self.pad_id).to(self.device)
        # keep=False: a repeated chunk that only keeps the ranks' forwards in step; its rows are not stored
        batch.index = [i for i, _ in indexed] if keep else []
        return batch

    def loss_sums(self, model, batch):
        policy = sequence_logps(model, batch)  # policy forward: per-sequence log-probs, with gradient
        ref_logps = self.reference.logps(batch)  # reference: a cached table lookup, or a no-grad forward
        return dpo_loss_sums(policy, ref_logps, **self.loss_args)  # the trainer then calls backward


def setup(cfg):
    """Seed, then load the model for the configured device and dtype."""
    torch.manual_seed(cfg.seed)
    d = distributed.current()  # torchrun: this rank's place (run_sft / run_dpo joined the group); else one process
    console.quiet = not d.main  # rank 0 alone prints and draws the progress bar
    device = d.device if d.on else pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    if cfg.ckpt is None and d.on:  # the embedded model is fetched and converted once, by rank 0
        if d.main:
            from minift.fetch import default_checkpoint

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


def attach_lora(cfg, model):
    lora.apply_lora(model, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.rslora)


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
    from minift.fetch import default_checkpoint

    return default_checkpoint()


def ckpt_name(cfg):
    return str(cfg.ckpt) if cfg.ckpt else DEFAULT_MODEL_HUB_ID


@distributed.entry  # torchrun: joins the process group first, leaves it after the run
def run_sft(cfg):
    model, tok, device = setup(cfg)
    _, train, held = split(cfg, read_sft, tok)
    attach_lora(cfg, model)
    console.print(lora.lora_summary(model))
    wrapped = distributed.wrap(model, ckpt_dir(cfg))  # torchrun: DDP or FSDP2; else the model itself
    Trainer(cfg, wrapped, SFTRecipe(tok.pad_id, device), train, held, cfg.out).fit()
    finish(cfg, model, tok, ckpt_name(cfg))


@distributed.entry
def run_dpo(cfg):
    if cfg.loss in REFERENCE_FREE + UNPAIRED:  # simpo, orpo, kto: minift/pref_recipes.py
        from minift.pref_recipes import run_pref

        return run_pref(cfg)
    model, tok, device = setup(cfg)
    data, train, held = split(cfg, read_preferences, tok)
    if cfg.adapter:
        # DPO after SFT: train the SFT adapter further; a frozen copy of it is the reference.
        lora.load_adapter(model, cfg.adapter, trainable=True)
        lora.add_adapter_copy(model, "default", "reference")
    else:
        attach_lora(cfg, model)
    console.print(lora.lora_summary(model))
    wrapped = distributed.wrap(model, ckpt_dir(cfg))  # torchrun: DDP or FSDP2; else the model itself
    parts = key_parts(data, ckpt_dir(cfg), max_length=cfg.max_length, eval_data=cfg.eval_data,
                      eval_fraction=cfg.eval_fraction, seed=cfg.seed, layout="any")
    reference = Reference(cfg.ref, model, out_dir=cfg.out, key_parts=parts)
    recipe = DPORecipe(reference, cfg.layout, tok.pad_id, device, beta=cfg.beta, loss_type=cfg.loss,
                       label_smoothing=cfg.label_smoothing, sft_weight=cfg.sft_weight)
    # Train and eval pairs share one index space: the cached table has a row for each.
    indexed = list(enumerate(train + held))
    train_ix, held_ix = indexed[:len(train)], indexed[len(train):]
    if cfg.ref == "cached":  # each rank computes its share of the table; prepare() gathers it
        chunks = distributed.balanced_chunks(indexed, cfg.batch_size)
        reference.prepare(lambda: (recipe.make_batch(c, keep=real) for c, real in chunks),
                          len(indexed))
    Trainer(cfg, wrapped, recipe, train_ix, held_ix, cfg.out).fit()
    finish(cfg, model, tok, ckpt_name(cfg))
