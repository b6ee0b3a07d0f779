"""Preference pairs: label diagnostics (counted by hand) and on-policy pairs (every rejected answer is a
sample that scores wrong, every chosen the gold; fallbacks counted; a model with no parseable answer is an
error)."""
import json

import pytest

from minift.errors import MinifTError
from minift.study.pairs import (diagnostics_lines, imbalance_warnings, label_counts, model_sampler, on_policy_pairs,
                          read_pairs, write_pairs)
from minift.tasks import build


def _pair(task, chosen, rejected, **fields):
    return {"task": task, "prompt": [{"role": "user", "content": "q"}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], **fields}


def test_label_counts_by_hand():
    rows = [_pair("triage", "provider: nurse; urgency: urgent", "provider: physician; urgency: urgent"),
            _pair("triage", "provider: nurse; urgency: routine", "provider: nurse; urgency: urgent"),
            _pair("triage", "provider: scheduling; urgency: routine", "provider: nurse; urgency: routine"),
            _pair("classification", "past", "current")]
    c = label_counts(rows)
    # nurse: chosen twice, rejected once (the urgency-only pair does not reject its provider)
    assert c["triage"]["provider"] == {"nurse": [2, 1], "physician": [0, 1], "scheduling": [1, 0]}
    assert c["triage"]["urgency"] == {"urgent": [1, 1], "routine": [2, 0]}
    assert c["classification"]["label"] == {"past": [1, 0], "current": [0, 1]}
    assert any("triage provider (chosen/rejected): nurse 2/1" in s for s in diagnostics_lines(c))


def test_imbalance_warning_fires_on_a_label_prior_only():
    # scheduling: chosen 1/4 of the time, never rejected -> warned; a balanced set -> no warning
    skew = {"triage": {"provider": {"nurse": [10, 20], "physician": [10, 10], "pharmacist": [10, 10],
                                    "scheduling": [10, 0]}}}
    msgs = imbalance_warnings(skew)
    assert any("'nurse'" in m for m in msgs) and any("'scheduling'" in m for m in msgs)
    assert not any("'physician'" in m for m in msgs)
    even = {"triage": {"provider": {k: [10, 9] for k in ("nurse", "physician", "pharmacist", "scheduling")}}}
    assert imbalance_warnings(even) == []


def test_bundled_pairs_raise_no_warning():
    rows = build.build(seed=0)["clinical"]["dpo"]
    assert imbalance_warnings(label_counts(rows)) == []


def test_read_pairs_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(MinifTError, match="empty"):
        read_pairs(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    with pytest.raises(MinifTError, match=r"bad.jsonl:1: .*rejected"):
        read_pairs(bad)
    with pytest.raises(MinifTError, match="not found"):
        read_pairs(tmp_path / "nope.jsonl")


def test_on_policy_pairs_with_scripted_samples(tmp_path):
    rows = build.build(seed=0)["clinical"]["dpo"][:8]  # two rows of each task, with their gold fields
    gold = {r["id"]: r["chosen"][0]["content"] for r in rows}

    def wrong(r):
        return {"classification": lambda: next(x for x in ("current", "past", "absent") if x != r["label"]),
                "reasoning": lambda: next(f"{x}. something" for x in "ABCDE" if x != r["label"]),
                "summarization": lambda: "A patient was seen.",
                "triage": lambda: "provider: nurse; urgency: " + ("routine" if r["labels"]["urgency"] == "urgent"
                                                                 else "urgent")}[r["task"]]()

    calls = []

    def sample(batch, max_new_tokens, seed, k):
        calls.append((seed, k))
        # even-indexed rows of the set: always right (falls back to the bundled pair); odd: the 2nd sample is
        # wrong
        return [[gold[r["id"]] if rows.index(r) % 2 == 0 or j == 0 else wrong(r) for j in range(k)]
                for r in batch]

    out, sources = on_policy_pairs(rows, sample, k=3, seed=0)
    assert calls == [(0, 3)] * 4  # one call per task, all k samples at once
    assert sources == {"on-policy": 4, "bundled": 4}
    from minift.tasks import TASKS
    for r, o in zip(rows, out):
        assert o["chosen"] == r["chosen"]
        rej = o["rejected"][0]["content"]
        rec = TASKS[r["task"]].score(dict(r, answer=gold[r["id"]]), rej)
        if o["source"] == "on-policy":
            assert rej == wrong(r) and not rec["correct"] and rec["parsed"]
        else:
            assert o["rejected"] == r["rejected"]
    write_pairs(tmp_path / "p.jsonl", out)
    assert [json.loads(x)["source"] for x in (tmp_path / "p.jsonl").read_text().splitlines()] == \
        [o["source"] for o in out]


def test_on_policy_pairs_refuse_a_model_without_answers(tiny_llama):
    # a random tiny model with a byte tokenizer emits noise: no sample names an answer -> one clear error
    import minift

    ckpt, _ = tiny_llama
    model, tok = minift.load(str(ckpt))
    rows = [r for r in build.build(seed=0)["clinical"]["dpo"] if r["task"] == "classification"][:2]
    with pytest.raises(MinifTError, match="cannot make on-policy pairs"):
        on_policy_pairs(rows, model_sampler(model.eval(), tok, temperature=1.0), k=1, seed=0)


def test_on_policy_pairs_need_task_fields():
    row = _pair("classification", "past", "current")  # no gold 'label' field
    with pytest.raises(MinifTError, match="missing 'label'"):
        on_policy_pairs([row], lambda b, m, s, k: [["past"] * k] * len(b), k=1)
