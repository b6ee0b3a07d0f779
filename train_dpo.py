"""Direct preference optimization with LoRA.  python train_dpo.py --help  (installed: minift-dpo)

With no arguments: the embedded SmolLM2-135M-Instruct on the bundled clinical preference pairs, runs/dpo.
After SFT (the study's recipe):  python train_dpo.py --adapter runs/sft
The reference's log-probs are computed once, before training, and kept in OUT/ref_logps.safetensors (--ref cached,
the default): a DPO step then costs one policy forward + backward. --ref adapter / adapters-off compute them in
every step instead."""
from minift.cli import dpo

if __name__ == "__main__":
    dpo()
