"""minift: a minimal from-scratch LLM fine-tuning trainer (SFT, DPO, LoRA) with fused log-prob kernels."""
from minift.checkpoint import load, save_hf
from minift.config import ModelConfig
from minift.errors import MinifTError
from minift.model import Transformer

__all__ = ["load", "save_hf", "ModelConfig", "MinifTError", "Transformer"]
