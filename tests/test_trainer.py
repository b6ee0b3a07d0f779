"""The training loop: accumulation invariance, exact resume after SIGKILL, NaN guard, signals, bad arguments."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import make_hf_model, save_checkpoint

from minift.model import lora
from minift.model.checkpoint import load
from minift.train.data import read_preferences, read_sft
from minift.train.recipes import DPORecipe, SFTRecipe
from minift.train.reference import Reference
from minift.train.train_config import DPOConfig, TrainConfig, parse_config
from minift.train.trainer import Trainer, lr_at

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny checkpoint and short SFT / preference files (a few dozen rows of a few tokens)."""
    d = tmp_path_factory.mktemp("trainer")
    save_checkpoint(make_hf_model("llama", tie_word_embeddings=True), d / "ckpt", shard=False)
    with open(d / "sft.jsonl", "w") as f:
        for i in range(48):
            f.write(json.dumps({"prompt": f"add {i} and 1", "completion": f"it is {i + 1}"}) + "\n")
    with open(d / "dpo.jsonl", "w") as f:
        for i in range(48):
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"is {i} even?"}],
                                "chosen": [{"role": "assistant", "content": "yes" if i % 2 == 0 else "no"}],
                                "rejected": [{"role": "assistant", "content": "no" if i % 2 == 0 else "yes"}]}) + "\n")
    return d


def grads_after_one_step(tiny, recipe_kind, batch_size, grad_accum):
    model, tok = load(tiny / "ckpt")
    torch.manual_seed(0)
    lora.apply_lora(model, "all-linear", r=4, alpha=8, dropout=0.0)
    with torch.no_grad():  # B != 0 so that the gradient reaches A as well
        for _, m in lora.lora_modules(model):
            m.lora_B["default"].weight.normal_(0, 0.05)
    if recipe_kind == "sft":
        cfg = TrainConfig(batch_size=batch_size, grad_accum=grad_accum, progress=False)
        examples = read_sft(tiny / "sft.jsonl", tok)
        recipe = SFTRecipe(tok.pad_id, "cpu")
    else:
        cfg = DPOConfig(batch_size=batch_size, grad_accum=grad_accum, progress=False, sft_weight=0.0)
        examples = list(enumerate(read_preferences(tiny / "dpo.jsonl", tok)))
        recipe = DPORecipe(Reference("adapters-off", model), cfg.layout, tok.pad_id, "cpu", beta=cfg.beta,
                           loss_type=cfg.loss)
    trainer = Trainer(cfg, model, recipe, examples, [], tiny / f"out_{recipe_kind}_{batch_size}")
    out = trainer.train_step(examples[:8])
    return out, {n: p.grad.clone() for n, p in trainer.params.items()}


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_gradient_accumulation_does_not_depend_on_the_split(tiny, kind):
    out1, g1 = grads_after_one_step(tiny, kind, batch_size=8, grad_accum=1)
    out4, g4 = grads_after_one_step(tiny, kind, batch_size=2, grad_accum=4)
    # fp32 rounding: the same sums taken in a different order (padding to different lengths changes nothing
    # numerically for real tokens, but the matmuls see other shapes). Gradients here are ~1e-2.
    assert out1["loss"] == pytest.approx(out4["loss"], rel=1e-5)
    for n in g1:
        torch.testing.assert_close(g4[n], g1[n], rtol=1e-4, atol=1e-6)


