"""The study command on a tiny random model: every report file with every cell filled, p-values equal to
`evaluate compare` on the same runs, a rerun that trains nothing, a changed DPO setting that reruns only DPO
and its evaluation, and bad input as one error line with finished phases kept."""
import json
from pathlib import Path

import pytest

from minift.study.config import METHODS, train_config
from minift.study.run import main, parse_args

ROOT = Path(__file__).resolve().parent.parent


def study_args(ckpt, data, out, *extra):
    files = ["--sft.data", str(data / "sft.jsonl"), "--dpo.data", str(data / "dpo.jsonl"),
             "--test-data", str(data / "test.jsonl")] if data else []
    return ["--ckpt", str(ckpt), "--out", str(out), "--limit", "2", "--max-new-tokens", "4", *files,
            "--sft.max-steps", "1", "--dpo.max-steps", "1", "--sft.eval-every", "0", "--dpo.eval-every", "0",
            "--sft.batch-size", "2", "--dpo.batch-size", "2", *extra]


def ran_phases(out):
    """[(phase, action)] of the last invocation, from study.log."""
    lines = (Path(out) / "study.log").read_text().splitlines()
    last = max(i for i, x in enumerate(lines) if " == " in x)
    return [(x.split("] ", 1)[1].split(":")[0].split(" ->")[0].split(" (")[0], x.split("[", 1)[1].split("]")[0])
            for x in lines[last:] if "] " in x and x.split("[", 1)[1].split("]")[0] in ("run", "skip")]


@pytest.fixture(scope="module")
def study(tiny_llama, tiny_data, tmp_path_factory):
    ckpt, _ = tiny_llama
    out = tmp_path_factory.mktemp("study")
    main(study_args(ckpt, tiny_data, out))
    return ckpt, out


@pytest.mark.slow  # a whole (tiny) study: seconds alone, longer on a busy machine
def test_report_files_and_every_cell(study):
    _, out = study
    for name in ("report.md", "report.json", "report.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    md = (out / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| task")
            and not line.startswith("| run")]
    assert len(rows) >= 6 + 2 + 6  # 6 metric rows, 2 compute rows, 6 phase-time rows
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert all(cells) and not any(c.lower() in ("nan", "none") for c in cells), line
    rep = json.loads((out / "report.json").read_text())
    assert {r["task"] for r in rep["table"]} == {"classification", "reasoning", "summarization", "triage"}
    comp = rep["compute"][next(iter(rep["compute"]))]
    assert comp["sft"]["train"] > 0 and comp["dpo"]["reference"] > 0 and comp["dpo"]["naive"] > comp["dpo"]["train"]


@pytest.mark.slow  # a whole (tiny) study: seconds alone, longer on a busy machine
def test_p_values_equal_compare(study):
    from minift.eval.compare import compare

    _, out = study
    rep = json.loads((out / "report.json").read_text())
    seed = rep["models"]["tiny_llama0"]["units"]["clinical"]["seeds"]["0"]
    want = {(r["task"], r["metric"]): r["p_value"] for r in compare(seed["sft"]["eval_dir"], seed["dpo"]["eval_dir"])}
    for row in rep["table"]:
        assert row["dpo_vs_sft"][0]["p_value"] == want[(row["task"], row["metric"])]


@pytest.mark.slow  # a whole (tiny) study: seconds alone, longer on a busy machine
def test_rerun_trains_nothing_and_a_new_beta_reruns_only_dpo(study, tiny_data):
    ckpt, out = study
    main(study_args(ckpt, tiny_data, out))
    assert {a for _, a in ran_phases(out)} == {"skip"}
    main(study_args(ckpt, tiny_data, out, "--dpo.beta", "0.3"))
    assert [p for p, a in ran_phases(out) if a == "run"] == ["dpo", "dpo eval"]


def _error(capsys, argv):
    from minift.errors import run_cli

    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and err[-1].startswith("error: ")
    return err[-1]


