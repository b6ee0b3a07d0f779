"""The study refuses bad input before its first phase: one `error: ...` line naming the flag or file, exit code
2, nothing written. Every case runs the real command line on a tiny model with one-step arms, so a case that
were wrongly accepted would finish (and fail the test) in seconds instead of starting a long study."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minift import cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two bundled rows of each kind, a data dir laid out like minift/datasets/, and some bad files."""
    d = tmp_path_factory.mktemp("inputs")
    for kind in ("sft", "dpo", "test"):
        lines = (ROOT / "minift" / "datasets" / "clinical" / f"{kind}.jsonl").read_text().splitlines()[:8]
        (d / f"{kind}.jsonl").write_text("\n".join(lines) + "\n")
    (d / "data" / "clinical").mkdir(parents=True)
    (d / "data" / "clinical" / "sft.jsonl").write_text((d / "sft.jsonl").read_text())  # dpo.jsonl missing
    (d / "malformed.jsonl").write_text((d / "test.jsonl").read_text() + '{"task": "triage", \n')
    (d / "unknown_task.jsonl").write_text('{"task": "radiology", "prompt": []}\n')
    (d / "not_json.json").write_text("{sft: lr=1}")
    (d / "a_file").write_text("")
    for name, conf in {"wrong_type": {"study": {"k": "four"}}, "bad_value": {"study": {"temperature": -2}},
                       "unknown_arm": {"rlhf": {"lr": 1e-5}}, "unknown_key": {"study": {"epochs": 3}},
                       "arm_not_run": {"simpo": {"beta": 2.0}}, "arm_value": {"dpo": {"beta": -0.1}},
                       "not_objects": {"study": 3}}.items():
        (d / f"{name}.json").write_text(json.dumps(conf))
    return d


def argv(ckpt, d, out, *extra):
    # (with --data-dir, the training files come from there)
    data = [] if "--data-dir" in extra else ["--sft.data", str(d / "sft.jsonl"), "--dpo.data", str(d / "dpo.jsonl")]
    return ["--ckpt", str(ckpt), "--out", str(out), "--limit", "1", "--max-new-tokens", "2", *data,
            "--test-data", str(d / "test.jsonl"), "--sft.max-steps", "1", "--dpo.max-steps", "1",
            "--sft.eval-every", "0", "--dpo.eval-every", "0", "--sft.batch-size", "2", "--dpo.batch-size", "2",
            *extra]


# (extra flags, a phrase the error line must hold); "{d}" is the folder of the files above.
CASES = {
    "k 0": (["--k", "0"], "--k"),
    "k not a number": (["--k", "four"], "--k"),
    "temperature -1": (["--temperature", "-1"], "--temperature"),
    "temperature nan": (["--temperature", "nan"], "--temperature"),
    "temperature inf": (["--temperature", "inf"], "--temperature"),
    "max-new-tokens 0": (["--max-new-tokens", "0"], "--max-new-tokens"),
    "limit 0": (["--limit", "0"], "--limit"),
    "limit -3": (["--limit", "-3"], "--limit"),
    "seeds not numbers": (["--seeds", "a,b"], "--seeds"),
    "seeds empty": (["--seeds", ","], "--seeds"),
    "unknown method": (["--methods", "sft,ppo"], "ppo"),
    "control arm without dpo": (["--methods", "sft,sft-more"], "sft-more"),
    "control arm before dpo": (["--methods", "sft,sft-more,dpo"], "sft-more"),
    "unknown task": (["--tasks", "radiology"], "radiology"),
    "unknown pairs": (["--pairs", "magic"], "--pairs"),
    "dpo.beta nan": (["--dpo.beta", "nan"], "--dpo.beta"),
    "dpo.beta 0": (["--dpo.beta", "0"], "--dpo.beta"),
    "sft.lr -1": (["--sft.lr", "-1"], "--sft.lr"),
    "sft.epochs not a number": (["--sft.epochs", "many"], "--sft.epochs"),
    "dpo flag that does not exist": (["--dpo.bogus", "1"], "bogus"),
    "flag of an arm not in --methods": (["--simpo.beta", "2"], "simpo"),
    "flag of an unknown arm": (["--rlhf.lr", "1"], "rlhf"),
    "data-dir with a file missing": (["--data-dir", "{d}/data"], "dpo.jsonl"),
    "data-dir missing": (["--data-dir", "{d}/nowhere"], "nowhere"),
    "test-data malformed": (["--test-data", "{d}/malformed.jsonl"], "malformed.jsonl:9"),
    "test-data unknown task": (["--test-data", "{d}/unknown_task.jsonl"], "unknown_task.jsonl:1"),
    "test-data missing": (["--test-data", "{d}/nothing.jsonl"], "nothing.jsonl"),
    "sft.data missing": (["--sft.data", "{d}/nothing.jsonl"], "nothing.jsonl"),
    "config not JSON": (["--config", "{d}/not_json.json"], "not_json.json"),
    "config missing": (["--config", "{d}/nothing.json"], "nothing.json"),
    "config wrong type": (["--config", "{d}/wrong_type.json"], "--k"),
    "config bad value": (["--config", "{d}/bad_value.json"], "--temperature"),
    "config unknown arm": (["--config", "{d}/unknown_arm.json"], "rlhf"),
    "config unknown study key": (["--config", "{d}/unknown_key.json"], "epochs"),
    "config arm not in --methods": (["--config", "{d}/arm_not_run.json"], "simpo"),
    "config arm value": (["--config", "{d}/arm_value.json"], "--dpo.beta"),
    "config not objects": (["--config", "{d}/not_objects.json"], "not_objects.json"),
    "export type unknown": (["--export", "q3_k"], "--export"),
    "ckpt missing": (["--ckpt", "{d}/no_model"], "no_model"),
    "ckpt not a checkpoint": (["--ckpt", "{d}/data"], "config.json"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_study_input_is_refused_before_anything_runs(case, tiny_llama, files, tmp_path, capsys):
    extra, phrase = CASES[case]
    extra = [x.replace("{d}", str(files)) for x in extra]
    out = tmp_path / "study"
    with pytest.raises(SystemExit) as e:
        cli.study(argv(tiny_llama[0], files, out, *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert phrase in err[0], err[0]
    assert not out.exists()  # nothing written, not even the log


def test_out_naming_a_file_is_refused(tiny_llama, files, capsys):
    with pytest.raises(SystemExit) as e:
        cli.study(argv(tiny_llama[0], files, files / "a_file"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--out" in err[0] and "a_file" in err[0]
    assert (files / "a_file").read_text() == ""


def test_the_command_line_prints_no_traceback(tiny_llama, files, tmp_path):
    """The same refusal through `python -m minift.study` in a fresh process (what a user sees)."""
    out = tmp_path / "study"
    r = subprocess.run([sys.executable, "-m", "minift.study", *argv(tiny_llama[0], files, out, "--dpo.beta", "nan")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith("error: --dpo.beta") and "Traceback" not in r.stderr
    assert not out.exists()
