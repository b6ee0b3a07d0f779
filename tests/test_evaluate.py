"""Statistics (macro-F1, exact McNemar, paired bootstrap) and the evaluator: errors, a smoke run on a tiny
random model, batching invariance, and `compare` / `rescore` (minift/eval/compare.py)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minift.tasks import stats

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------- statistics
def test_macro_f1_by_hand():
    # Confusion matrix (rows gold, columns predicted) over labels a, b, c:
    #        a  b  c
    #   a    3  1  0      F1(a) = 2*3 / (2*3 + fp 1 + fn 1)     = 6/8 = 0.75
    #   b    1  2  1      F1(b) = 2*2 / (2*2 + fp 1+1 + fn 1+1) = 4/8 = 0.5
    #   c    0  1  1      F1(c) = 2*1 / (2*1 + fp 1 + fn 1)     = 2/4 = 0.5
    # macro-F1 = (0.75 + 0.5 + 0.5) / 3 = 0.583333...
    cells = {("a", "a"): 3, ("a", "b"): 1, ("b", "a"): 1, ("b", "b"): 2, ("b", "c"): 1, ("c", "b"): 1,
             ("c", "c"): 1}
    gold = [g for (g, p), n in cells.items() for _ in range(n)]
    pred = [p for (g, p), n in cells.items() for _ in range(n)]
    assert stats.macro_f1(gold, pred, "abc") == pytest.approx(1.75 / 3, abs=1e-12)
    # the vectorized bootstrap statistic agrees on the full sample
    full = np.arange(len(gold))[None]
    assert stats.macro_f1_stat(gold, pred, "abc")(full)[0] == pytest.approx(1.75 / 3, abs=1e-12)
    # an unparseable prediction (None) is a miss for its gold class, a false positive for none
    assert stats.macro_f1(["a", "b"], [None, "b"], "ab") == pytest.approx((0 + 1) / 2)


def test_mcnemar_textbook_example():
    # Bentur et al. 2009, as analysed by Fagerland, Lydersen & Laake (BMC Med Res Methodol 2013;13:91,
    # Table 1): airway hyper-responsiveness before/after stem cell transplantation in 21 children,
    # discordant pairs 1 and 7. Published exact conditional McNemar p = 0.070; by hand
    # 2 * P(X <= 1 | n=8, 1/2) = 2 * (1 + 8) / 256 = 0.0703125.
    a = [1] * 1 + [1] * 1 + [0] * 7 + [0] * 12   # before: AHR in 2 children
    b = [1] * 1 + [0] * 1 + [1] * 7 + [0] * 12   # after: AHR in 8 children
    r = stats.mcnemar_exact(a, b)
    assert (r["n10"], r["n01"], r["n"]) == (1, 7, 21)
    assert r["p_value"] == pytest.approx(0.0703125, abs=1e-12)
    assert round(r["p_value"], 3) == 0.070


@pytest.mark.parametrize("n10,n01", [(0, 0), (3, 3), (0, 5), (12, 4), (30, 45)])
def test_mcnemar_against_binomial_sum(n10, n01):
    n = n10 + n01
    k = min(n10, n01)
    want = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    a = [1] * n10 + [0] * n01 + [1] * 5
    b = [0] * n10 + [1] * n01 + [1] * 5
    assert stats.mcnemar_exact(a, b)["p_value"] == pytest.approx(want, rel=1e-9)


def test_paired_bootstrap_covers_the_true_difference():
    # 200 simulated paired samples with a known mean difference 0.3 (a shared item effect makes the pairs
    # correlated, as two models on one test set are). Coverage of the 95% interval should be near 0.95;
    # with 200 trials its sampling sd is ~0.015, so [0.89, 0.99] fails only on a real error.
    rng = np.random.default_rng(1)
    hits, null_small_p = 0, 0
    for t in range(200):
        item = rng.normal(0, 1, 100)
        a = item + rng.normal(0, 0.5, 100)
        b = item + 0.3 + rng.normal(0, 0.5, 100)
        r = stats.paired_bootstrap(stats.mean_stat(a), stats.mean_stat(b), 100, n_boot=1000, seed=t)
        hits += r["ci_low"] <= 0.3 <= r["ci_high"]
        c = item + rng.normal(0, 0.5, 100)  # no true difference from a
        null_small_p += stats.paired_bootstrap(stats.mean_stat(a), stats.mean_stat(c), 100, 1000, t)["p_value"] < 0.05
    assert 0.89 <= hits / 200 <= 0.99
    assert null_small_p / 200 <= 0.12  # type I error near 0.05 (binomial sd ~0.015)
    # a large effect is significant
    r = stats.paired_bootstrap(stats.mean_stat(np.zeros(50)), stats.mean_stat(np.ones(50) * 0.5 +
                                                                               rng.normal(0, .1, 50)), 50, 2000)
    assert r["p_value"] < 0.001 and r["ci_low"] > 0.4


# ------------------------------------------------------------------------------------- the CLI
def _run(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "minift.evaluate", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def _assert_error(proc, words):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert words in lines[0], lines[0]


@pytest.mark.slow  # four interpreter starts (each imports torch)
def test_bad_input_gives_one_line_and_exit_2(tmp_path):
    _assert_error(_run("--task", "cardiology"), "unknown task 'cardiology'")
    no_tok = tmp_path / "ckpt"
    no_tok.mkdir()
    (no_tok / "config.json").write_text("{}")
    _assert_error(_run("--ckpt", str(no_tok), "--task", "triage", "--limit", "1"), "no tokenizer.json")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    _assert_error(_run("--task", "classification", "--data", str(empty)), "empty file")
    rows = [json.loads(line) for line in (ROOT / "minift/datasets/classification/test.jsonl").read_text().splitlines()[:3]]
    del rows[1]["label"]
    bad = tmp_path / "nolabel.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _assert_error(_run("--task", "classification", "--data", str(bad)), f"{bad}:2: missing 'label'")


@pytest.mark.slow  # two interpreter starts and 16 generations
def test_smoke_cli_on_tiny_model(tiny_llama, tmp_path):
    ckpt, _ = tiny_llama
    out = tmp_path / "run"
    proc = _run("--ckpt", str(ckpt), "--task", "all", "--limit", "4", "--out", str(out), "--max-new-tokens", "6")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["tasks"]) == {"classification", "reasoning", "summarization", "triage"}
    assert all(s["n"] == 4 for s in summary["tasks"].values())
    assert "macro_f1" in summary["tasks"]["classification"] and "rouge_l" in summary["tasks"]["summarization"]
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 16
    # a random model answers gibberish: unparseable answers are counted wrong and listed
    for p in preds:
        if not p["parsed"]:
            assert not p["correct"] and p["id"] in summary["tasks"][p["task"]]["unparsed"]
    # re-scoring the saved outputs reproduces the summary
    from minift.eval.compare import rescore

    again = rescore(str(out))
    assert again["tasks"] == summary["tasks"]
    # compare a run with itself: no difference, p = 1
    proc = _run("compare", str(out), str(out), "--n-boot", "200", "--out", str(tmp_path / "cmp.json"))
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "cmp.json").read_text())
    assert {r["test"] for r in res} == {"exact McNemar", "paired bootstrap"}
    assert all(r["diff"] == 0 and r["p_value"] == 1.0 for r in res)


def test_batching_does_not_change_answers(tiny_llama, tmp_path):
    import minift
    from minift.eval.evaluate import EvalConfig, evaluate

    ckpt, _ = tiny_llama
    model, tok = minift.load(str(ckpt))
    outs = []
    for bs in (1, 3):
        cfg = EvalConfig(ckpt=str(ckpt), task="triage", limit=5, batch_size=bs, out=str(tmp_path / f"b{bs}"),
                         max_new_tokens=5)
        evaluate(cfg, model, tok)
        outs.append([json.loads(x)["output"] for x in (tmp_path / f"b{bs}/predictions.jsonl").read_text().splitlines()])
    assert outs[0] == outs[1]


def _write_run(path, records):
    path.mkdir()
    (path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_compare_finds_a_real_improvement(tmp_path):
    from minift.eval.compare import compare
    from minift.errors import MinifTError

    labels = ["current", "past", "absent"] * 20
    a = [{"task": "classification", "id": str(i), "gold": g, "pred": "current", "correct": g == "current",
          "parsed": True} for i, g in enumerate(labels)]
    b = [dict(r, pred=r["gold"], correct=True) for r in a]
    _write_run(tmp_path / "a", a)
    _write_run(tmp_path / "b", b)
    res = {r["metric"]: r for r in compare(str(tmp_path / "a"), str(tmp_path / "b"), n_boot=2000)}
    assert res["accuracy"]["n01"] == 40 and res["accuracy"]["p_value"] < 1e-10
    assert res["macro_f1"]["diff"] == pytest.approx(1 - stats.macro_f1(labels, ["current"] * 60, labels[:3]))
    assert res["macro_f1"]["ci_low"] > 0 and res["macro_f1"]["p_value"] < 0.01
    _write_run(tmp_path / "c", a[:-1])
    with pytest.raises(MinifTError, match="different items"):
        compare(str(tmp_path / "a"), str(tmp_path / "c"))


def test_adapter_is_applied(tiny_llama, tmp_path):
    # An adapter with nonzero factors changes the model: evaluating with --adapter must reproduce the
    # answers of the in-memory adapted model and (here) differ from the plain model's.
    import torch

    import minift
    from minift.eval.evaluate import EvalConfig, evaluate, load_model
    from minift.model.lora import apply_lora, save_adapter

    ckpt, _ = tiny_llama
    model, tok = minift.load(str(ckpt))
    cfg = EvalConfig(ckpt=str(ckpt), task="classification", limit=3, max_new_tokens=6, out=str(tmp_path / "plain"))
    plain = evaluate(cfg, model, tok)
    apply_lora(model, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.5)  # large enough to move greedy tokens of a random model
    save_adapter(model, tmp_path / "adapter")
    adapted = evaluate(EvalConfig(**dict(vars(cfg), out=str(tmp_path / "mem"))), model, tok)
    cfg_file = EvalConfig(**dict(vars(cfg), adapter=str(tmp_path / "adapter"), out=str(tmp_path / "file")))
    m2, t2 = load_model(cfg_file)
    from_file = evaluate(cfg_file, m2, t2)

    def outs(run):
        return [json.loads(x)["output"] for x in (Path(run["out"]) / "predictions.jsonl").read_text().splitlines()]

    assert outs(from_file) == outs(adapted)
    assert outs(adapted) != outs(plain)


def test_preference_rows_are_scored_against_their_chosen_answer(tmp_path):
    """`--split dpo` (or a DPO file as --data): a held-out pair is a test item whose gold answer is its chosen."""
    from minift.eval.evaluate import EvalConfig, load_items

    root = Path(__file__).resolve().parents[1] / "minift" / "datasets"
    rows = [json.loads(line) for t in ("reasoning", "triage") for line in (root / t / "dpo.jsonl").read_text().splitlines()[:2]]
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = load_items(EvalConfig(task="all", data=[str(f), str(root / "classification" / "test.jsonl")], limit=3))
    assert sorted(items) == ["classification", "reasoning", "triage"]  # a list of files is read in turn
    for r in rows:
        got = next(i for i in items[r["task"]] if i["id"] == r["id"])
        assert got["answer"] == r["chosen"][-1]["content"] != r["rejected"][-1]["content"]
