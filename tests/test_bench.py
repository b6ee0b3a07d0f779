"""Smoke runs of bench/bench_step.py and bench/bench_peers.py: the scripts run end to end on a tiny random model
and write JSON with every field, sane values, and the equal-loss checks that prove the variants do the same work.
No timing assertions (the machine is shared)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["sft_naive", "sft", "dpo_naive", "dpo_fused", "dpo_completion", "dpo_shared", "dpo_unpadded", "dpo_cached",
            "simpo", "orpo", "kto", "ref_pass"]


def run(script, tmp_path):
    out = tmp_path / f"{script}.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / f"{script}.py"), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.with_suffix(".png").stat().st_size > 1000  # the chart was drawn
    return json.loads(out.read_text()), proc.stdout


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_step_smoke(tmp_path):
    data, stdout = run("bench_step", tmp_path)
    cond = data["conditions"]
    for key in ("device", "cpu", "threads", "dtype", "torch", "triton", "model", "matmul_peak_gflops",
                "flop_model", "memory_method"):
        assert key in cond, key
    assert positive(cond["matmul_peak_gflops"])
    assert set(data["results"]) == {"clinical", "balanced"}
    for shape, res in data["results"].items():
        rows = {r["variant"]: r for r in res["rows"]}
        assert list(rows) == VARIANTS
        for v, r in rows.items():
            for key in ("step_s", "tokens_per_s", "gflop", "mfu", "ratio_vs_sft", "pred_vs_sft"):
                assert positive(r[key]), (shape, v, key, r[key])
            assert isinstance(r["peak_bytes"], int), (shape, v)
            assert r["flops"]["total"] == pytest.approx(sum(r["flops"][k] for k in ("body", "lora", "attention",
                                                                                      "vocab")))
            if v in ("ref_pass", "simpo", "orpo", "kto"):  # not a step / another loss: no naive loss to compare
                assert r["dloss_vs_naive"] is None
                continue
            # fp32 sums in different orders (chunked kernel, other layout): equal to ~1e-6 of a loss near 0.7-5.6
            assert r["dloss_vs_naive"] < 1e-4, (shape, v, r["dloss_vs_naive"])
        flops = {v: r["flops"]["total"] for v, r in rows.items()}
        # The FLOP model's order: a live reference costs a forward; cutting rows, the prompt or the reference saves
        assert flops["dpo_naive"] == flops["dpo_fused"] > flops["dpo_completion"] > flops["dpo_shared"] \
            >= flops["dpo_unpadded"] > flops["dpo_cached"] > flops["sft"]
        # balanced rows are all one length (nothing to skip); clinical pairs differ, so their rows carry pads
        assert (flops["dpo_shared"] > flops["dpo_unpadded"]) == (shape == "clinical")
        assert flops["sft_naive"] > flops["sft"]
        # the cache build is the no-grad reference pass that dpo_unpadded runs in every step
        assert flops["ref_pass"] == pytest.approx(flops["dpo_unpadded"] - flops["dpo_cached"])
        # SimPO and ORPO: the cached DPO step's one training pass, no reference; KTO: 2P rows [prompt | y | y']
        assert flops["simpo"] == flops["orpo"] == flops["dpo_cached"] < flops["kto"]
        spread = rows["dpo_cached"]["ratio_vs_sft_with_cache_build"]
        assert spread["1"] > spread["3"] > rows["dpo_cached"]["ratio_vs_sft"]
        assert 2 < rows["dpo_naive"]["pred_vs_sft_naive"] < 3.2  # 2 rows + a no-grad forward of each
        assert res["data"]["concat_rows_x_T"][0] == 2 * res["data"]["shared_rows_x_T"][0]
    assert "dpo_shared" in stdout and "wrote" in stdout


def test_bench_peers_smoke(tmp_path):
    pytest.importorskip("trl")
    data, stdout = run("bench_peers", tmp_path)
    assert {"device", "cpu", "threads", "dtype", "torch", "trl", "peft", "transformers"} <= set(data["conditions"])
    rows = {r["key"]: r for r in data["results"]}
    runs = ["trl_sft", "minift_sft", "trl_dpo", "minift_dpo", "minift_dpo_cached"]
    assert set(rows) == set(runs) | {r + "_gc" for r in runs}  # each without and with gradient checkpointing
    for key, r in rows.items():
        assert not r.get("skipped"), r
        for field in ("steps_per_s", "tokens_per_s", "loss0"):
            assert positive(r[field]), (key, field, r[field])
        assert isinstance(r["peak_bytes"], int)
    # The same work on both sides: the same step-0 loss (fp32, different kernels and summation orders)
    for gc in ("", "_gc"):
        assert rows["minift_sft" + gc]["checkpointing"] == rows["trl_sft" + gc]["checkpointing"] == (gc == "_gc")
        assert abs(rows["minift_sft" + gc]["loss0"] - rows["trl_sft" + gc]["loss0"]) < 1e-4
        for key in ("minift_dpo", "minift_dpo_cached"):
            assert abs(rows[key + gc]["loss0"] - rows["trl_dpo" + gc]["loss0"]) < 1e-4
    # ... and not a trivial one: the starting adapter makes the policy differ from the reference
    assert abs(rows["trl_dpo"]["loss0"] - math.log(2)) > 1e-3
    assert rows["minift_dpo"]["speed_vs_trl"] > 0 and rows["minift_sft"]["memory_vs_trl"] is not None


def test_bench_generate_smoke(tiny_llama, tmp_path):
    """bench_generate.py on the tiny model: every way runs, and the study's way (one prefill, k rows, stopped rows
    dropped) samples the very tokens of the old way (the prompt k times, no dropping): same seed, same rows."""
    out = tmp_path / "gen.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_generate.py"), "--ckpt", str(tiny_llama[0]),
                           "--per-task", "2", "--k", "3", "--batch", "2", "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["conditions"]["prompts"] == 8 and data["conditions"]["k"] == 3
    for task, ways in data["per_task"].items():
        assert ways["k samples"]["tokens"] == ways["k copies"]["tokens"] > 0, task
        assert all(positive(w["seconds"]) for w in ways.values())
    assert all(positive(t["vs_greedy"]) for t in data["total"].values())
    assert "vs greedy" in proc.stdout
