"""Argument checks shared by every command and config: ArgumentParser, number() and device() make argparse's
own errors one `error: ...` line (exit 2, errors.run_cli) like every other bad input; out_of_range() is the one
range check of flags and config dataclasses alike."""
import argparse
import math

from minift.errors import MinifTError


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors (a missing or unknown flag, a value of the wrong kind) are one
    `error: ...` line and exit 2, like every other bad input, instead of a usage block."""

    def error(self, message):
        raise MinifTError(f"{message} (see {self.prog} --help)")


def out_of_range(value, gt=None, ge=None, lt=None, le=None):
    """Why value is not a finite number within the bounds (a phrase), or None when it is."""
    if not math.isfinite(value):
        return f"must be a finite number, got {value}"
    for bound, ok, word in ((gt, lambda b: value > b, "greater than"), (ge, lambda b: value >= b, "at least"),
                            (lt, lambda b: value < b, "less than"), (le, lambda b: value <= b, "at most")):
        if bound is not None and not ok(bound):
            return f"must be {word} {bound}, got {value}"
    return None


def number(kind, **bounds):
    """An argparse type: an int or a float that is finite and within the bounds (gt, ge, lt, le)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{'an integer' if kind is int else 'a number'} is needed, "
                                             f"got {text!r}") from None
        problem = out_of_range(value, **bounds)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value
    return parse


SEED = number(int, ge=0, lt=2 ** 32)  # what numpy and torch generators both accept
DTYPES = ("auto", "float32", "bfloat16", "float16")


def device(text):
    """An argparse type: auto, cpu, cuda or cuda:N, checked against this machine."""
    import torch

    if text == "auto":
        return text
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no CUDA device on this machine (torch.cuda.is_available() "
                                         "is False; is this a CPU build of torch?)")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r} (auto, cpu, cuda, cuda:N)")
    return text