@pytest.mark.slow  # a whole (tiny) study: seconds alone, longer on a busy machine
def test_bad_input_is_one_error_line(study, tiny_data, tmp_path, capsys):
    ckpt, out = study
    assert "unknown task 'nope'" in _error(capsys, study_args(ckpt, tiny_data, out, "--tasks", "nope"))
    assert "--pairs" in _error(capsys, study_args(ckpt, tiny_data, out, "--pairs", "magic"))
    assert "no setting 'bogus'" in _error(capsys, study_args(ckpt, tiny_data, out, "--dpo.bogus", "1"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "empty" in _error(capsys, study_args(ckpt, tiny_data, out, "--sft.data", str(empty)))
    bad_ckpt = tmp_path / "ckpt"
    bad_ckpt.mkdir()
    assert "config.json" in _error(capsys, study_args(bad_ckpt, tiny_data, out))


@pytest.mark.slow  # a whole (tiny) study: seconds alone, longer on a busy machine
def test_on_policy_needs_a_model_with_answers_and_keeps_finished_phases(study, tiny_data, tmp_path, capsys):
    # classification answers are whole words (current / past / absent): the random tiny model's noise names none
    ckpt, out = study
    rows = [x for x in (tiny_data / "dpo.jsonl").read_text().splitlines() if '"classification"' in x]
    (tmp_path / "cls.jsonl").write_text("\n".join(rows) + "\n")
    msg = _error(capsys, study_args(ckpt, tiny_data, out, "--pairs", "on-policy", "--k", "1",
                                    "--dpo.data", str(tmp_path / "cls.jsonl")))
    assert "cannot make on-policy pairs" in msg
    sft = json.loads((out / "tiny_llama0" / "clinical" / "seed0" / "sft" / "phase.json").read_text())
    assert sft["done"]  # the SFT phase before the failed one is kept


@pytest.mark.slow  # a whole (tiny) study: seconds alone, longer on a busy machine
def test_interrupted_training_resumes(study, tiny_data):
    # a training phase that did not finish (Ctrl-C saves a checkpoint, phase.json says done: false) is resumed
    # from its checkpoint by the same command, not started over
    ckpt, out = study
    main(study_args(ckpt, tiny_data, out))  # settle on the default beta again
    phase = out / "tiny_llama0" / "clinical" / "seed0" / "dpo" / "phase.json"
    state = json.loads(phase.read_text())
    phase.write_text(json.dumps({**state, "done": False, "seconds_before": 1.0}))
    main(study_args(ckpt, tiny_data, out))
    log = (out / "study.log").read_text().splitlines()
    assert any("[run] dpo (resuming)" in x for x in log[-12:])
    assert [p for p, a in ran_phases(out) if a == "run"] == ["dpo"]  # same adapter: its evaluation is kept
    assert json.loads(phase.read_text())["done"]


@pytest.mark.slow  # a whole (tiny) study: seconds alone, longer on a busy machine
def test_per_task_design(tiny_llama, tiny_data, tmp_path):
    ckpt, _ = tiny_llama
    data = tmp_path / "data" / "triage"
    data.mkdir(parents=True)
    for kind in ("sft", "dpo", "test"):
        rows = [x for x in (tiny_data / f"{kind}.jsonl").read_text().splitlines() if '"triage"' in x]
        (data / f"{kind}.jsonl").write_text("\n".join(rows) + "\n")
    main(study_args(ckpt, None, tmp_path / "out", "--per-task", "--tasks", "triage",
                    "--data-dir", str(tmp_path / "data")))
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["unit"] for r in rep["table"]] == ["triage", "triage"]
    assert "| triage | **provider_f1** |" in (tmp_path / "out" / "report.md").read_text()


def test_prefixed_flags_and_config_file(tmp_path):
    conf = tmp_path / "study.json"
    conf.write_text(json.dumps({"study": {"seeds": "0,1"}, "dpo": {"beta": 0.5, "lr": 1e-5}}))
    cfg = parse_args(["--config", str(conf), "--dpo.beta", "0.2", "--sft.no-merge", "--sft.epochs=2"])
    assert cfg.seed_list() == [0, 1]
    assert cfg.train == {"dpo": {"beta": 0.2, "lr": 1e-5}, "sft": {"merge": False, "epochs": 2.0}}


def test_each_design_sets_its_own_defaults_and_flags_win(tmp_path):
    # per task: SFT one epoch, otherwise the mixed design's tuned settings (SFT three epochs, DPO without NLL)
    def settings(argv):
        cfg = parse_args(argv)
        sft = train_config(cfg, METHODS["sft"], 0, tmp_path / "d.jsonl", tmp_path / "s", None)
        dpo = train_config(cfg, METHODS["dpo"], 0, tmp_path / "d.jsonl", tmp_path / "d", tmp_path / "s")
        return sft.epochs, dpo.sft_weight, dpo.epochs
    assert settings([]) == (3.0, 0.0, 1.0)
    assert settings(["--dpo.sft-weight", "1"]) == (3.0, 1.0, 1.0)
    assert settings(["--per-task"]) == (1.0, 0.0, 1.0)
    assert settings(["--per-task", "--dpo.sft-weight", "1", "--sft.epochs", "2"]) == (2.0, 1.0, 1.0)


def test_phase_lock_waits_for_a_live_process_and_clears_a_dead_ones(tmp_path):
    import subprocess
    import sys

    from minift.study.phases import Phase

    logs = []
    phase = Phase(tmp_path / "p", "p", {"a": 1}, logs.append)
    lock = tmp_path / ".p.lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(str(dead.pid))  # a lock left by a process that died: cleared, the phase runs
    assert phase.run(lambda resume: {"x": 1})["x"] == 1 and not lock.exists()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)"])
    lock.write_text(str(live.pid))  # a live holder: waited for; the phase is then found done and skipped
    import threading

    threading.Thread(target=live.wait, daemon=True).start()  # reap it when it exits (a zombie looks alive)
    assert phase.run(lambda resume: {"x": 2})["x"] == 1
    assert any(m.startswith("[wait]") for m in logs) and any(m.startswith("[skip]") for m in logs)
