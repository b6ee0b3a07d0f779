"""Supervised fine-tuning with LoRA.  python train_sft.py --help  (installed: minift-sft)

With no arguments: the embedded SmolLM2-135M-Instruct on the bundled clinical set, one epoch to runs/sft."""
from minift.cli import sft

if __name__ == "__main__":
    sft()
