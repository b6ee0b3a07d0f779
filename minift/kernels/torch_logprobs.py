"""Per-row target log-probs in plain torch: the CPU path, and the reference the Triton kernels are checked against.

For one row of logits x[V] and its target t:

    lse     = log sum_v exp(x_v)             (log-sum-exp, computed as m + log sum exp(x - m), m = max x)
    logp    = x_t - lse                      (log softmax(x)[t])
    dlogp/dx = onehot(t) - softmax(x)        (so with an upstream gradient g:  dx = g * (onehot(t) - p))

Two row ops share this file's contract with kernels/triton_logprobs.py, so that the chunk loop in
kernels/__init__.py can drive either one:

    forward(x[n,V], targets[n], ignore_index, unit_grad=False) -> (logp[n], lse[n])
    backward(x[n,V], targets[n], lse[n], g[n], ignore_index, out=None) -> dx[n,V]

Rows whose target is ignore_index give logp = 0 and a zero gradient. All arithmetic is fp32 (fp64 for fp64
inputs): exp and the row sums over ~50k-150k entries lose too much in bf16, and 1 - p for a confident
prediction (p = 0.9995) is 0 in bf16, which would silently remove the target-class gradient.

Memory and speed: the naive path keeps log_softmax's output and the gradient of the logits, each [N, V] fp32,
alive together with the logits, and every elementwise step writes a fresh [N, V] tensor (fresh pages: page
faults, then writes to DRAM). forward(unit_grad=True) and backward(out=x) instead work in place on the caller's
chunk buffer (sub_, exp_, mul_, scatter_add_), so in the chunk loop the only [n, V] tensor alive is that chunk,
plus one fp32 working copy when it is bf16. forward without unit_grad must leave x intact: one fp32 scratch.
"""
import torch


def reference_token_logprobs(logits, targets, ignore_index=-100):
    """The plain few-line reference (autograd does the backward): materialize log_softmax, gather, mask."""
    keep = targets != ignore_index
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    picked = logp.gather(1, torch.where(keep, targets, 0)[:, None]).squeeze(1)  # (N,)
    return torch.where(keep, picked, 0.0)


def _compute_dtype(x):
    return torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs (gradcheck)


def forward(x, targets, ignore_index, unit_grad=False):
    """logp and lse of each row of x[n, V]. x is left unchanged, unless unit_grad: then x is overwritten with
    the gradient for g = 1 on every kept row, onehot(t) - softmax(x) (0 on ignored rows)."""
    cdt = _compute_dtype(x)
    keep = targets != ignore_index
    safe = torch.where(keep, targets, 0)[:, None]  # (n, 1) ignored rows read column 0; masked below
    picked = x.gather(1, safe).squeeze(1).to(cdt)  # target logit, read before x may be overwritten
    m = x.amax(1, keepdim=True).to(cdt)  # (n, 1) row max: exp never overflows
    in_place = unit_grad and x.dtype == cdt
    e = x if in_place else torch.empty(x.shape, dtype=cdt, device=x.device)
    torch.sub(x, m, out=e).exp_()  # (n, V) exp(x - m) in (0, 1]
    s = e.sum(1, keepdim=True)  # (n, 1)
    lse = (m + s.log()).squeeze(1)  # (n,)
    logp = torch.where(keep, picked - lse, 0.0)
    if unit_grad:
        w = keep.to(cdt)[:, None]  # (n, 1) g = 1 on kept rows, 0 on ignored ones
        e.mul_(-w / s)  # -softmax, in place: e / s is the softmax
        e.scatter_add_(1, safe, w)  # + onehot(target)
        if e is not x:
            x.copy_(e)  # the only rounding to x's dtype (bf16) happens here, after the subtraction
    return logp, lse


def backward(x, targets, lse, g, ignore_index, out=None):
    """dx = g[:, None] * (onehot(t) - softmax(x)), softmax recomputed from the saved lse; zero rows where
    ignored. out may be x itself (in place); out=None allocates a tensor like x."""
    cdt = _compute_dtype(x)
    keep = targets != ignore_index
    safe = torch.where(keep, targets, 0)[:, None]  # (n, 1)
    gk = torch.where(keep, g.to(cdt), 0.0)[:, None]  # (n, 1) where(), not a product: g may be nan there
    in_place = out is not None and out.dtype == cdt and out.data_ptr() == x.data_ptr()
    e = out if in_place else torch.empty(x.shape, dtype=cdt, device=x.device)
    torch.sub(x, lse[:, None].to(cdt), out=e).exp_()  # (n, V) softmax = exp(x - lse)
    e.mul_(-gk)
    e.scatter_add_(1, safe, gk)  # fp32: g * (1 - p) keeps its digits even when p = 0.9995
    if out is None:
        return e if x.dtype == cdt else e.to(x.dtype)
    if e is not out:
        out.copy_(e)
    return out
