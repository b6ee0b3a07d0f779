"""`python -m minift.study --tune`: trials from a declared space, the same number for every arm, scored on the
validation files alone (the tuning runs with no test file on disk), resumable, and reproducible (same seed, same
pick); bad tuning input refused before anything trains."""
import json
from pathlib import Path

import pytest

from minift import cli
from minift.study.config import StudyConfig, METHODS, TUNED_MIXED
from minift.study import tune
from minift.study.tune import SPACES, best, trained, trial_settings

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "minift" / "datasets"
TASKS = ("classification", "reasoning", "summarization", "triage")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A data dir laid out like minift/datasets/ with training and validation files and NO test files."""
    d = tmp_path_factory.mktemp("tune_data")

    def cut(src, n, dst):  # short prompts: the tiny model's byte tokenizer makes long sequences
        rows = [json.loads(x) for x in src.read_text().splitlines()][:n]
        for r in rows:
            r["prompt"][0]["content"] = r["prompt"][0]["content"][:40]
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for kind in ("sft", "dpo"):
        cut(DATA / "clinical" / f"{kind}.jsonl", 8, d / "clinical" / f"{kind}.jsonl")
    for task in TASKS:
        cut(DATA / task / "val.jsonl", 2, d / task / "val.jsonl")
    return d


def argv(ckpt, d, out, *extra):
    return ["--ckpt", str(ckpt), "--out", str(out), "--data-dir", str(d), "--limit", "2", "--max-new-tokens", "3",
            "--tune-only", "--tune-trials", "2", "--sft.max-steps", "2", "--dpo.max-steps", "2",
            "--sft.eval-every", "0", "--dpo.eval-every", "2", "--sft.batch-size", "2", "--dpo.batch-size", "2", *extra]


def test_trials_start_from_the_default_and_draw_the_rest_reproducibly():
    cfg = StudyConfig()
    a = trial_settings(cfg, METHODS["dpo"], SPACES["dpo"], 4, seed=0)
    assert a == trial_settings(cfg, METHODS["dpo"], SPACES["dpo"], 4, seed=0)
    assert {k: a[0][k] for k in TUNED_MIXED["dpo"]} == TUNED_MIXED["dpo"]  # the mixed design's defaults
    assert len({json.dumps(t, sort_keys=True) for t in a}) == 4  # distinct
    for t in a[1:]:
        assert all(t[k] in SPACES["dpo"][k] for k in t)
    assert a != trial_settings(cfg, METHODS["dpo"], SPACES["dpo"], 4, seed=1)  # the seed draws them
    # stratified: every value of a setting is tried before one of its values repeats
    for k, values in SPACES["dpo"].items():
        assert {t[k] for t in a[:len(values)]} == set(values), k


def test_the_per_task_design_tunes_sft_over_one_pass_from_its_own_default():
    # its SFT trains once over a task's rows (time), so its space is the learning rate at one epoch; the
    # default (trial 0) is a point of that space and the mixed design's picks for everything else
    cfg = StudyConfig(per_task=True, tune=True)
    space = tune.spaces(cfg)
    assert space["sft"]["epochs"] == [1.0] and space["dpo"] == SPACES["dpo"]
    sft = trial_settings(cfg, METHODS["sft"], space["sft"], 3, seed=0)
    assert sft[0] == {"lr": TUNED_MIXED["sft"]["lr"], "epochs": 1.0}
    assert sorted(t["lr"] for t in sft) == sorted(space["sft"]["lr"])
    dpo = trial_settings(cfg, METHODS["dpo"], space["dpo"], 2, seed=0)
    assert dpo[0] == TUNED_MIXED["dpo"]


def test_a_preference_trial_that_did_not_train_is_not_a_candidate():
    # the best score among the trials whose held-out margin reached the bar; none reached it: the best of all
    assert best([{"score": 0.55, "trained": False}, {"score": 0.52, "trained": True},
                 {"score": 0.53, "trained": True}]) == 2
    assert best([{"score": 0.5, "trained": False}, {"score": 0.6, "trained": False}]) == 1
    assert best([{"score": 0.5}, {"score": 0.5}]) == 0  # SFT trials (no margin); ties: the earlier
    assert not trained({"loss": "sigmoid"}, 1.34, 2.0) and trained({"loss": "sigmoid"}, 2.56, 2.0)
    assert trained({"loss": "sigmoid"}, 1.34, 0.0)  # --tune-min-margin 0: every trial
    assert trained({"loss": "simpo"}, 0.1, 2.0)  # its margin is not in nats: not gated


def test_the_tuning_table_says_when_no_preference_trial_trained():
    from minift.study.report import tune_md

    row = lambda score, ok: {"settings": {"lr": 1e-5}, "scores": {"triage": score}, "score": score, "collapse": [],
                             "diagnostics": "barely trained: margin 0.00 -> 0.50 nats", "trained": ok}
    arm = {"space": {"lr": [1e-5]}, "trials": [row(0.5, False), row(0.6, False)], "pick": 1, "min_margin": 2.0}
    md = "\n".join(tune_md({"m/clinical": {"seed": 0, "trials": 2, "arms": {"dpo": arm}}}))
    assert "at least 2 nats" in md
    assert md.count("not a candidate") == 1 and md.count("no trial reached it, so the best of all") == 1


@pytest.mark.slow  # three tiny tunings
def test_tune_picks_on_validation_alone_reproducibly_and_resumes(tiny_llama, data_dir, tmp_path, capsys):
    assert not list(data_dir.rglob("test.jsonl"))  # no test file to read
    ckpt = tiny_llama[0]
    picks = []
    for out in (tmp_path / "a", tmp_path / "b"):
        cli.study(argv(ckpt, data_dir, out))
        tune = json.loads((out / "tune.json").read_text())
        (unit,) = tune.values()
        assert list(unit["arms"]) == ["sft", "dpo"]
        for arm, a in unit["arms"].items():
            assert len(a["trials"]) == 2  # the same budget for every arm
            pool = [t for t in a["trials"] if t.get("trained", True)] or a["trials"]  # (tune.best)
            assert a["trials"][a["pick"]]["score"] == max(t["score"] for t in pool)
            for t in a["trials"][1:]:
                assert all(v in SPACES[arm][k] for k, v in t["settings"].items() if k in SPACES[arm])
            assert set(a["trials"][0]["scores"]) == set(TASKS)
        # the DPO trials start from the picked SFT trial (their reference), and say what they did
        dpo0 = json.loads(Path(unit["arms"]["dpo"]["trials"][0]["dir"], "phase.json").read_text())["config"]
        assert dpo0["adapter"] == str(Path(unit["arms"]["sft"]["trials"][unit["arms"]["sft"]["pick"]]["dir"])
                                      .relative_to(out))
        assert "margin" in unit["arms"]["dpo"]["trials"][0]["diagnostics"]
        md = (out / "tune.md").read_text()
        assert "2 trials" in md and "**" in md and "(default)" in md
        assert not (out / "report.md").exists()  # --tune-only: no test evaluation
        picks.append({arm: (a["pick"], [t["score"] for t in a["trials"]]) for arm, a in unit["arms"].items()})
    assert picks[0] == picks[1]  # same seed, same trials, same scores, same pick
    capsys.readouterr()
    cli.study(argv(ckpt, data_dir, tmp_path / "a"))  # a rerun trains nothing
    log = capsys.readouterr().out
    assert "[run]" not in log and log.count("[skip]") >= 8, log


@pytest.mark.slow  # a tiny tuning, then the study with its picks
def test_the_study_runs_with_the_picked_settings(tiny_llama, data_dir, tiny_data, tmp_path, monkeypatch):
    out, ckpt = tmp_path / "study", tiny_llama[0]
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"sft": {"lr": [1e-3, 3e-3]}}))
    real = tune.trial_settings

    def off_default(cfg, method, space, n, seed):  # trials without the default, so that a pick is not the default
        return real(cfg, method, space, n + 1, seed)[1:]
    monkeypatch.setattr(tune, "trial_settings", off_default)
    args = [a for a in argv(ckpt, data_dir, out, "--tune-space", str(space), "--test-data",
                            str(tiny_data / "test.jsonl")) if a != "--tune-only"]
    cli.study(args + ["--tune"])
    report = json.loads((out / "report.json").read_text())
    (unit,) = report["tune"].values()
    sft_pick = unit["arms"]["sft"]["trials"][unit["arms"]["sft"]["pick"]]["settings"]
    dpo_pick = unit["arms"]["dpo"]["trials"][unit["arms"]["dpo"]["pick"]]["settings"]
    seed = out / ckpt.name / "clinical" / "seed0"
    sft = json.loads((seed / "sft" / "phase.json").read_text())["config"]
    dpo = json.loads((seed / "dpo" / "phase.json").read_text())["config"]
    assert sft_pick["lr"] != TUNED_MIXED["sft"]["lr"] and sft["lr"] == sft_pick["lr"]  # (not the default)
    assert dpo_pick != TUNED_MIXED["dpo"] and {k: dpo[k] for k in dpo_pick} == dpo_pick
    assert "## Tuning (validation set)" in (out / "report.md").read_text()


SPACE_CASES = {  # (--tune-space content or None, extra flags, a phrase the error line must hold)
    "empty space": ({"dpo": {}}, [], "empty search space"),
    "empty values": ({"dpo": {"lr": []}}, [], "non-empty list"),
    "setting that does not exist": ({"dpo": {"learning_rate": [1e-5, 2e-5]}}, [], "learning_rate"),
    "arm not in --methods": ({"simpo": {"lr": [1e-5, 2e-5]}}, [], "simpo"),
    "control arm": ({"sft-more": {"lr": [1e-5, 2e-5]}}, ["--methods", "sft,dpo,sft-more"], "control arm"),
    "bad value": ({"dpo": {"beta": [0.1, -1.0]}}, [], "beta"),
    "space smaller than the budget": ({"dpo": {"lr": [1e-5, 2e-5]}}, ["--tune-trials", "4"], "--tune-trials"),
    "every setting fixed by a flag": ({"dpo": {"lr": [1e-5, 2e-5]}}, ["--dpo.lr", "5e-5"], "fixed"),
    "not JSON": ("{dpo: lr}", [], "not JSON"),
    "space file missing": (None, ["--tune-space", "{d}/nothing.json"], "nothing.json"),
    "tune-trials 0": (None, ["--tune-trials", "0"], "--tune-trials"),
    "negative margin bar": (None, ["--tune-min-margin", "-1"], "--tune-min-margin"),
}


@pytest.mark.parametrize("case", SPACE_CASES)
def test_bad_tuning_input_is_refused_before_anything_trains(case, tiny_llama, data_dir, tmp_path, capsys):
    space, extra, phrase = SPACE_CASES[case]
    if space is not None:
        (tmp_path / "space.json").write_text(space if isinstance(space, str) else json.dumps(space))
        extra = ["--tune-space", str(tmp_path / "space.json"), *extra]
    extra = [x.replace("{d}", str(tmp_path)) for x in extra]
    out = tmp_path / "study"
    with pytest.raises(SystemExit) as e:
        cli.study(argv(tiny_llama[0], data_dir, out, *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert phrase in err[0], err[0]
    assert not out.exists()


def test_a_missing_validation_file_is_refused(tiny_llama, data_dir, tmp_path, capsys):
    d = tmp_path / "data"
    (d / "clinical").mkdir(parents=True)
    for kind in ("sft", "dpo"):
        (d / "clinical" / f"{kind}.jsonl").write_text((data_dir / "clinical" / f"{kind}.jsonl").read_text())
    for task in TASKS[:3]:  # triage/val.jsonl missing
        (d / task).mkdir()
        (d / task / "val.jsonl").write_text((data_dir / task / "val.jsonl").read_text())
    with pytest.raises(SystemExit) as e:
        cli.study(argv(tiny_llama[0], d, tmp_path / "study"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "triage/val.jsonl" in err[0] and "validation" in err[0], err
    assert not (tmp_path / "study").exists()
