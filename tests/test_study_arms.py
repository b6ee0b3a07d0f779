"""The study's compute-matched control arm (sft-more) and what the report says each preference arm did."""
import json

import pytest

from minift.study.diagnostics import arm_diagnostics
from minift.study.run import main


def _metrics(tmp_path, first, last):
    d = tmp_path / "arm"
    d.mkdir()
    rows = [{"step": 0, **{f"eval/{k}": v for k, v in first.items()}}, {"step": 5, "loss": 0.5},
            {"step": 10, **{f"eval/{k}": v for k, v in last.items()}}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 11, "lo')  # torn line
    return d


@pytest.mark.parametrize("last,word", [
    ({"rewards/margins": 0.05, "rewards/chosen": 0.0, "rewards/rejected": -0.05}, "barely trained"),
    ({"rewards/margins": 0.8, "rewards/chosen": -0.3, "rewards/rejected": -1.1}, "displacement"),
    ({"rewards/margins": 0.8, "rewards/chosen": -0.05, "rewards/rejected": -0.85}, "trained: margin 0.00 -> 8.00"),
])
def test_the_verdict_follows_its_rule(tmp_path, last, word):
    # beta 0.1: rewards / beta are nats. Displacement: the chosen answers lost 3 nats (> 1) while the margin grew.
    d = _metrics(tmp_path, {"rewards/margins": 0.0, "rewards/chosen": 0.0, "rewards/rejected": 0.0,
                            "rewards/accuracies": 0.5}, {**last, "rewards/accuracies": 0.9})
    out = arm_diagnostics({"loss": "sigmoid", "beta": 0.1}, d)
    assert out["verdict"].startswith(word), out["verdict"]
    assert out["margin_end"] == pytest.approx(last["rewards/margins"] / 0.1)
    assert out["chosen_change"] == pytest.approx(last["rewards/chosen"] / 0.1)


def test_an_arm_without_eval_is_said_to_be_unjudged(tmp_path):
    d = tmp_path / "arm"
    d.mkdir()
    (d / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n')
    assert "nothing to judge" in arm_diagnostics({"loss": "sigmoid", "beta": 0.1}, d)["verdict"]


@pytest.mark.slow  # a tiny study with three arms
def test_control_arm_matches_dpo_flops_from_the_sft_adapter(tiny_llama, tiny_data, tmp_path):
    ckpt, out = tiny_llama[0], tmp_path / "study"
    main(["--ckpt", str(ckpt), "--out", str(out), "--limit", "2", "--max-new-tokens", "4",
          "--methods", "sft,dpo,sft-more", "--sft.data", str(tiny_data / "sft.jsonl"),
          "--dpo.data", str(tiny_data / "dpo.jsonl"), "--test-data", str(tiny_data / "test.jsonl"),
          "--sft.max-steps", "2", "--dpo.max-steps", "6", "--sft.eval-every", "0", "--dpo.eval-every", "3",
          "--sft.batch-size", "2", "--dpo.batch-size", "2", "--sft-more.batch-size", "2",
          "--sft-more.eval-every", "0"])
    report = json.loads((out / "report.json").read_text())
    comp = next(iter(report["compute"].values()))
    dpo, more, sft = comp["dpo"], comp["sft-more"], comp["sft"]
    step = sft["train"] / sft["examples_seen"] * 2  # FLOPs of one control step (2 examples)
    assert abs(more["train"] - (dpo["train"] + dpo["reference"])) <= step / 2 + 1  # rounded to the nearest step
    assert more["steps"] > 2  # a DPO step (two answers per row, and the reference pass) costs more than an SFT one
    seed = out / ckpt.name / "clinical" / "seed0"
    assert json.loads((seed / "sft-more" / "phase.json").read_text())["config"]["adapter"] == "tiny_llama0/clinical/seed0/sft"
    row = next(r for r in report["table"] if r["primary"])
    assert "sft-more_vs_sft" in row and "dpo_vs_sft-more" in row
    md = (out / "report.md").read_text()
    assert "DPO - sft-more" in md and "## What each preference arm did" in md
    diag = next(iter(report["diagnostics"].values()))
    assert set(diag) == {"dpo"} and diag["dpo"]["step_start"] == 0 and diag["dpo"]["step_end"] == 6
    assert 0 <= diag["dpo"]["changed_vs_sft"] <= 1


def test_against_sft_counts_changed_answers_and_length_per_task(tmp_path):
    from minift.study.diagnostics import against_sft, verdict

    def run(name, outputs):
        d = tmp_path / name
        d.mkdir()
        rows = [{"task": t, "id": i, "output": o} for (t, i), o in outputs.items()]
        (d / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return d
    sft = run("sft", {("summarization", "a"): "one two three four", ("summarization", "b"): "five six",
                      ("classification", "c"): "past"})
    dpo = run("dpo", {("summarization", "a"): "one two three four", ("summarization", "b"): "five six seven eight",
                      ("classification", "c"): "absent"})
    got = against_sft(dpo, sft)
    assert got["changed_vs_sft"] == 2 / 3
    assert got["length_vs_sft"] == {"classification": 1.0, "summarization": 8 / 6}
    line = verdict({"loss": "sigmoid", "margin_start": 0.0, "margin_end": 2.0, **got})
    assert line.startswith("trained") and "summarization 1.33x" in line and "classification" not in line
