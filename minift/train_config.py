"""The training configs. These dataclasses are the configuration: the command line is generated from them."""
import argparse
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from minift.defaults import bundled
from minift.errors import MinifTError



def opt(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    ckpt: str = opt(None, "HF checkpoint dir (default: the embedded SmolLM2-135M-Instruct)")
    data: str = opt(None, "training JSONL (default: the bundled clinical set)")
    eval_data: str = opt(None, "held-out JSONL (default: --eval-fraction of --data)")
    out: str = opt("runs/sft", "output dir: adapter, metrics.jsonl, checkpoint, curves.png")
    max_steps: int = opt(0, "optimizer steps (0: derived from --epochs)")
    epochs: float = opt(1.0, "passes over the training set when --max-steps is 0")
    batch_size: int = opt(4, "examples per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(2e-4, "peak learning rate")
    warmup_steps: int = opt(-1, "linear warmup steps (-1: 10%% of the run)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping norm")
    max_length: int = opt(512, "tokens per sequence (prompt + completion); longer completions are cut")
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: float = opt(32.0, "LoRA alpha (scaling alpha / r)")
    lora_dropout: float = opt(0.05, "dropout on the LoRA branch")
    lora_targets: str = opt("all-linear", "comma-separated module names (q_proj,v_proj,...) or all-linear")
    rslora: bool = opt(False, "scale by alpha / sqrt(r) (rsLoRA)")
    seed: int = opt(0, "seed for LoRA init, data order and eval split")
    resume: bool = opt(False, "continue from OUT/checkpoint.pt")
    merge: bool = opt(False, "also write OUT/merged/, an HF checkpoint dir with the adapter merged")
    eval_fraction: float = opt(0.1, "fraction of --data held out for eval when --eval-data is not given")
    eval_every: int = opt(10, "evaluate every N steps (0: never)")
    save_every: int = opt(10, "checkpoint every N steps (0: only at the end)")
    gradient_checkpointing: bool = opt(False, "recompute block activations in backward (less memory)")
    skip_bad_rows: bool = opt(False, "warn about malformed rows and skip them instead of stopping")
    device: str = opt("auto", "cpu, cuda, or auto")
    dtype: str = opt("auto", "float32, bfloat16, or auto (fp32 on CPU, bf16 on GPU)")
    progress: bool = opt(True, "show the rich progress bar")

    def default_data(self):
        return bundled("clinical", "sft")

    def check(self):
        positive = ("batch_size", "grad_accum", "max_length", "lora_r")
        for name in positive:
            if getattr(self, name) <= 0:
                raise MinifTError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise MinifTError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise MinifTError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise MinifTError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if self.lr <= 0:
            raise MinifTError(f"--lr must be positive, got {self.lr}")
        if self.epochs <= 0 and not self.max_steps:
            raise MinifTError(f"--epochs must be positive, got {self.epochs}")
        for name in ("data", "eval_data", "ckpt"):
            path = getattr(self, name)
            if path is not None and not Path(path).exists():
                raise MinifTError(f"--{name.replace('_', '-')} {path}: no such file or directory")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise MinifTError(f"--device must be cpu, cuda or auto, got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise MinifTError(f"--dtype must be float32, bfloat16, float16 or auto, got {self.dtype!r}")
        return self


LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
REF_TYPES = ("adapters-off", "adapter", "cached")
LAYOUTS = ("shared-prompt", "concat")


@dataclass
class DPOConfig(TrainConfig):
    out: str = opt("runs/dpo", "output dir: adapter, metrics.jsonl, checkpoint, curves.png")
    lr: float = opt(5e-5, "peak learning rate")
    beta: float = opt(0.1, "DPO temperature: strength of the pull toward the reference")
    loss: str = opt("sigmoid", "DPO loss: " + ", ".join(LOSS_TYPES), choices=LOSS_TYPES)
    label_smoothing: float = opt(0.0, "conservative DPO / robust DPO label noise in [0, 0.5)")
    sft_weight: float = opt(0.0, "weight of an added NLL loss on the chosen completion")
    adapter: str = opt(None, "start from this LoRA adapter dir (PEFT format), e.g. the SFT run's output")
    ref: str = opt("cached", "reference log-probs: cached (one no-grad pass before training, from the --adapter "
                   "copy when given, else the base; reused by later runs on the same data), or computed in every "
                   "step from adapters-off (the base) or adapter (a frozen copy of --adapter)", choices=REF_TYPES)
    layout: str = opt("shared-prompt", "pair layout: shared-prompt (prompt computed once) or concat",
                      choices=LAYOUTS)

    def default_data(self):
        return bundled("clinical", "dpo")

    def check(self):
        super().check()
        if self.beta <= 0:
            raise MinifTError(f"--beta must be positive, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise MinifTError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.adapter is not None and not (Path(self.adapter) / "adapter_config.json").is_file():
            raise MinifTError(f"--adapter {self.adapter}: no adapter_config.json there")
        if self.ref == "adapter" and self.adapter is None:
            raise MinifTError("--ref adapter needs --adapter DIR (the adapter to use as the reference)")
        return self


def parse_config(cls, argv=None, description=None):
    """argparse generated from the dataclass: one flag per field, its default and help from the field."""
    ap = argparse.ArgumentParser(description=description,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        extra = {k: v for k, v in f.metadata.items() if k != "help"}
        if isinstance(default, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f.metadata["help"])
            continue
        kind = {"int": int, "float": float}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
        ap.add_argument(flag, type=kind, default=default, help=f.metadata["help"], **extra)
    return cls(**vars(ap.parse_args(argv))).check()
