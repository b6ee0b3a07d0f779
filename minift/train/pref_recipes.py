"""SimPO, ORPO and KTO runs (train_dpo.py --loss simpo|orpo|kto): the same model, LoRA, data and trainer as DPO,
with the losses of minift/train/pref_losses.py.

SimPO and ORPO score a pair from the policy alone: no reference model, no reference pass (cached or live), and
no frozen copy of --adapter. ORPO adds the chosen completion's NLL, so it can start from the base model (no
--adapter): preference tuning and SFT in one stage. KTO reads unpaired rows (or pairs, each made into one
desirable and one undesirable row, minift/train/unpaired.py) and uses the reference strategies of DPO: a cached
table by default, one row per example holding the reference log-probs of (x, y) and of its KL sequence (x, y').
"""
from pathlib import Path

from minift.train import distributed

from minift.model import lora
from minift.train.batching import dpo_batch
from minift.train.data import read_preferences
from minift.train.losses import REFERENCE_FREE, sequence_logps
from minift.train.pref_losses import kto_loss_sums, orpo_loss_sums, simpo_loss_sums
from minift.train.launch import attach_lora, ckpt_dir, ckpt_name, finish, setup, split
from minift.train.reference import Reference, key_parts
from minift.train.trainer import Trainer, console
from minift.train.unpaired import check_labels, kto_batch, read_unpaired, split_unpaired


class RefFreeRecipe:
    """SimPO / ORPO. Examples are PrefExample; the loss is a mean over the step's pairs."""
    progress_keys = ("loss", "rewards/accuracies", "eval/rewards/accuracies", "eval/rewards/margins")
    plot_keys = ("loss", "rewards/accuracies", "rewards/margins")

    def __init__(self, loss, layout, pad_id, device, **loss_args):
        self.name, self.layout, self.pad_id, self.device = loss, layout, pad_id, device
        self.loss_fn = {"simpo": simpo_loss_sums, "orpo": orpo_loss_sums}[loss]
        self.loss_args = loss_args  # simpo: beta, gamma, label_smoothing, sft_weight; orpo: orpo_lambda

    def count(self, pairs):
        return len(pairs)

    def make_batch(self, pairs):
        return dpo_batch(pairs, self.layout, self.pad_id).to(self.device)

    def loss_sums(self, model, batch):
        policy = sequence_logps(model, batch)  # policy forward: the only forward of the step
        return self.loss_fn(policy, **self.loss_args)  # the trainer then calls backward


class KTORecipe:
    """Examples are (index, KTOExample): the index finds an example's row in a cached reference table. The loss
    is a mean over the step's examples."""
    name = "kto"
    progress_keys = ("loss", "kl", "eval/rewards/margins")
    plot_keys = ("loss", "rewards/margins", "kl")

    def __init__(self, reference, layout, pad_id, device, **loss_args):
        self.reference, self.layout, self.pad_id, self.device = reference, layout, pad_id, device
        self.loss_args = loss_args  # beta, desirable_weight, undesirable_weight

    def count(self, indexed):
        return len(indexed)

    def make_batch(self, indexed, keep=True):
        cpu = kto_batch([ex for _, ex in indexed], self.layout, self.pad_id)
        batch = cpu.to(self.device)
        # keep=False (torchrun): a repeated chunk that only keeps the ranks' forwards in step; its rows not stored
        batch.index = [i for i, _ in indexed] if keep else []
        batch.desirable = cpu.desirable.to(self.device)
        return batch

    def loss_sums(self, model, batch):
        policy = sequence_logps(model, batch)  # policy forward: (x, y) and (x, y') of each example
        ref_logps = self.reference.logps(batch)  # reference: a cached table lookup, or a no-grad forward
        return kto_loss_sums(policy, ref_logps, batch.desirable, **self.loss_args)


def run_ref_free(cfg):
    model, tok, device = setup(cfg)
    _, train, held = split(cfg, read_preferences, tok)
    attach_lora(cfg, model)
    console.print(f"{cfg.loss}: no reference model, no reference pass (--ref is not used)")
    args = (dict(beta=cfg.beta, gamma=cfg.gamma, label_smoothing=cfg.label_smoothing, sft_weight=cfg.sft_weight)
            if cfg.loss == "simpo" else dict(orpo_lambda=cfg.orpo_lambda))
    recipe = RefFreeRecipe(cfg.loss, cfg.layout, tok.pad_id, device, **args)
    wrapped = distributed.wrap(model, ckpt_dir(cfg))  # torchrun: DDP or FSDP2; else the model itself
    Trainer(cfg, wrapped, recipe, train, held, cfg.out).fit()
    finish(cfg, model, tok, ckpt_name(cfg))


def run_kto(cfg):
    model, tok, device = setup(cfg)
    data, train, held = split(cfg, read_unpaired, tok, split_unpaired)
    if not cfg.eval_data:
        check_labels(train, f"{data} (training part)")
    n_good = sum(e.desirable for e in train)
    console.print(f"kto: {n_good} desirable, {len(train) - n_good} undesirable training examples")
    attach_lora(cfg, model, keep_reference=True)
    wrapped = distributed.wrap(model, ckpt_dir(cfg))  # torchrun: DDP or FSDP2; else the model itself
    parts = key_parts(data, ckpt_dir(cfg), max_length=cfg.max_length, eval_data=cfg.eval_data,
                      eval_fraction=cfg.eval_fraction, seed=cfg.seed, layout="any", method="kto")
    reference = Reference(cfg.ref, model, out_dir=cfg.out, key_parts=parts)
    recipe = KTORecipe(reference, cfg.layout, tok.pad_id, device, beta=cfg.beta,
                       desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight)
    # Train and eval examples share one index space: the cached table has a row for each.
    indexed = list(enumerate(train + held))
    train_ix, held_ix = indexed[:len(train)], indexed[len(train):]
    if cfg.ref == "cached":  # torchrun: each rank computes its share of the table; prepare() gathers it
        chunks = distributed.balanced_chunks(indexed, cfg.batch_size)
        reference.prepare(lambda: (recipe.make_batch(c, keep=real) for c, real in chunks), len(indexed))
    Trainer(cfg, wrapped, recipe, train_ix, held_ix, cfg.out).fit()
    finish(cfg, model, tok, ckpt_name(cfg))


def run_pref(cfg):
    """train_dpo.py --loss simpo|orpo|kto."""
    return run_ref_free(cfg) if cfg.loss in REFERENCE_FREE else run_kto(cfg)
