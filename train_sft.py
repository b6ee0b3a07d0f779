"""Supervised fine-tuning with LoRA.  python train_sft.py --help

With no arguments: the embedded SmolLM2-135M-Instruct on the bundled clinical set, a short run to runs/sft."""
from minift.errors import run_cli
from minift.train_config import TrainConfig, parse_config


def main(argv=None):
    from minift.recipes import run_sft

    run_sft(parse_config(TrainConfig, argv, description=__doc__))


if __name__ == "__main__":
    run_cli(main)
