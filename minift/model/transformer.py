"""A compact Llama / Mistral / SmolLM transformer, written to compute exactly what Hugging Face computes.

References (read to learn, not copied): the Llama papers (RMSNorm, SwiGLU, RoPE), Llama 3.1's RoPE frequency
scaling, Mistral 7B (sliding-window attention), GQA (Ainslie et al. 2023), nanoGPT and gpt-fast for the layout.

The forward pass returns the final hidden states, not logits: the caller applies `model.lm_head`, so that a loss
can fuse the vocabulary projection with the log-softmax and never hold a [tokens x vocab] tensor.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minift.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 even for bf16 activations (as HF does): the mean of squares loses bits in bf16.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), i < d/2, with Llama 3.1's scaling when configured. fp32 [head_dim/2]."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv
    # llama3: long wavelengths (> original context / low_freq_factor) are slowed down by `factor`, short ones
    # (< original context / high_freq_factor) kept, and the band in between interpolated smoothly.
    old, lo, hi, factor = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"], s["factor"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x):
    # HF checkpoints pair dimension i with i + d/2 (not 2i with 2i+1 as in Meta's original code).
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache:
    """Preallocated keys/values for generation: (n_layers, B, n_kv_heads, max_len, head_dim) each.

    `positions` keeps each slot's RoPE position so that a sliding window can be applied by position."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype, device):
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.positions = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.length = 0  # slots filled by earlier forward calls

    def update(self, layer: int, k, v):
        T = k.shape[2]
        end = self.length + T
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, n_kv, S, hd)


class Unpadded:
    """The real-token slots of a right-padded (B, T) batch. Embedding, norms, linear layers and the MLP then run
    on those N tokens only (no FLOPs or saved activations spent on pads); attention puts q, k, v back into
    (B, T) rows for SDPA and takes the N real outputs out again. The same idea as unpadded "varlen" attention
    in BERT / flash-attn pipelines, with plain SDPA in the middle."""

    def __init__(self, lengths, T):
        self.B, self.T = lengths.numel(), T
        valid = torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]  # (B, T)
        self.index = valid.flatten().nonzero().squeeze(1)  # (N,) flat slots of the real tokens

    def unpad(self, x):
        return x.flatten(0, 1)[self.index]  # (B, T, ...) -> (B*T, ...) -> (N, ...)

    def pad(self, x):
        out = x.new_zeros(self.B * self.T, *x.shape[1:])  # (B*T, ...): zeros at the pads
        out.index_copy_(0, self.index, x)  # in place: one buffer, not two (autograd still reaches x)
        return out.view(self.B, self.T, *x.shape[1:])  # (B, T, ...)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim = layer, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache, rows=None):
        """x (B, T, dim), or (N, dim) real tokens when `rows` (Unpadded) is given; cos, sin broadcast over heads."""
        lead = x.shape[:-1]  # (B, T) or (N,)
        q = self.q_proj(x).view(*lead, self.n_heads, self.head_dim)  # (..., n_head, hd)
        k = self.k_proj(x).view(*lead, self.n_kv_heads, self.head_dim)  # (..., n_kv, hd)
        v = self.v_proj(x).view(*lead, self.n_kv_heads, self.head_dim)  # (..., n_kv, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if rows is not None:
            q, k, v = rows.pad(q), rows.pad(k), rows.pad(v)  # (N, h, hd) -> (B, T, h, hd), zeros at pads
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, h, T, hd)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, n_kv, S, hd), S = cached + T
        # GQA: each group of n_head / n_kv query heads shares one key/value head (enable_gqa broadcasts, no copy).
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        y = y.transpose(1, 2)  # (B, T, n_head, hd)
        if rows is not None:
            y = rows.unpad(y)  # (N, n_head, hd)
        return self.o_proj(y.reshape(*lead, self.n_heads * self.head_dim))  # (..., n_head * hd) -> (..., dim)


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up, saving only gate and up for backward (autograd would also keep silu(gate)).

    That is one [tokens x hidden_dim] tensor less per layer, ~15% of a block's saved activations under LoRA:
    sigmoid(gate) is recomputed in backward instead, an elementwise op next to the block's matmuls.
    Torch reference: F.silu(gate) * up (tests/test_model.py compares values and gradients)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        silu = gate * sig
        # d silu / d gate = sig * (1 + gate * (1 - sig))
        return grad * up * (sig * (1 + gate * (1 - sig))), grad * silu


def swiglu(gate, up):
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SwiGLU.apply(gate, up)
    return F.silu(gate) * up  # inference: no autograd Function overhead


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, rows=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, rows)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight  # one tensor, two uses (SmolLM, Llama 3.2 1B/3B)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.gradient_checkpointing = False

    def attention_mask(self, positions, mask, cache):
        """Boolean (B, 1, T, S) mask, True = may attend; None means plain causal (SDPA's fast path).

        `mask` (B, T, S) from the caller replaces the causal rule (the shared-prompt DPO layout, padding);
        Mistral's sliding window is then applied on top, by RoPE position, so that it holds in every layout."""
        B, T = positions.shape
        start = cache.length if cache is not None else 0
        S = start + T
        window = self.config.sliding_window
        key_pos = positions if cache is None else cache.positions[:, :S]  # (B, S)
        if mask is None:
            if cache is None and (window is None or T <= window):
                return None
            q_slot = torch.arange(start, S, device=positions.device)
            mask = q_slot[:, None] >= torch.arange(S, device=positions.device)[None, :]  # (T, S) causal by slot
            mask = mask.expand(B, T, S)
        if window is not None:
            # Mistral: query at position p sees keys at positions > p - window <- difference from Llama
            mask = mask & (positions[:, :, None] - key_pos[:, None, :] < window)
        return mask[:, None]  # (B, 1, T, S): broadcast over heads

    def forward(self, ids, positions=None, mask=None, cache=None, lengths=None):
        """ids (B, T) -> final hidden states (B, T, dim). positions (B, T) default 0..T-1 after the cache.
        lengths (B,): real tokens per right-padded row; given, the pads are not computed (their outputs are 0)."""
        B, T = ids.shape
        rows = None
        if lengths is not None and cache is None and int(lengths.min()) < T:
            rows = Unpadded(lengths, T)
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + T, device=ids.device).expand(B, T)
        if cache is not None:
            cache.positions[:, cache.length:cache.length + T] = positions
        attn_mask = self.attention_mask(positions, mask, cache)
        freqs = positions[:, :, None].float() * self.inv_freq  # (B, T, hd/2), in fp32 for long positions
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
        if rows is not None:
            ids, emb = rows.unpad(ids), rows.unpad(emb)  # (N,), (N, hd)
        h = self.embed(ids)  # (B, T, dim) or (N, dim)
        emb = emb[..., None, :]  # (..., 1, hd): broadcast over heads
        cos, sin = emb.cos().to(h.dtype), emb.sin().to(h.dtype)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Keep only each block's input; recompute its inside during backward.
                h = checkpoint(layer, h, cos, sin, attn_mask, None, rows, use_reentrant=False)
            else:
                h = layer(h, cos, sin, attn_mask, cache, rows)
        if cache is not None:
            cache.length += T
        h = self.norm(h)
        return rows.pad(h) if rows is not None else h
