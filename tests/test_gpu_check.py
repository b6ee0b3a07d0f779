"""bench/gpu_check.py without a GPU: it refuses cleanly, its fp64 reference is right, and its whole table code runs
on the CPU at tiny shapes (--dry-run), with every row inside its bound."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
sys.path.insert(0, str(ROOT))


def test_refuses_without_cuda(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU visible, even on a machine that has one
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: bench/gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False); --dry-run runs its "
        "table code on the CPU at tiny shapes"]
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("fn", ["token", "linear_frozen", "linear_trainable"])
def test_fp64_reference_matches_autograd(fn):
    # The table's reference computes log-probs and gradients by hand (no autograd, to hold one [N, V] at a time
    # at V = 128256); check it against autograd through log_softmax, in fp64 (agreement to ~1e-15).
    from bench.gpu_check import IGNORE, fp64_reference, kernel_inputs

    hidden, weight, targets, g = kernel_inputs(dict(N=12, H=8, V=50), "cpu", torch.float64)
    targets[[2, 7]] = IGNORE  # ignored rows: logp 0, no gradient
    logp, grads, zmax = fp64_reference(fn, hidden, weight, targets, g)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    z = h @ w.T
    z.retain_grad()
    keep = targets != IGNORE
    want = torch.where(keep, z.log_softmax(-1).gather(1, torch.where(keep, targets, 0)[:, None]).squeeze(1), 0.0)
    (want * g).sum().backward()
    assert keep.sum() < len(keep)  # some ignored rows are in the test
    torch.testing.assert_close(logp, want.detach(), rtol=0, atol=1e-12)
    expected = {"token": [z.grad], "linear_frozen": [h.grad], "linear_trainable": [h.grad, w.grad]}[fn]
    assert len(grads) == len(expected)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert zmax == pytest.approx(z.abs().max().item())


@pytest.mark.slow  # ~50 s of CPU: four tiny training runs, the interpreted Triton kernels, bench_loss --smoke
def test_dry_run_fills_the_table(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, TRITON_INTERPRET="1")  # the Triton rows run interpreted instead of being skipped
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--repeats", "1", "--steps", "2", "--json",
                           str(out)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gpu_check on cpu (dry run)" in proc.stdout
    data = json.loads(out.read_text())
    rows = data["rows"]
    by_section = {}
    for r in rows:
        by_section.setdefault(r["section"], []).append(r)
    assert list(by_section) == ["kernels", "train", "bench_loss", "generate"]
    kernels = by_section["kernels"]
    assert len(kernels) == 12  # 3 functions x 2 dtypes x (torch, triton)
    for r in kernels + by_section["train"]:
        assert r["ok"] is True, r  # inside its bound (the bounds are the ones the GPU run uses)
        assert r["time_s"] > 0
    assert {r["case"].split()[-1] for r in kernels} == {"torch", "triton"}
    variants = [r["case"].split()[0] for r in by_section["bench_loss"]]
    assert variants[:3] == ["naive", "torch", "triton"]
    assert all(r["time_s"] > 0 for r in by_section["bench_loss"] if not r["note"].startswith("skipped"))
    assert by_section["generate"][0]["note"].startswith("skipped")  # syncs are counted on CUDA only
    assert data["conditions"]["shapes"] == {"N": 64, "H": 32, "V": 1000}
