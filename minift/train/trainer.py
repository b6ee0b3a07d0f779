"""The training loop shared by SFT and DPO: AdamW, warmup + cosine, gradient accumulation, clipping, eval,
atomic checkpoints with exact resume, a NaN guard, a rich progress bar and `metrics.jsonl`.

A recipe (minift/train/recipes.py) supplies the work per micro-batch:
    recipe.count(examples) -> int       what the loss is a mean over (target tokens for SFT, pairs for DPO)
    recipe.make_batch(examples) -> batch
    recipe.loss_sums(model, batch) -> (loss_sum, {metric: sum})   summed, not averaged, over the micro-batch
The loop divides every sum by the whole step's count, so 1 micro-batch of 8 and 4 of 2 give the same gradient.
The count comes from the examples, so each micro-batch is built just before its forward and freed after its
backward: one micro-batch is alive at a time, and peak memory does not grow with --grad-accum.
"""
import json
import math
import os
import random
import signal
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from minift.train import distributed
from minift.errors import MinifTError

console = Console(stderr=True)


def lr_at(step, base_lr, warmup, total, min_ratio=0.1):
    """Linear warmup from 0 over `warmup` steps, then cosine decay to min_ratio * base_lr at `total`."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def epoch_order(n, seed, epoch):
    """The example order of one epoch: a permutation fixed by (seed, epoch), so a resumed run sees the same."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def step_examples(examples, step, per_step, seed):
    """The examples of optimizer step `step` (epochs wrap around; the last partial batch of an epoch is dropped)."""
    steps_per_epoch = max(1, len(examples) // per_step)
    epoch, k = divmod(step, steps_per_epoch)
    order = epoch_order(len(examples), seed, epoch)
    return [examples[i] for i in order[k * per_step:(k + 1) * per_step]]


def atomic_save(obj, path: Path):
    """torch.save to a temporary file, then rename: a kill mid-write never leaves a half checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


# Everything in a checkpoint is a tensor or a plain container (dicts, lists, tuples of ints and floats: the
# Python RNG state is one), so it loads with weights_only=True: a file that holds anything else is refused
# before any of it runs, the reason torch changed its default (a pickle can run code when it is read).
CHECKPOINT_FORMAT = "minift-checkpoint-2"


def read_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:  # damaged, or objects other than tensors and plain values: nothing of it is run
        raise MinifTError(f"{path}: not a minift checkpoint (damaged, or it holds objects other than tensors "
                          f"and plain values: {type(e).__name__}), refused unread; delete it or start a fresh "
                          "--out") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise MinifTError(f"{path}: not a checkpoint of this minift version (format "
                          f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r}); "
                          "delete it to train again from the start, or start a fresh --out")
    return state


class Trainer:
    def __init__(self, cfg, model, recipe, train_examples, eval_examples, out_dir):
        self.cfg, self.model, self.recipe = cfg, model, recipe  # model: DDP / FSDP under torchrun
        self.train_examples, self.eval_examples = train_examples, eval_examples
        self.dist, self.raw = distributed.current(), distributed.unwrap(model)
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.params = {n: p for n, p in self.raw.named_parameters() if p.requires_grad}
        if self.dist.on and not distributed.is_wrapped(model):  # ranks would train apart, each on its share
            raise MinifTError("under torchrun the model must be wrapped for --parallel (distributed.wrap)")
        if not self.params:
            raise MinifTError("no trainable parameters (LoRA targets matched no layer?)")
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           betas=(0.9, 0.999), eps=1e-8)
        self.per_step = cfg.batch_size * cfg.grad_accum * self.dist.world  # the global batch of one step
        if len(train_examples) < self.per_step:
            raise MinifTError(f"{len(train_examples)} training examples is fewer than one step "
                              f"(batch-size {cfg.batch_size} x grad-accum {cfg.grad_accum} x {self.dist.world} ranks)")
        steps_per_epoch = len(train_examples) // self.per_step
        self.total_steps = cfg.max_steps or max(1, round(cfg.epochs * steps_per_epoch))
        self.warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else max(1, round(0.1 * self.total_steps))
        self.step = 0
        self.stop_signal = None
        self.metrics_path = self.out / "metrics.jsonl"
        self.ckpt_path = self.out / "checkpoint.pt"

    # --- checkpoints ---------------------------------------------------------------------------------------
    def save_checkpoint(self):
        # Under FSDP gathering the parameters and optimizer state is a collective: every rank runs this.
        params = {n: distributed.full(p.detach()).clone() for n, p in self.params.items()}
        optimizer = distributed.optimizer_state(self.raw, self.optimizer)
        rng = distributed.all_gather_object(self.rng_state())  # per rank: each draws its own dropout masks
        if self.dist.main:
            atomic_save({"format": CHECKPOINT_FORMAT, "step": self.step, "params": params, "optimizer": optimizer,
                         **rng[0], "rank_rng": rng}, self.ckpt_path)
        distributed.barrier()  # no rank goes on (or exits) before the file is complete

    @staticmethod
    def rng_state():
        # LoRA dropout on a GPU draws from the CUDA generators: exact resume needs their state too
        return {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}

    def load_checkpoint(self):
        if not self.ckpt_path.is_file():
            raise MinifTError(f"{self.ckpt_path}: no checkpoint to resume from")
        state = read_checkpoint(self.ckpt_path)
        missing = set(self.params) ^ set(state["params"])
        if missing:
            raise MinifTError(f"{self.ckpt_path}: trainable parameters differ from this run's ({sorted(missing)[0]} ...)")
        with torch.no_grad():
            for n, p in self.params.items():
                distributed.set_local(p, state["params"][n])  # FSDP: this rank's rows
        distributed.load_optimizer_state(self.raw, self.optimizer, state["optimizer"])
        ranks = state.get("rank_rng") or []
        if len(ranks) == self.dist.world:
            state.update(ranks[self.dist.rank])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        random.setstate(state["python_rng"])
        self.step = state["step"]
        # Keep only the log lines of the steps the checkpoint covers: the steps after it will be run again.
        if self.metrics_path.is_file() and self.dist.main:
            kept = [l for l in self.metrics_path.read_text().splitlines() if _step_of(l) <= self.step]
            self.metrics_path.write_text("".join(l + "\n" for l in kept))
        console.print(f"resumed from {self.ckpt_path} at step {self.step}")

    # --- one optimizer step ----------------------------------------------------------------------------------
    def train_step(self, examples):
        """One step over `examples`: this rank's share of the global batch (all of it in a single process)."""
        self.model.train()
        # The whole step's count over all ranks: every micro-batch's sums are divided by it. DDP and FSDP average
        # the ranks' gradients, so each rank scales its backward by the world size: mean_r(W g_r) = sum_r g_r.
        total = distributed.all_reduce_sum([self.recipe.count(examples)])[0] / self.dist.world
        sums, loss_sum, tokens = {}, 0.0, 0
        starts = range(0, len(examples), self.cfg.batch_size)
        for i in starts:
            batch = self.recipe.make_batch(examples[i:i + self.cfg.batch_size])
            with distributed.grad_sync(self.model, i == starts[-1]):  # all-reduce once, after the last micro-batch
                loss, metrics = self.recipe.loss_sums(self.model, batch)  # forward (policy, reference) and loss
                (loss / total).backward()  # gradients accumulate in .grad; this micro-batch's activations are freed
            loss_sum += loss.item()  # one host-device sync per micro-batch
            tokens += int(batch.n_tokens)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            del batch, loss, metrics
        sums = distributed.all_reduce_sum({"loss": loss_sum, "tokens": tokens, **sums})  # over ranks, fp64
        total *= self.dist.world
        return {**{k: v / total for k, v in sums.items()}, "tokens": int(sums["tokens"])}

    def run_step(self):
        cfg = self.cfg
        lr = lr_at(self.step, cfg.lr, self.warmup, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        examples = step_examples(self.train_examples, self.step, self.per_step, cfg.seed)
        out = self.train_step(distributed.rank_share(examples))  # torchrun: this rank's contiguous share
        if not math.isfinite(out["loss"]):
            self.optimizer.zero_grad(set_to_none=True)
            raise MinifTError(f"loss is {out['loss']} at step {self.step + 1}; stopped, "
                              f"last good checkpoint kept at {self.ckpt_path}")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params.values(), cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        seconds = time.perf_counter() - t0
        out.update(step=self.step, lr=lr, grad_norm=float(distributed.full(grad_norm)), seconds=seconds,
                   **{"tokens/s": out["tokens"] / seconds})
        return out

    @torch.no_grad()
    def evaluate(self):
        if not self.eval_examples:
            return {}
        self.model.eval()
        total, sums = self.recipe.count(self.eval_examples), {}
        # torchrun: each rank evaluates its share, in as many forwards as every other rank (FSDP's are collective)
        for chunk, real in distributed.balanced_chunks(self.eval_examples, self.cfg.batch_size):
            batch = self.recipe.make_batch(chunk)
            loss, metrics = self.recipe.loss_sums(self.model, batch)
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + (float(v) if real else 0.0)
        return {f"eval/{k}": v / total for k, v in distributed.all_reduce_sum(sums).items()}

    def log(self, record):
        if not self.dist.main:
            return  # rank 0 writes metrics.jsonl
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    # --- the loop ------------------------------------------------------------------------------------------
    def fit(self):
        cfg = self.cfg
        if cfg.resume:
            self.load_checkpoint()
        elif self.metrics_path.exists() and self.dist.main:
            self.metrics_path.unlink()  # a fresh run starts a fresh log
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        shown = self.recipe.progress_keys
        try:
            with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                          TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                          console=console, disable=not (cfg.progress and self.dist.main)) as bar:
                task = bar.add_task(self.recipe.name, total=self.total_steps, completed=self.step, info="")
                if self.step == 0 and cfg.eval_every:
                    self.log({"step": 0, **self.evaluate()})
                while self.step < self.total_steps and not self.stopping():
                    record = self.run_step()
                    if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == self.total_steps):
                        record.update(self.evaluate())
                    self.log(record)
                    if cfg.save_every and self.step % cfg.save_every == 0:
                        self.save_checkpoint()
                    info = "  ".join(f"{k.split('/')[-1]} {record[k]:.3f}" for k in shown if k in record)
                    bar.update(task, completed=self.step, info=info)
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        self.save_checkpoint()
        if self.stopping():  # every rank asks (a collective), so every rank stops alike
            name = self.stop_signal.name if self.stop_signal else "a signal to another rank"
            raise MinifTError(f"stopped by {name} at step {self.step}; "
                              f"checkpoint saved, continue with --resume (out: {self.out})")
        if self.dist.main:
            plot_curves(self.metrics_path, self.out / "curves.png", self.recipe.plot_keys)
        return self.step

    def stopping(self):
        """A signal seen by any rank stops every rank after the same step (one tiny all-reduce per step)."""
        return distributed.any_rank(self.stop_signal is not None)

    def _on_signal(self, signum, frame):
        self.stop_signal = signal.Signals(signum)  # finish the current step, save, then stop


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a blank line or one cut off by a kill mid-write."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def plot_curves(metrics_path: Path, png: Path, keys):
    """One panel per metric: the training curve and, where logged, the eval curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(l) for l in metrics_path.read_text().splitlines() if l]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, style in ((key, "-"), (f"eval/{key}", "o-")):
            pts = [(r["step"], r[name]) for r in rows if name in r]
            if pts:
                ax.plot(*zip(*pts), style, label=name, markersize=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
