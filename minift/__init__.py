"""minift: a minimal from-scratch LLM fine-tuning trainer (SFT, DPO, LoRA) with fused log-prob kernels."""
from minift.model.checkpoint import load, save_hf
from minift.model.config import ModelConfig
from minift.errors import MinifTError
from minift.model.transformer import Transformer

__all__ = ["load", "save_hf", "ModelConfig", "MinifTError", "Transformer"]
