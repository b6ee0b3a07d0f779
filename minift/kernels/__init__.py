"""Per-token target log-probs, log softmax(logits)[target], shared by the SFT and DPO losses.

    token_logprobs(logits[N, V], targets[N], ignore_index=-100)                 -> logp[N]
    linear_token_logprobs(hidden[N, H], weight[V, H], targets[N], ignore_index=-100,
                          impl=None, chunk_size=None)                           -> logp[N]

logp is fp32 (fp64 for fp64 inputs, so that gradcheck can run), 0 on rows whose target is ignore_index. Both
are autograd Functions whose backward takes any upstream gradient g[N] (the SFT mean, or the per-sequence
DPO weights) and gives dlogits = g[:, None] * (onehot(target) - softmax(logits)), zero on ignored rows.

linear_token_logprobs never materializes the [N, V] logits: rows go through in chunks of `chunk_size` rows
(default: a chunk of logits of at most CHUNK_BYTES, counted in fp32), each chunk's logits come from one
matmul, a row op turns them into logp and lse, and the chunk buffer is reused. How the gradient is made:
  - only hidden needs a gradient (LoRA: the vocab projection is frozen): dlogits is linear in g row by row,
    so the forward already computes U = (onehot - softmax) @ weight per chunk while the logits are at hand,
    and the backward is dhidden = g[:, None] * U. No recomputation; U is [N, H], the size of hidden.
  - weight needs a gradient: the backward recomputes each chunk's logits from the saved lse and accumulates
    dhidden = dlogits @ weight and dweight += dlogits.T @ hidden. dweight is skipped when weight is frozen.

Two implementations of the row ops share one contract: kernels/triton_logprobs.py (Triton) and
kernels/torch_logprobs.py (plain torch). One switch picks: the `impl=` argument, else the environment
variable MINIFT_KERNELS=triton|torch, else Triton for CUDA tensors and torch otherwise. Triton on CPU tensors
runs in Triton's interpreter and needs TRITON_INTERPRET=1 set before kernels.triton_logprobs is imported.
"""
import os

import torch

from . import torch_logprobs

__all__ = ["token_logprobs", "linear_token_logprobs", "chunk_rows", "CHUNK_BYTES", "KernelError"]


class KernelError(ValueError):
    """Bad input to a kernel (shapes, dtypes, targets, the implementation switch). The kernels import nothing
    from minift, so they have their own error type; minift's command-line tools print it as one line."""

# Budget for one chunk of logits, counted as fp32. 64 MiB keeps the loss path's peak ~1/30 of the naive one at
# V = 49152 on the CPU (341 rows per chunk); on a GPU 256 MiB keeps each chunk's matmul big enough to run
# at full speed (V = 128256: 523 rows of 4096-wide hidden states, ~0.5 TFLOP per chunk forward).
CHUNK_BYTES = {"cpu": 64 * 2**20, "cuda": 256 * 2**20}


def _row_ops(impl, device, caller):
    """The module with forward/backward row ops that this call uses (see the module docstring)."""
    impl = impl or os.environ.get("MINIFT_KERNELS") or ("triton" if device.type == "cuda" else "torch")
    if impl == "torch":
        return torch_logprobs
    if impl != "triton":
        raise KernelError(f"kernels.{caller}: impl (or MINIFT_KERNELS) must be 'triton' or 'torch', got {impl!r}")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise KernelError(f"kernels.{caller}: Triton on CPU tensors needs TRITON_INTERPRET=1 in the environment "
                          "before kernels.triton_logprobs is imported (or use impl='torch')")
    try:
        from . import triton_logprobs
    except ImportError as e:
        raise KernelError(f"kernels.{caller}: impl='triton' but Triton cannot be imported ({e})") from e
    if device.type == "cpu" and not triton_logprobs.INTERPRETED:
        raise KernelError(f"kernels.{caller}: kernels.triton_logprobs was imported before TRITON_INTERPRET=1 "
                          "was set, so its kernels are compiled for a GPU; set it before the first import")
    return triton_logprobs


