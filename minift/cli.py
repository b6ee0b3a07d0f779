"""The console commands (setup.py's entry points) and `python -m minift.<command>`: each parses its arguments
and calls one function; bad input prints one `error: ...` line and exits 2 (errors.run_cli)."""
import sys

from minift.errors import run_cli


def _sft(argv=None):
    from minift.train.recipes import run_sft
    from minift.train.train_config import TrainConfig, parse_config

    run_sft(parse_config(TrainConfig, argv, description="Supervised fine-tuning with LoRA."))


def _dpo(argv=None):
    from minift.train.recipes import run_dpo
    from minift.train.train_config import DPOConfig, parse_config

    run_dpo(parse_config(DPOConfig, argv, description="Preference optimization (DPO) with LoRA. After SFT: "
                                                      "--adapter runs/sft (the reference is that adapter)."))


def _evaluate(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("compare", "rescore"):  # python -m minift.evaluate compare A B
        from minift.eval.compare import main
    else:
        from minift.eval.evaluate import main
    main(argv)


def _generate(argv=None):
    from minift.eval.generate import main

    main(argv)


def _gguf(argv=None):
    from minift.model.gguf import main

    main(argv)


def _export(argv=None):
    from minift.model.export import main

    main(argv)


def _study(argv=None):
    from minift.study.run import main

    main(argv)


def _then_leave(code):
    """Under torchrun a training command's rank exits without the interpreter's teardown (distributed.leave)."""
    from minift.train import distributed

    if distributed.launched():
        distributed.leave()
    return code


def sft(argv=None):
    return _then_leave(run_cli(lambda: _sft(argv)))


def dpo(argv=None):
    return _then_leave(run_cli(lambda: _dpo(argv)))


def evaluate(argv=None):
    return run_cli(lambda: _evaluate(argv))


def generate(argv=None):
    return run_cli(lambda: _generate(argv))


def study(argv=None):
    return run_cli(lambda: _study(argv))


def gguf(argv=None):
    return run_cli(lambda: _gguf(argv))


def export(argv=None):
    return run_cli(lambda: _export(argv))
