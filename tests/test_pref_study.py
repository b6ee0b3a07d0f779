"""The study with the SimPO, ORPO and KTO arms on a tiny random model: each arm trains, is evaluated and tested
against SFT in the report, and its compute counts the reference pass it runs (none for SimPO and ORPO)."""
import json
from pathlib import Path

import pytest

from minift.study.config import METHODS
from minift.study.run import main

ROOT = Path(__file__).resolve().parent.parent
ARMS = ("simpo", "orpo", "kto")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A few bundled rows of each kind, prompts cut short (the tiny model's byte tokenizer makes long rows)."""
    out = tmp_path_factory.mktemp("pref_study_data")
    for kind in ("sft", "dpo", "test"):
        rows = [json.loads(x) for x in (ROOT / "minift" / "datasets" / "clinical" / f"{kind}.jsonl").read_text().splitlines()][:8]
        for r in rows:
            r["prompt"][0]["content"] = r["prompt"][0]["content"][:40]
        (out / f"{kind}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def test_arms_start_where_the_methods_do():
    assert (METHODS["simpo"].start, METHODS["orpo"].start, METHODS["kto"].start) == ("sft", "base", "sft")
    assert {m: METHODS[m].fixed["loss"] for m in ARMS} == {m: m for m in ARMS}


@pytest.mark.slow  # a whole (tiny) study with four trained arms
def test_study_with_simpo_orpo_kto(tiny_llama, tiny_data, tmp_path):
    ckpt, _ = tiny_llama
    args = ["--ckpt", str(ckpt), "--out", str(tmp_path), "--limit", "2", "--max-new-tokens", "4",
            "--test-data", str(tiny_data / "test.jsonl"), "--methods", "sft," + ",".join(ARMS),
            "--sft.data", str(tiny_data / "sft.jsonl")]
    for arm in ("sft",) + ARMS:
        args += [f"--{arm}.max-steps", "1", f"--{arm}.eval-every", "0", f"--{arm}.batch-size", "2"]
        if arm != "sft":
            args += [f"--{arm}.data", str(tiny_data / "dpo.jsonl")]
    main(args)
    rep = json.loads((tmp_path / "report.json").read_text())
    row = rep["table"][0]
    for arm in ARMS:
        assert len(row[arm]) == 1 and len(row[f"{arm}_vs_sft"]) == 1  # its metric, and its test against SFT
    comp = rep["compute"][next(iter(rep["compute"]))]
    assert comp["simpo"]["reference"] == comp["orpo"]["reference"] == 0  # no reference pass at all
    assert comp["kto"]["reference"] > 0 and comp["kto"]["train"] > 0  # KTO's cached reference, as DPO's
    md = (tmp_path / "report.md").read_text()
    assert all(f"| {arm} |" in md for arm in ARMS)  # a row of the compute table per arm