def _check_targets(targets, n, V, ignore_index, device, caller):
    """targets[n] integer, on the same device; each one in [0, V) or equal to ignore_index."""
    if targets.dim() != 1 or targets.shape[0] != n:
        raise KernelError(f"kernels.{caller}: targets must have shape [{n}], got {list(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32) or targets.device != device:
        raise KernelError(f"kernels.{caller}: targets must be int64 or int32 on {device}, "
                          f"got {targets.dtype} on {targets.device}")
    targets = targets.long().contiguous()
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bad.any():  # one device sync per call; a clear error beats an out-of-bounds read or a device assert
        i = int(bad.nonzero()[0, 0])
        raise KernelError(f"kernels.{caller}: targets[{i}] = {int(targets[i])} is outside [0, {V}) "
                          f"and is not ignore_index ({ignore_index})")
    return targets


def chunk_rows(N, V, chunk_size=None, device="cpu"):
    """Rows per chunk: chunk_size if given, else as many as fit CHUNK_BYTES of fp32 logits (at least 1)."""
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise KernelError(f"kernels.linear_token_logprobs: chunk_size must be >= 1, got {chunk_size}")
        return max(1, min(int(chunk_size), N))
    budget = CHUNK_BYTES.get(torch.device(device).type, CHUNK_BYTES["cpu"])
    return max(1, min(budget // (4 * V), N))


class TokenLogprobs(torch.autograd.Function):
    """logits[N, V] given (already materialized): saves the logits reference and lse[N] only."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, ops):
        logp, lse = ops.forward(logits, targets, ignore_index)
        ctx.save_for_backward(logits, targets, lse)
        ctx.ignore_index, ctx.ops = ignore_index, ops
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        logits, targets, lse = ctx.saved_tensors
        dlogits = ctx.ops.backward(logits, targets, lse, g.contiguous(), ctx.ignore_index)
        return dlogits, None, None, None


class LinearTokenLogprobs(torch.autograd.Function):
    """logits = hidden @ weight.T, one chunk of rows at a time (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, rows, ops, grad_enabled):
        N, V = hidden.shape[0], weight.shape[0]
        # needs_input_grad says True under no_grad too (reference model passes): hence grad_enabled
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        early = grad_enabled and need_dh and not need_dw  # finish dhidden here, up to the per-row factor g
        logp = hidden.new_empty(N, dtype=torch.promote_types(hidden.dtype, torch.float32))
        lse = hidden.new_empty(N, dtype=logp.dtype)
        unit_dh = torch.empty_like(hidden) if early else None  # (N, H) (onehot - softmax) @ weight
        buf = hidden.new_empty(rows, V)  # (rows, V) the one chunk of logits, reused by every chunk
        for i in range(0, N, rows):
            j = min(i + rows, N)
            x = buf[: j - i]  # (n, V)
            torch.mm(hidden[i:j], weight.T, out=x)  # logits in the input dtype, as the model's lm_head makes them
            logp[i:j], lse[i:j] = ops.forward(x, targets[i:j], ignore_index, unit_grad=early)
            if early:
                torch.mm(x, weight, out=unit_dh[i:j])  # x now holds onehot - softmax (0 on ignored rows)
        ctx.ignore_index, ctx.rows, ctx.ops, ctx.early = ignore_index, rows, ops, early
        if early:
            ctx.save_for_backward(unit_dh, targets)  # hidden and weight are not needed any more
        else:
            ctx.save_for_backward(hidden, weight, targets, lse)
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        g = g.contiguous()
        if ctx.early:
            unit_dh, targets = ctx.saved_tensors
            g = torch.where(targets != ctx.ignore_index, g, 0.0)  # not 0 * g: g may be nan on ignored rows
            dh = (unit_dh.to(g.dtype) * g[:, None]).to(unit_dh.dtype)  # (N, H), scaled in fp32
            return dh, None, None, None, None, None, None
        hidden, weight, targets, lse = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N, V, rows = hidden.shape[0], weight.shape[0], ctx.rows
        dh = torch.empty_like(hidden) if need_dh else None
        dw = torch.zeros_like(weight) if need_dw else None  # accumulates in weight's dtype, chunk by chunk
        buf = hidden.new_empty(rows, V)
        for i in range(0, N, rows):
            j = min(i + rows, N)
            x = buf[: j - i]  # (n, V)
            torch.mm(hidden[i:j], weight.T, out=x)  # recompute this chunk's logits
            ctx.ops.backward(x, targets[i:j], lse[i:j], g[i:j], ctx.ignore_index, out=x)  # x = dlogits
            if need_dh:
                torch.mm(x, weight, out=dh[i:j])
            if need_dw:
                dw.addmm_(x.T, hidden[i:j])  # (V, H) += (V, n) @ (n, H)
        return dh, dw, None, None, None, None, None


def token_logprobs(logits, targets, ignore_index=-100, impl=None):
    """log softmax(logits)[target] per row: logits[N, V], targets[N] -> fp32 [N], 0 where ignored."""
    if logits.dim() != 2 or not logits.is_floating_point():
        raise KernelError(f"kernels.token_logprobs: logits must be a float [N, V] tensor, "
                          f"got {logits.dtype} {list(logits.shape)}")
    ops = _row_ops(impl, logits.device, "token_logprobs")
    targets = _check_targets(targets, logits.shape[0], logits.shape[1], ignore_index, logits.device,
                             "token_logprobs")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()  # the kernels walk rows with unit stride
    return TokenLogprobs.apply(logits, targets, int(ignore_index), ops)


def linear_token_logprobs(hidden, weight, targets, ignore_index=-100, impl=None, chunk_size=None):
    """log softmax(hidden @ weight.T)[target] per row, chunked: hidden[N, H], weight[V, H] -> fp32 [N]."""
    name = "linear_token_logprobs"
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise KernelError(f"kernels.{name}: need hidden [N, H] and weight [V, H], "
                          f"got {list(hidden.shape)} and {list(weight.shape)}")
    if hidden.dtype != weight.dtype or not hidden.is_floating_point() or hidden.device != weight.device:
        raise KernelError(f"kernels.{name}: hidden and weight must share a float dtype and device, got "
                          f"{hidden.dtype} on {hidden.device} and {weight.dtype} on {weight.device}")
    ops = _row_ops(impl, hidden.device, name)
    N, V = hidden.shape[0], weight.shape[0]
    targets = _check_targets(targets, N, V, ignore_index, hidden.device, name)
    rows = chunk_rows(N, V, chunk_size, hidden.device)
    return LinearTokenLogprobs.apply(hidden.contiguous(), weight, targets, int(ignore_index), rows, ops,
                                     torch.is_grad_enabled())
