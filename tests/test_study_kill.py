"""The study survives SIGKILL: killed at chosen moments (an evaluation, the reference pass, training after a
checkpoint, the report) and started again with the same command, it ends with the report of a run that was
never killed. And a finished study folder copied elsewhere reruns there, training nothing, to the same report.

The reference is an uninterrupted run in its own folder; reports are compared number for number, leaving out
only wall-clock times and the folders' own paths (the two runs live in different places)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def argv(ckpt, data, out):
    # 60 SFT steps with a checkpoint every 5: long enough to be killed mid-training after a checkpoint
    return ["--ckpt", str(ckpt), "--out", str(out), "--limit", "2", "--max-new-tokens", "4",
            "--sft.data", str(data / "sft.jsonl"), "--dpo.data", str(data / "dpo.jsonl"),
            "--test-data", str(data / "test.jsonl"), "--sft.max-steps", "60", "--sft.save-every", "5",
            "--dpo.max-steps", "4", "--sft.eval-every", "0", "--dpo.eval-every", "0",
            "--sft.batch-size", "2", "--dpo.batch-size", "2"]


def start(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "minift.study", *args], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def finish(args, cwd):
    p = start(args, cwd)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]


def numbers(out: Path):
    """report.json without what may differ between two faithful runs: times and the folders' paths."""
    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()
                    if not any(w in k for w in ("seconds", "per_s", "dir", "out")) and k != "data"}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x
    return clean(json.loads((out / "report.json").read_text()))


def kill_when(args, cwd, ready, what):
    """Start the study, SIGKILL it as soon as ready() holds; returns True if it was killed (not finished)."""
    p = start(args, cwd)
    deadline = time.monotonic() + 300
    while p.poll() is None and not ready() and time.monotonic() < deadline:
        time.sleep(0.005)
    if p.poll() is not None:
        return False  # it finished first: this kill landed nowhere
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    return True


def log_has(out, text):
    f = out / "study.log"
    return lambda: f.is_file() and text in f.read_text()


@pytest.mark.slow  # about ten study processes on a tiny model: a minute or two on 2 cores
def test_sigkill_anywhere_then_the_same_command_gives_the_same_report(tiny_llama, tiny_data, tmp_path):
    ckpt = tiny_llama[0]
    ref = tmp_path / "uninterrupted"
    finish(argv(ckpt, tiny_data, ref), tmp_path)
    expected = numbers(ref)

    out = tmp_path / "killed"
    args = argv(ckpt, tiny_data, out)
    seed0 = out / ckpt.name / "clinical" / "seed0"
    sft = seed0 / "sft"
    kills = [("base eval", log_has(out, "[run] base eval")),
             ("sft, after a checkpoint", lambda: (sft / "checkpoint.pt").is_file()),
             ("sft, after a later checkpoint", lambda: "step\": 2" in _read(sft / "metrics.jsonl")),
             ("sft eval", log_has(out, "[run] sft eval")),
             ("dpo: the reference pass", log_has(out, "[run] dpo")),
             ("dpo eval", log_has(out, "[run] dpo eval")),
             ("the report", log_has(out, "[done] dpo eval"))]
    landed = [what for what, ready in kills if kill_when(args, tmp_path, ready, what)]
    print("killed during:", ", ".join(landed))
    assert len(landed) >= 5, landed  # most kills landed inside a running study (the rest finished first)
    if (out / "report.json").is_file():
        json.loads((out / "report.json").read_text())  # a report is whole or absent, never half written
    log = (out / "study.log").read_text()
    assert "[run] sft (resuming)" in log  # training went on from its checkpoint rather than starting over

    finish(args, tmp_path)
    assert numbers(out) == expected


def _read(p):
    return p.read_text() if p.is_file() else ""


@pytest.mark.slow  # two tiny studies in processes
def test_a_copied_study_folder_reruns_in_place_training_nothing(tiny_llama, tiny_data, tmp_path):
    ckpt = tiny_llama[0]
    first = tmp_path / "first"
    finish(argv(ckpt, tiny_data, first), tmp_path)
    copy = tmp_path / "archive" / "study"
    shutil.copytree(first, copy)
    shutil.rmtree(first)  # the old folder is gone: nothing may point into it
    finish(argv(ckpt, tiny_data, copy), tmp_path)
    log = (copy / "study.log").read_text().splitlines()
    last = max(i for i, line in enumerate(log) if " == " in line)
    assert not any("[run]" in line for line in log[last:]), log[last:]  # every phase skipped
    assert any("report:" in line for line in log[last:])
    recorded = [json.loads(p.read_text()) for p in copy.rglob("phase.json")]
    assert not any(str(first) in json.dumps(s) for s in recorded)  # no phase records the old absolute folder