def test_lr_schedule_warms_up_then_decays():
    lrs = [lr_at(s, 1.0, warmup=4, total=20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[-1] > 0.1 - 1e-9 and lrs[-1] < 0.2


def cli(script, *args, **kw):
    return subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, **kw)


def losses(metrics):
    rows = [json.loads(l) for l in metrics.read_text().splitlines() if l]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_resume_after_sigkill_gives_identical_losses(tiny):
    common = ["--ckpt", tiny / "ckpt", "--data", tiny / "sft.jsonl", "--max-steps", 30, "--batch-size", 2,
              "--lora-dropout", 0.1, "--eval-every", 0, "--save-every", 5, "--no-progress"]
    straight = cli("train_sft.py", *common, "--out", tiny / "straight")
    assert straight.returncode == 0, straight.stderr
    want = losses(tiny / "straight" / "metrics.jsonl")
    assert sorted(want) == list(range(1, 31))

    out = tiny / "killed"
    proc = subprocess.Popen([sys.executable, "train_sft.py", *map(str, common), "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill -9 once step 7 is logged, mid-run; a tiny model's steps take milliseconds,
        if (out / "metrics.jsonl").exists() and max(losses(out / "metrics.jsonl"), default=0) >= 7:  # so a later
            break  # checkpoint (10, 15, ...) may be the last complete one by the time the signal lands
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed, not finished
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["step"]  # plain tensors and values only
    assert saved % 5 == 0 and 5 <= saved < 30
    assert max(losses(out / "metrics.jsonl")) >= saved  # the steps after the checkpoint are run again on resume
    resumed = cli("train_sft.py", *common, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    got = losses(out / "metrics.jsonl")
    assert got == want  # bit-identical: same data order, RNG state (dropout) and optimizer state


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tiny, monkeypatch, tmp_path):
    model, tok = load(tiny / "ckpt")
    lora.apply_lora(model, "q_proj", r=2, alpha=4)
    cfg = TrainConfig(batch_size=4, max_steps=6, save_every=2, eval_every=0, progress=False)
    recipe = SFTRecipe(tok.pad_id, "cpu")
    examples = read_sft(tiny / "sft.jsonl", tok)
    trainer = Trainer(cfg, model, recipe, examples, [], tmp_path)
    real = recipe.loss_sums
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss, m = real(model, batch)
        return (loss * float("nan"), m) if calls["n"] == 3 else (loss, m)

    monkeypatch.setattr(recipe, "loss_sums", poisoned)
    from minift.errors import MinifTError

    with pytest.raises(MinifTError, match="loss is nan at step 3"):
        trainer.fit()
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2


def test_sigterm_saves_a_checkpoint_and_exits_nonzero(tiny):
    out = tiny / "term"
    proc = subprocess.Popen([sys.executable, "train_sft.py", "--ckpt", str(tiny / "ckpt"), "--data",
                             str(tiny / "sft.jsonl"), "--max-steps", "1000", "--batch-size", "2", "--eval-every",
                             "0", "--save-every", "0", "--no-progress", "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and losses(out / "metrics.jsonl")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "SIGTERM" in err and "Traceback" not in err
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert step == max(losses(out / "metrics.jsonl"))


BAD_ARGS = [
    (["--batch-size", "0"], "--batch-size"),
    (["--grad-accum", "-1"], "--grad-accum"),
    (["--lr", "-1"], "--lr"),
    (["--max-length", "0"], "--max-length"),
    (["--lora-dropout", "1.5"], "--lora-dropout"),
    (["--eval-fraction", "1.0"], "--eval-fraction"),
    (["--data", "/no/such.jsonl"], "/no/such.jsonl"),
    (["--ckpt", "/no/such/dir"], "/no/such/dir"),
    (["--device", "tpu"], "--device"),
    (["--lora-targets", "wq"], "wq"),
    (["--resume"], "checkpoint"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--lora-alpha", "-8"], "--lora-alpha must be greater than 0"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be greater than 0"),  # a negative norm would flip the gradient
    (["--weight-decay", "nan"], "--weight-decay must be a finite number"),
    (["--epochs", "inf"], "--epochs must be a finite number"),
    (["--warmup-steps", "-2"], "--warmup-steps must be at least -1"),
    (["--seed", "-1"], "--seed must be at least 0"),
    (["--dtype", "float16"], "loss scaling"),
    (["--data", "/"], "is a directory"),
    (["--ckpt", "/proc/version"], "not a directory"),
    (["--out", "/proc/version"], "is a file"),
]
DPO_BAD_ARGS = [
    (["--beta", "0"], "--beta"),
    (["--label-smoothing", "0.7"], "--label-smoothing"),
    (["--ref", "adapter"], "--adapter"),
    (["--adapter", "/no/adapter"], "/no/adapter"),
    (["--loss", "nope"], "invalid choice"),
    (["--beta", "nan"], "--beta must be a finite number"),
    (["--sft-weight", "-1"], "--sft-weight must be at least 0"),
]


@pytest.mark.parametrize("script,args,fragment", [("train_sft.py", a, f) for a, f in BAD_ARGS]
                         + [("train_dpo.py", a, f) for a, f in DPO_BAD_ARGS])
def test_bad_arguments_give_one_line_errors(tiny, tmp_path, capsys, script, args, fragment):
    """In-process (the same run_cli wrapper as the command line, without paying for a new interpreter each)."""
    from minift import cli
    from minift.errors import run_cli

    main = {"train_sft.py": cli._sft, "train_dpo.py": cli._dpo}[script]
    data = tiny / ("sft.jsonl" if script == "train_sft.py" else "dpo.jsonl")
    argv = ["--ckpt", tiny / "ckpt", "--data", data, "--out", tmp_path / "out", "--no-progress", "--max-steps", 1]
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: main([str(a) for a in argv + args]))
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "Traceback" not in err and fragment in err
    assert "error:" in err.strip().splitlines()[-1]  # argparse: "PROG: error: ...", ours: "error: ..."


def test_malformed_data_through_the_cli(tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"\n')
    run = cli("train_sft.py", "--ckpt", tiny / "ckpt", "--data", bad, "--out", tmp_path / "o", "--no-progress")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert f"{bad}:2" in run.stderr


def test_config_flags_mirror_the_dataclass():
    cfg = parse_config(DPOConfig, ["--lora-r", "8", "--no-progress", "--layout", "concat"])
    assert (cfg.lora_r, cfg.progress, cfg.layout, cfg.beta) == (8, False, "concat", 0.1)


def test_loss_dependent_defaults_resolve_and_yield_to_flags():
    # ORPO is also the SFT stage, so it takes SFT's lr and epochs; SimPO's rewards are per-token means (beta 2)
    def pick(argv):
        cfg = parse_config(DPOConfig, argv)
        return cfg.lr, cfg.epochs, cfg.beta

    assert pick([]) == (1e-5, 1.0, 0.1)
    assert pick(["--loss", "orpo"]) == (TrainConfig.lr, TrainConfig.epochs, 0.1)
    assert pick(["--loss", "simpo"]) == (1e-5, 1.0, 2.0)
    assert pick(["--loss", "orpo", "--epochs", "1", "--lr", "5e-5", "--beta", "0.3"]) == (5e-5, 1.0, 0.3)


class _RunsCode:
    """A pickle that would create a file when it is read (what weights_only=False would run)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("content", ["crafted", "garbage", "old-format"])
def test_a_checkpoint_that_is_not_ours_is_refused_and_runs_nothing(tiny, tmp_path, content):
    out, marker = tmp_path / "run", tmp_path / "ran"
    out.mkdir()
    if content == "crafted":
        torch.save({"step": 1, "params": _RunsCode(marker)}, out / "checkpoint.pt")
    elif content == "garbage":
        (out / "checkpoint.pt").write_bytes(os.urandom(512))
    else:  # the previous format: plain values, but no format mark
        torch.save({"step": 1, "params": {}, "optimizer": {}}, out / "checkpoint.pt")
    proc = cli("train_sft.py", "--ckpt", tiny / "ckpt", "--data", tiny / "sft.jsonl", "--max-steps", 2,
               "--batch-size", 2, "--eval-every", 0, "--no-progress", "--out", out, "--resume")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]  # (the data summary precedes it)
    assert len(err) == 1 and "checkpoint.pt" in err[0] and proc.stderr.rstrip().endswith(err[0]), proc.stderr
    assert "fresh --out" in err[0]  # says how to go on
    assert not marker.exists()  # the pickled call was never made
