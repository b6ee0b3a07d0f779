"""kernels/: both implementations (torch, and Triton in its CPU interpreter) against an fp64 reference.

Shapes are odd on purpose (N=37, V=1013, H=48: no powers of two, chunks that do not divide N) and small, so
that the interpreter, which runs every Triton program in Python/numpy, stays fast.
"""
import os

# Triton reads TRITON_INTERPRET when @triton.jit decorates a function, i.e. when kernels.triton_logprobs is
# imported: set it first (and reload below in case another module imported the kernels before us).
os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from minift import kernels  # noqa: E402
from minift.kernels import torch_logprobs  # noqa: E402
from minift.kernels import KernelError  # noqa: E402

try:
    from minift.kernels import triton_logprobs
    if not triton_logprobs.INTERPRETED:
        triton_logprobs = importlib.reload(triton_logprobs)
    IMPLS = ["torch", "triton"]
except ImportError:  # no Triton on this platform: the torch path is still fully tested
    triton_logprobs, IMPLS = None, ["torch"]

N, H, V = 37, 48, 1013
# Tolerances against fp64, per input dtype. The row math is fp32 in both implementations, so the log-probs
# of given logits are good to ~1e-6 (lse over 1e3 terms); dlogits stored in bf16 carry its 2^-9 relative
# rounding. For hidden @ weight in bf16, the logits themselves are rounded to bf16 by the matmul (as the
# model's lm_head rounds them): |logit| < 8 here, where half a bf16 ulp is 2^-6 = 1.6e-2, and both the
# target's logit and the lse can be off by that (3e-2; measured 3e-3). The gradients go through two bf16
# roundings (dlogits, then the matmul's output), each <= 2^-7 relative to the largest entries (measured 6e-3).
TOL = {torch.float32: dict(logp=1e-5, grad=1e-5), torch.bfloat16: dict(logp=3e-2, grad=2e-2)}
# One rounding of an fp32 value to bf16 when a gradient is stored: round-to-nearest (torch, Triton on a GPU)
# is within 2^-8 relative; Triton's CPU interpreter converts fp32 -> bf16 by truncation, within 2^-7.
BF16_STORE_RTOL = {"torch": 2**-8, "triton": 2**-7}


def make_targets(n, v, ignore_index=-100, seed=0, frac_ignored=0.2):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < frac_ignored] = ignore_index
    return t


def reference(logits64, targets, g, ignore_index=-100):
    """fp64 log-probs and dlogits = g * (onehot - softmax) through autograd on the plain reference."""
    x = logits64.detach().requires_grad_()
    logp = torch_logprobs.reference_token_logprobs(x, targets, ignore_index)
    (dx,) = torch.autograd.grad(logp, x, g.double())
    return logp.detach(), dx


