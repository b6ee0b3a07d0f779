"""SFT and DPO runs: load the model, attach LoRA, read the data, pick the reference, and hand a recipe to the
Trainer. `run_sft(cfg)` and `run_dpo(cfg)` are what train_sft.py and train_dpo.py call."""
from minift.train import distributed

from minift.model import lora
from minift.train.batching import dpo_batch, sft_batch
from minift.train.data import drop_shared_tail, read_preferences, read_sft
from minift.train.launch import attach_lora, ckpt_dir, ckpt_name, finish, setup, split
from minift.train.losses import REFERENCE_FREE, UNPAIRED, dpo_loss_sums, sequence_logps, sft_loss_sum
from minift.train.reference import Reference, key_parts
from minift.train.trainer import Trainer, console


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
        self.loss_args = loss_args  # beta, loss_type, label_smoothing, sft_weight, dpop_lambda (losses.dpo_loss_sums)

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


@distributed.entry  # torchrun: joins the process group first, leaves it after the run
def run_sft(cfg):
    model, tok, device = setup(cfg)
    _, train, held = split(cfg, read_sft, tok)
    attach_lora(cfg, model)
    wrapped = distributed.wrap(model, ckpt_dir(cfg))  # torchrun: DDP or FSDP2; else the model itself
    Trainer(cfg, wrapped, SFTRecipe(tok.pad_id, device), train, held, cfg.out).fit()
    finish(cfg, model, tok, ckpt_name(cfg))


@distributed.entry
def run_dpo(cfg):
    if cfg.loss in REFERENCE_FREE + UNPAIRED:  # simpo, orpo, kto: minift/train/pref_recipes.py
        from minift.train.pref_recipes import run_pref

        return run_pref(cfg)
    model, tok, device = setup(cfg)
    data, train, held = split(cfg, read_preferences, tok)
    if cfg.drop_shared_tail:  # each pair scored on the span where its answers differ
        train, held = [drop_shared_tail(e) for e in train], [drop_shared_tail(e) for e in held]
    attach_lora(cfg, model, keep_reference=True)  # after SFT: a frozen copy of the SFT adapter is the reference
    wrapped = distributed.wrap(model, ckpt_dir(cfg))  # torchrun: DDP or FSDP2; else the model itself
    parts = key_parts(data, ckpt_dir(cfg), max_length=cfg.max_length, eval_data=cfg.eval_data,
                      eval_fraction=cfg.eval_fraction, seed=cfg.seed, layout="any",
                      drop_shared_tail=cfg.drop_shared_tail)
    reference = Reference(cfg.ref, model, out_dir=cfg.out, key_parts=parts)
    recipe = DPORecipe(reference, cfg.layout, tok.pad_id, device, beta=cfg.beta, loss_type=cfg.loss,
                       label_smoothing=cfg.label_smoothing, sft_weight=cfg.sft_weight,
                       dpop_lambda=cfg.dpop_lambda)
    # Train and eval pairs share one index space: the cached table has a row for each.
    indexed = list(enumerate(train + held))
    train_ix, held_ix = indexed[:len(train)], indexed[len(train):]
    if cfg.ref == "cached":  # each rank computes its share of the table; prepare() gathers it
        chunks = distributed.balanced_chunks(indexed, cfg.batch_size)
        reference.prepare(lambda: (recipe.make_batch(c, keep=real) for c, real in chunks),
                          len(indexed))
    Trainer(cfg, wrapped, recipe, train_ix, held_ix, cfg.out).fit()
    finish(cfg, model, tok, ckpt_name(cfg))
