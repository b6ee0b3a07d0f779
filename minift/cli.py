"""The console commands (setup.py's entry points): each parses its arguments and calls one function; bad input
prints one `error: ...` line and exits 2 (errors.run_cli)."""
from minift.errors import run_cli


def _sft(argv=None):
    from minift.recipes import run_sft
    from minift.train_config import TrainConfig, parse_config

    run_sft(parse_config(TrainConfig, argv, description="Supervised fine-tuning with LoRA."))


def _dpo(argv=None):
    from minift.recipes import run_dpo
    from minift.train_config import DPOConfig, parse_config

    run_dpo(parse_config(DPOConfig, argv, description="Preference optimization (DPO) with LoRA. After SFT: "
                                                      "--adapter runs/sft (the reference is that adapter)."))


def _evaluate(argv=None):
    from minift.evaluate import main

    main(argv)


def _generate(argv=None):
    from minift.generate import main

    main(argv)


def sft(argv=None):
    return run_cli(lambda: _sft(argv))


def dpo(argv=None):
    return run_cli(lambda: _dpo(argv))


def evaluate(argv=None):
    return run_cli(lambda: _evaluate(argv))


def generate(argv=None):
    return run_cli(lambda: _generate(argv))
