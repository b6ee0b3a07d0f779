"""Fused log-softmax / cross-entropy row kernels in Triton: per-token target log-probs and their gradient.

What they compute, for one row x[V] of logits and its target t (the same contract as kernels/torch_logprobs.py):

    forward:  lse = log sum_v exp(x_v),  logp = x_t - lse            -> writes logp[n], lse[n]
    backward: dx = g * (onehot(t) - exp(x - lse))                     -> writes dx[n, V]

Rows with t == ignore_index give logp = 0 and dx = 0.

The forward is ONE pass over the vocabulary per row with an "online" log-sum-exp: keep a running max m and a
running sum s of exp(x - m); when a block raises the max to m', rescale s by exp(m - m') before adding the
block. The target logit is picked up on the way, so the row is read once. Only lse (4 bytes per row) is
saved; the backward recomputes softmax = exp(x - lse) from it instead of storing [N, V] probabilities.

Napkin math for N rows of V = 128256 bf16 logits; call L = N * V * 2 bytes (1 GiB at N = 4096):
  naive torch, logits.float().log_softmax(-1).gather(...) and its backward: .float() reads L, writes 2L;
                log_softmax reads 2L twice (max and sum, then the output) and writes 2L; gather's backward
                writes 2L of zeros; log_softmax's backward reads 2L + 2L and writes 2L; .float()'s backward
                reads 2L and writes L  -> about 20 L of memory traffic, 3-4 [N, V] tensors alive at the peak.
  these kernels: forward reads L and writes 8 bytes per row; backward reads L and writes L (in place, into
                the same buffer)  -> 3 L, and no [N, V] tensor besides the logits: ~7x less traffic.
With hidden @ weight.T computed chunk by chunk (kernels/__init__.py) the logits themselves never exist in
full either.

Why fp32 accumulation: the sum runs over ~10^5 terms, and bf16 keeps 8 bits of mantissa, so a bf16 running
sum stops growing once it is ~256x one term. And for a confident prediction p = 0.9995 the target's gradient
g * (1 - p) = 5e-4 * g is only representable if 1 - p is formed in fp32; rounding p to bf16 first gives
exactly 1.0 and a zero gradient. So everything is fp32 in registers, and dx is rounded to the buffer's
dtype only when it is stored.

Offsets are int64 (row * stride passes 2^31 beyond ~16.7k rows of V = 128256), and any V works: the last block
is masked.
"""
import torch
import triton
import triton.language as tl


def reference_forward(x, targets, ignore_index):
    """Torch reference for _logprobs_fwd_kernel: (logp, lse) per row, fp32."""
    lse = torch.logsumexp(x.float(), dim=1)
    keep = targets != ignore_index
    picked = x.float().gather(1, torch.where(keep, targets, 0)[:, None]).squeeze(1)
    return torch.where(keep, picked - lse, 0.0), lse


@triton.jit
def _logprobs_fwd_kernel(x_ptr, x_row_stride, t_ptr, logp_ptr, lse_ptr, V, ignore_index,
                         BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one program per row; int64 so row * stride cannot overflow
    x_row = x_ptr + row * x_row_stride
    target = tl.load(t_ptr + row)
    m = tl.full((), float("-inf"), tl.float32)  # running max; on block 0, s * exp(-inf - m_new) = 0
    s = tl.full((), 0.0, tl.float32)  # running sum of exp(x - m)
    picked = tl.full((), 0.0, tl.float32)  # the target's logit, found in whichever block holds it
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)  # rescale the old sum to the new max
        m = m_new
        picked += tl.sum(tl.where(cols == target, x, 0.0), axis=0)
    lse = m + tl.log(s)
    logp = tl.where(target == ignore_index, 0.0, picked - lse)
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, logp.to(logp_ptr.dtype.element_ty))


def reference_backward(x, targets, lse, g, ignore_index):
    """Torch reference for _logprobs_bwd_kernel: g * (onehot - softmax), fp32, zero on ignored rows."""
    keep = targets != ignore_index
    onehot = torch.nn.functional.one_hot(torch.where(keep, targets, 0), x.shape[1]).float()
    gk = torch.where(keep, g.float(), 0.0)[:, None]
    return gk * (onehot - torch.exp(x.float() - lse[:, None]))


@triton.jit
def _logprobs_bwd_kernel(x_ptr, x_row_stride, dx_ptr, dx_row_stride, t_ptr, lse_ptr, g_ptr, V, ignore_index,
                         BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    dx_row = dx_ptr + row * dx_row_stride  # may be x_row: each element is read before it is overwritten
    target = tl.load(t_ptr + row)
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_ptr + row).to(tl.float32)
    g = tl.where(target == ignore_index, 0.0, g)  # where(), not a product: g may be nan on ignored rows
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(x - lse)  # softmax, recomputed from the saved lse
        dx = g * (tl.where(cols == target, 1.0, 0.0) - p)  # fp32 until this store
        tl.store(dx_row + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# Whether @triton.jit made interpreter functions (TRITON_INTERPRET=1 at import): those run on CPU tensors.
INTERPRETED = type(_logprobs_fwd_kernel).__name__ == "InterpretedFunction"


def _block(V, block_v):
    # Big blocks mean few loop trips (and few interpreter steps on the CPU); 4096 fp32 values per program
    # keep the registers of 8 warps comfortably busy on a GPU without spilling.
    return block_v or min(triton.next_power_of_2(V), 4096)


def forward(x, targets, ignore_index, unit_grad=False, block_v=None):
    """logp and lse of each row of x[n, V] (x read once). unit_grad: then also overwrite x with
    onehot(t) - softmax(x), the gradient for g = 1 on every kept row (a second, in-place pass)."""
    n, V = x.shape
    assert x.stride(1) == 1, "rows of x must be contiguous"
    logp = torch.empty(n, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    lse = torch.empty(n, dtype=torch.float32, device=x.device)
    if n > 0:
        _logprobs_fwd_kernel[(n,)](x, x.stride(0), targets, logp, lse, V, ignore_index,
                                   BLOCK_V=_block(V, block_v), num_warps=8)
    if unit_grad:
        ones = torch.ones(n, dtype=torch.float32, device=x.device)
        backward(x, targets, lse, ones, ignore_index, out=x, block_v=block_v)
    return logp, lse


def backward(x, targets, lse, g, ignore_index, out=None, block_v=None):
    """dx = g[:, None] * (onehot(t) - softmax(x)); out may be x itself (in place), None allocates."""
    n, V = x.shape
    out = torch.empty_like(x) if out is None else out
    assert x.stride(1) == 1 and out.stride(1) == 1, "rows of x and out must be contiguous"
    if n > 0:
        _logprobs_bwd_kernel[(n,)](x, x.stride(0), out, out.stride(0), targets, lse.float().contiguous(),
                                   g.contiguous(), V, ignore_index, BLOCK_V=_block(V, block_v), num_warps=8)
    return out