def rel_err(a, b):
    """max |a - b| over max |b|: the scale of a whole gradient, so that tiny entries do not dominate."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_matches_fp64(impl, dtype):
    torch.manual_seed(0)
    logits = (3 * torch.randn(N, V)).to(dtype).requires_grad_()
    targets = make_targets(N, V)
    g = torch.randn(N)  # both signs: SFT's mean is all-negative, DPO's per-token weights are not
    logp = kernels.token_logprobs(logits, targets, impl=impl)
    (dlogits,) = torch.autograd.grad(logp, logits, g)
    ref_logp, ref_dx = reference(logits.double(), targets, g)  # bf16 values are exact in fp64
    assert logp.dtype == torch.float32 and dlogits.dtype == dtype
    torch.testing.assert_close(logp.double(), ref_logp, atol=1e-5, rtol=0)  # fp32 math on exact inputs
    rtol = BF16_STORE_RTOL[impl] if dtype == torch.bfloat16 else 1e-4  # bf16: one rounding when stored
    torch.testing.assert_close(dlogits.double(), ref_dx, atol=1e-6, rtol=rtol)
    ignored = targets == -100
    assert ignored.any() and (logp[ignored] == 0).all() and (dlogits[ignored] == 0).all()


# chunk_size None: one chunk here; 10 leaves a last chunk of 7; 1 (one row per chunk) only for torch fp32:
# with Triton it would be 37 interpreter launches that check nothing the other sizes do not.
LINEAR_CASES = [(impl, dtype, chunk) for impl in IMPLS for dtype in (torch.float32, torch.bfloat16)
                for chunk in (None, 10, 1) if chunk != 1 or (impl == "torch" and dtype == torch.float32)]


@pytest.mark.parametrize("impl,dtype,chunk_size", LINEAR_CASES)
@pytest.mark.parametrize("train_weight", [False, True], ids=["frozen_w", "train_w"])
def test_linear_token_logprobs_matches_fp64(impl, dtype, train_weight, chunk_size):
    torch.manual_seed(1)
    hidden = torch.randn(N, H).to(dtype).requires_grad_()
    weight = (0.2 * torch.randn(V, H)).to(dtype).requires_grad_(train_weight)  # logits of std ~1.4
    targets = make_targets(N, V, seed=1)
    g = torch.randn(N)
    logp = kernels.linear_token_logprobs(hidden, weight, targets, impl=impl, chunk_size=chunk_size)
    grads = torch.autograd.grad(logp, [hidden, weight] if train_weight else [hidden], g)

    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = torch_logprobs.reference_token_logprobs(h64 @ w64.T, targets)
    ref_grads = torch.autograd.grad(ref, [h64, w64], g.double())
    tol = TOL[dtype]
    torch.testing.assert_close(logp.double(), ref.detach(), atol=tol["logp"], rtol=0)
    for got, want, name in zip(grads, ref_grads, ["dhidden", "dweight"]):
        assert got.dtype == dtype, name
        assert rel_err(got, want) < tol["grad"], (name, rel_err(got, want))
    assert (grads[0][targets == -100] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_all_rows_ignored_give_zero(impl):
    hidden = torch.randn(5, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    targets = torch.full((5,), -100)
    for w_grad in (True, False):
        weight.requires_grad_(w_grad)
        logp = kernels.linear_token_logprobs(hidden, weight, targets, impl=impl, chunk_size=2)
        assert (logp == 0).all()
        grads = torch.autograd.grad(logp, [hidden, weight] if w_grad else [hidden], torch.randn(5))
        assert all((gr == 0).all() for gr in grads)
    logits = torch.randn(5, V, requires_grad=True)
    logp = kernels.token_logprobs(logits, targets, impl=impl)
    (dx,) = torch.autograd.grad(logp, logits, torch.randn(5))
    assert (logp == 0).all() and (dx == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_custom_ignore_index_and_nan_gradient_on_ignored_rows(impl):
    torch.manual_seed(2)
    hidden, weight = torch.randn(N, H, requires_grad=True), torch.randn(V, H) * 0.2
    targets = make_targets(N, V, ignore_index=7, seed=2)  # 7 is also a valid token id: ignored all the same
    g = torch.randn(N)
    g[targets == 7] = float("nan")  # whatever flows into ignored rows must not leak out
    for w_grad in (False, True):
        weight.requires_grad_(w_grad)
        logp = kernels.linear_token_logprobs(hidden, weight, targets, ignore_index=7, impl=impl, chunk_size=10)
        grads = torch.autograd.grad(logp, [hidden, weight] if w_grad else [hidden], g)
        ref, ref_dx = reference(hidden.detach().double() @ weight.detach().double().T, targets,
                                torch.nan_to_num(g), ignore_index=7)
        torch.testing.assert_close(logp.double(), ref, atol=1e-5, rtol=0)
        assert all(torch.isfinite(gr).all() for gr in grads)
        assert rel_err(grads[0], ref_dx @ weight.detach().double()) < 1e-5
    with pytest.raises(KernelError, match="ignore_index"):  # -100 is now just an out-of-range id
        kernels.token_logprobs(torch.randn(2, V), torch.tensor([3, -100]), ignore_index=7, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_confident_prediction_keeps_target_gradient(impl, dtype):
    """p(target) = 0.99916: the target's gradient g * (1 - p) = 8.4e-4 * g must survive; rounding p to bf16
    first would give exactly 0. lse is stored in fp32 (ulp 9.5e-7 at 14), ~6e-4 of 1 - p: hence rtol 5e-3
    in fp32; a bf16 gradient adds its one rounding on the store."""
    logits = 0.01 * torch.randn(4, V)
    targets = torch.tensor([0, 500, 1012, 3])
    logits[torch.arange(4), targets] = 14.0
    logits = logits.to(dtype).requires_grad_()
    g = torch.tensor([1.0, -2.0, 0.5, -0.25])
    logp = kernels.token_logprobs(logits, targets, impl=impl)
    (dx,) = torch.autograd.grad(logp, logits, g)
    ref_logp, ref_dx = reference(logits.double(), targets, g)
    assert (ref_logp.exp() > 0.999).all()
    got, want = dx[torch.arange(4), targets].double(), ref_dx[torch.arange(4), targets]
    assert (got != 0).all()
    torch.testing.assert_close(got, want, rtol=5e-3 + (BF16_STORE_RTOL[impl] if dtype == torch.bfloat16 else 0),
                               atol=0)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=0, atol=2e-6)  # -8.4e-4, good to ~1 fp32 ulp of 14


@pytest.mark.skipif(triton_logprobs is None, reason="Triton not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_row_kernels_with_many_blocks(dtype):
    """BLOCK_V=128 over V=1013: 8 blocks, the last one masked, so the online max/sum-exp rescaling runs; rows
    whose max sits in the first, a middle or the last block."""
    torch.manual_seed(3)
    x = (2 * torch.randn(6, V)).to(dtype)
    x[0, 5] = x[1, 600] = x[2, 1012] = 30.0
    targets = torch.tensor([5, 1012, 0, -100, 128, 127])
    logp, lse = triton_logprobs.forward(x, targets, -100, block_v=128)
    ref_logp, ref_lse = triton_logprobs.reference_forward(x, targets, -100)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=0)
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=0)
    g = torch.randn(6)
    want = triton_logprobs.reference_backward(x, targets, lse, g, -100)
    out = x.clone()
    triton_logprobs.backward(out, targets, lse, g, -100, out=out, block_v=128)  # in place, as the chunk loop
    torch.testing.assert_close(out.float(), want, atol=1e-6,
                               rtol=BF16_STORE_RTOL["triton"] if dtype == torch.bfloat16 else 1e-5)


def test_gradcheck_torch_path():
    """Finite differences in fp64 (the torch path keeps fp64 end to end) for every backward branch."""
    torch.manual_seed(4)
    h = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 10, -100, 3, 3, 7, 1])

    def f(h, w):
        return kernels.linear_token_logprobs(h, w, t, impl="torch", chunk_size=3)
    assert torch.autograd.gradcheck(f, (h, w))  # recompute branch: dhidden and dweight
    assert torch.autograd.gradcheck(f, (h, w.detach()))  # frozen weight: dhidden finished in the forward
    logits = torch.randn(7, 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: kernels.token_logprobs(x, t, impl="torch"), (logits,))


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_input_raises_clear_errors(impl):
    logits = torch.randn(3, 10)
    for bad, where in [(10, "targets[1] = 10"), (-1, "targets[1] = -1")]:
        with pytest.raises(KernelError, match=r"outside \[0, 10\)") as e:
            kernels.token_logprobs(logits, torch.tensor([0, bad, 2]), impl=impl)
        assert where in str(e.value)
    with pytest.raises(KernelError, match="shape"):
        kernels.token_logprobs(logits, torch.tensor([0, 1]), impl=impl)
    with pytest.raises(KernelError, match=r"hidden \[N, H\]"):
        kernels.linear_token_logprobs(torch.randn(3, 4), torch.randn(10, 5), torch.tensor([0, 1, 2]), impl=impl)
    with pytest.raises(KernelError, match="chunk_size"):
        kernels.linear_token_logprobs(torch.randn(3, 4), torch.randn(10, 4), torch.tensor([0, 1, 2]), impl=impl,
                                      chunk_size=0)


def test_switch_env_var_and_argument(monkeypatch):
    calls = []
    real = torch_logprobs.forward
    monkeypatch.setattr(torch_logprobs, "forward", lambda *a, **k: calls.append(k) or real(*a, **k))
    logits, t = torch.randn(3, 10), torch.tensor([0, 1, 2])
    monkeypatch.delenv("MINIFT_KERNELS", raising=False)
    kernels.token_logprobs(logits, t)  # CPU tensors: torch by default
    assert len(calls) == 1
    monkeypatch.setenv("MINIFT_KERNELS", "bogus")
    with pytest.raises(KernelError, match="MINIFT_KERNELS"):
        kernels.token_logprobs(logits, t)
    kernels.token_logprobs(logits, t, impl="torch")  # the argument wins over the variable
    assert len(calls) == 2
    monkeypatch.setenv("MINIFT_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelError, match="TRITON_INTERPRET=1"):
        kernels.token_logprobs(logits, t)
    # no_grad (reference-model passes): no gradient work in the forward
    with torch.no_grad():
        kernels.linear_token_logprobs(torch.randn(3, 4, requires_grad=True), torch.randn(10, 4), t, impl="torch")
    assert calls[-1] == {"unit_grad": False}
    assert kernels.chunk_rows(4096, 49152) == 341  # 64 MiB of fp32 logits per chunk on the CPU


@pytest.mark.slow
def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # keep it quick: no interpreter
    run = subprocess.run([sys.executable, str(root / "bench" / "bench_loss.py"), "--smoke", "--json", str(out)],
                         capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert run.returncode == 0, run.stderr
    res = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert res["naive"]["peak_mib"] > 0 and res["torch"]["peak_mib"] > 0
    assert res["torch"]["ddh"] < 1e-5 and res["torch"]["dloss"] < 1e-5  # the same loss and gradient as naive
    assert "skipped" in res["liger"] or res["liger"]["ddh"] < 1e-2
