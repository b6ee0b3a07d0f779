"""Direct preference optimization with LoRA.  python train_dpo.py --help

With no arguments: the embedded SmolLM2-135M-Instruct on the bundled clinical preference pairs, runs/dpo.
After SFT (the study's recipe):  python train_dpo.py --adapter runs/sft
The reference's log-probs are computed once, before training, and kept in OUT/ref_logps.safetensors (--ref cached,
the default): a DPO step then costs one policy forward + backward. --ref adapter / adapters-off compute them in
every step instead."""
from minift.errors import run_cli
from minift.train_config import DPOConfig, parse_config


def main(argv=None):
    from minift.recipes import run_dpo

    run_dpo(parse_config(DPOConfig, argv, description=__doc__))


if __name__ == "__main__":
    run_cli(main)
