"""The training configs. These dataclasses are the configuration: the command line is generated from them."""
import argparse
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import torch

from minift.train.batching import LAYOUTS
from minift.args import out_of_range
from minift.defaults import bundled
from minift.train.distributed import PARALLEL
from minift.errors import MinifTError
from minift.train.losses import LOSS_TYPES
from minift.train.reference import STRATEGIES

BOUNDS = ("gt", "ge", "lt", "le")  # field metadata: the range a numeric flag must lie in


def opt(default, help, **kw):
    """A config field: its default, its --help, and argparse extras (choices) or bounds (gt=0, ge=0, lt=1 ...)."""
    return field(default=default, metadata={"help": help, **kw})


def check_number(flag, value, **bounds):
    """One clear line unless value is finite and within the bounds."""
    problem = out_of_range(value, **bounds)
    if problem:
        raise MinifTError(f"{flag} {problem}")


@dataclass
class TrainConfig:
    ckpt: str = opt(None, "HF checkpoint dir (default: the embedded SmolLM2-135M-Instruct)")
    data: str = opt(None, "training JSONL (default: the bundled clinical set)")
    eval_data: str = opt(None, "held-out JSONL (default: --eval-fraction of --data)")
    out: str = opt("runs/sft", "output dir: adapter, metrics.jsonl, checkpoint, curves.png")
    max_steps: int = opt(0, "optimizer steps (0: derived from --epochs)", ge=0)
    epochs: float = opt(3.0, "passes over the training set when --max-steps is 0", gt=0)
    batch_size: int = opt(4, "examples per micro-batch", ge=1)
    grad_accum: int = opt(1, "micro-batches per optimizer step", ge=1)
    lr: float = opt(2e-4, "peak learning rate", gt=0)
    warmup_steps: int = opt(-1, "linear warmup steps (-1: 10%% of the run)", ge=-1)
    weight_decay: float = opt(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = opt(1.0, "gradient clipping norm", gt=0)
    max_length: int = opt(512, "tokens per sequence (prompt + completion); longer completions are cut", ge=2)
    lora_r: int = opt(16, "LoRA rank", ge=1)
    lora_alpha: float = opt(32.0, "LoRA alpha (scaling alpha / r)", gt=0)
    lora_dropout: float = opt(0.05, "dropout on the LoRA branch", ge=0, lt=1)
    lora_targets: str = opt("all-linear", "comma-separated module names (q_proj,v_proj,...) or all-linear")
    rslora: bool = opt(False, "scale by alpha / sqrt(r) (rsLoRA)")
    seed: int = opt(0, "seed for LoRA init, data order and eval split", ge=0, lt=2**32)
    resume: bool = opt(False, "continue from OUT/checkpoint.pt")
    merge: bool = opt(False, "also write OUT/merged/, an HF checkpoint dir with the adapter merged")
    adapter: str = opt(None, "start from this LoRA adapter dir (PEFT format) and train it further, e.g. the SFT "
                       "run's output (default: a fresh LoRA)")
    eval_fraction: float = opt(0.1, "fraction of --data held out for eval when --eval-data is not given", ge=0, lt=1)
    eval_every: int = opt(10, "evaluate every N steps (0: never)", ge=0)
    save_every: int = opt(10, "checkpoint every N steps (0: only at the end)", ge=0)
    gradient_checkpointing: bool = opt(False, "recompute block activations in backward (less memory)")
    skip_bad_rows: bool = opt(False, "warn about malformed rows and skip them instead of stopping")
    device: str = opt("auto", "cpu, cuda, or auto")
    dtype: str = opt("auto", "float32, bfloat16, or auto (fp32 on CPU, bf16 on GPU); float16 is refused: it needs "
                     "loss scaling, which minift does not do (bf16 has fp32's range and needs none)")
    progress: bool = opt(True, "show the rich progress bar")
    parallel: str = opt("ddp", "under torchrun: ddp (the frozen base on every rank, LoRA gradients all-reduced) or "
                        "fsdp (every weight sharded over the ranks, for a model one device cannot hold)",
                        choices=PARALLEL)

    def default_data(self):
        return bundled("clinical", "sft")

    def check(self):
        for f in fields(self):
            bounds = {k: v for k, v in f.metadata.items() if k in BOUNDS}
            if bounds:
                check_number("--" + f.name.replace("_", "-"), getattr(self, f.name), **bounds)
        for name in ("data", "eval_data"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                what = "is a directory, not a JSONL file" if Path(path).is_dir() else "no such file"
                raise MinifTError(f"--{name.replace('_', '-')} {path}: {what}")
        if self.ckpt is not None and not Path(self.ckpt).is_dir():
            what = "not a directory (an HF checkpoint dir)" if Path(self.ckpt).exists() else "no such directory"
            raise MinifTError(f"--ckpt {self.ckpt}: {what}")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise MinifTError(f"--out {self.out}: is a file; the output must be a directory")
        if self.adapter is not None and not (Path(self.adapter) / "adapter_config.json").is_file():
            raise MinifTError(f"--adapter {self.adapter}: no adapter_config.json there")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise MinifTError(f"--device must be cpu, cuda or auto, got {self.device!r}")
        if self.merge and self.parallel == "fsdp":  # the base weights are sharded over the ranks
            raise MinifTError("--merge does not work with --parallel fsdp (no rank holds the whole base); "
                              "merge the saved adapter afterwards in one process")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise MinifTError(f"--device {self.device}: no CUDA device on this machine")
        if self.dtype == "float16":
            raise MinifTError("--dtype float16 is not supported: fp16 training needs loss scaling, which minift "
                              "does not do; use bfloat16 (the same memory, fp32's range, no scaling needed)")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise MinifTError(f"--dtype must be float32, bfloat16 or auto, got {self.dtype!r}")
        return self


@dataclass
class DPOConfig(TrainConfig):
    out: str = opt("runs/dpo", "output dir: adapter, metrics.jsonl, checkpoint, curves.png")
    epochs: float = opt(None, "passes over the training set when --max-steps is 0 (default 1; orpo, which is also "
                        "the SFT stage: SFT's 3)", gt=0)
    lr: float = opt(None, "peak learning rate (default 1e-5; orpo, which is also the SFT stage: SFT's 2e-4)", gt=0)
    beta: float = opt(None, "temperature of the preference loss: DPO's pull toward the reference (default 0.1), "
                      "SimPO's reward scale (default 2.0: its rewards are per-token means, the paper's 2-2.5)", gt=0)
    loss: str = opt(LOSS_TYPES[0], "loss: DPO's sigmoid, ipo, hinge, robust; simpo, orpo (no reference model); kto "
                    "(unpaired rows {prompt, completion, label}, or pairs made into one desirable and one undesirable "
                    "row)", choices=LOSS_TYPES)
    label_smoothing: float = opt(0.0, "conservative DPO / robust DPO label noise in [0, 0.5)", ge=0, lt=0.5)
    sft_weight: float = opt(0.0, "weight of an added NLL loss on the chosen completion (simpo: TRL's cpo_alpha)", ge=0)
    dpop_lambda: float = opt(0.0, "DPO-Positive (Pal et al. 2024): margin lost per nat that a chosen answer falls below "
                             "the reference (sigmoid, hinge, robust)", ge=0)
    drop_shared_tail: bool = opt(False, "score each pair up to the last token where chosen and rejected differ: the "
                                 "tokens they share at the end are left out of both (sigmoid, hinge, robust, ipo; "
                                 "not with --sft-weight, whose NLL would then miss the chosen answer's tail)")
    gamma: float = opt(0.5, "simpo: target reward margin (the loss is -logsig(beta (a_w - a_l) - gamma), a = mean "
                       "log-prob per token)", ge=0)
    orpo_lambda: float = opt(0.1, "orpo: weight of the odds-ratio term beside the chosen NLL (TRL's beta)", ge=0)
    desirable_weight: float = opt(1.0, "kto: weight of the desirable examples' losses", ge=0)
    undesirable_weight: float = opt(1.0, "kto: weight of the undesirable examples' losses", ge=0)
    ref: str = opt(STRATEGIES[0], "reference log-probs: cached (one no-grad pass before training, from the --adapter "
                   "copy when given, else the base; reused by later runs on the same data), or computed in every "
                   "step from adapters-off (the base) or adapter (a frozen copy of --adapter)", choices=STRATEGIES)
    layout: str = opt(LAYOUTS[0], "pair layout: shared-prompt (prompt computed once) or concat",
                      choices=LAYOUTS)

    def __post_init__(self):
        if self.beta is None:
            self.beta = 2.0 if self.loss == "simpo" else 0.1
        if self.lr is None:
            self.lr = TrainConfig.lr if self.loss == "orpo" else 1e-5
        if self.epochs is None:
            self.epochs = TrainConfig.epochs if self.loss == "orpo" else 1.0

    def default_data(self):
        return bundled("clinical", "dpo")

    def check(self):
        super().check()
        if self.ref == "adapter" and self.adapter is None:
            raise MinifTError("--ref adapter needs --adapter DIR (the adapter to use as the reference)")
        if self.dpop_lambda and self.loss not in ("sigmoid", "hinge", "robust"):
            raise MinifTError(f"--dpop-lambda applies to --loss sigmoid, hinge or robust, not {self.loss}")
        if self.drop_shared_tail and (self.loss not in ("sigmoid", "hinge", "robust", "ipo") or self.sft_weight):
            raise MinifTError("--drop-shared-tail applies to --loss sigmoid, hinge, robust or ipo without --sft-weight"
                              f" (got --loss {self.loss}, --sft-weight {self.sft_weight})")
        return self


def parse_config(cls, argv=None, description=None):
    """argparse generated from the dataclass: one flag per field, its default and help from the field."""
    ap = argparse.ArgumentParser(description=description,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        extra = {k: v for k, v in f.metadata.items() if k != "help" and k not in BOUNDS}
        if isinstance(default, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f.metadata["help"])
            continue
        kind = {"int": int, "float": float}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
        ap.add_argument(flag, type=kind, default=default, help=f.metadata["help"], **extra)
    return cls(**vars(ap.parse_args(argv))).check()
