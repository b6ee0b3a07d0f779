"""The FLOP model of a training run (2 FLOPs per multiply-add; nanoGPT's estimate_mfu and litgpt's
estimate_flops count the same way). bench/ measures with it; the study reports a run's compute with it.

  per token, forward:   2 x (linear weights of the blocks) + 2 x (LoRA factors, when adapters are on)
  attention, forward:   4 x d_attn per (query, key) pair attended, per layer (QK^T and AV)
  backward:             2 per frozen weight per token (activation gradient only), +2 more per trainable (LoRA)
                        weight; attention backward = 2 x its forward
  vocab projection:     2 x V x dim per row that goes through it, forward; +2 x V x dim for the hidden-state
                        gradient in a training pass (the projection is frozen under LoRA)
Not counted: embeddings, norms, RoPE, softmax, the optimizer (below ~2% at these sizes).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Dims:
    body: int    # linear weights of all blocks
    lora: int    # LoRA factor weights (A and B) of all adapted layers
    d_attn: int  # n_heads * head_dim
    layers: int
    vocab: int
    dim: int

    @classmethod
    def of(cls, cfg, lora_r):
        d, q, kv, h = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.hidden_dim
        shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, h), (d, h), (h, d)]  # q k v o gate up down: (in, out)
        body = sum(i * o for i, o in shapes) * cfg.n_layers
        lora = sum(lora_r * (i + o) for i, o in shapes) * cfg.n_layers
        return cls(body, lora, q, cfg.n_layers, cfg.vocab_size, d)


def pass_flops(dims, tokens, attn_pairs, vocab_rows, train, lora_on=True):
    """FLOPs of one pass over `tokens` positions (padding included: it is computed), `attn_pairs` (query, key)
    pairs of one layer, `vocab_rows` rows through the vocab projection.
    train: forward + backward (policy); else forward only (reference, no grad)."""
    body = (4 if train else 2) * dims.body * tokens
    lora = ((6 if train else 2) * dims.lora * tokens) if lora_on else 0
    attn = (12 if train else 4) * dims.d_attn * attn_pairs * dims.layers
    vocab = (4 if train else 2) * dims.vocab * dims.dim * vocab_rows
    return {"body": body, "lora": lora, "attention": attn, "vocab": vocab, "total": body + lora + attn + vocab}


def _causal(n):
    return n * (n + 1) // 2  # (query, key) pairs of a causal block of n tokens


def sft_example_flops(dims, p, c, train=True):
    """One prompt (p tokens) + completion (c) row; only completion rows go through the vocab projection."""
    return pass_flops(dims, p + c, _causal(p + c), c, train)["total"]


def dpo_example_flops(dims, p, c, r, layout="shared-prompt", train=True, full_logits=False, lora_on=True):
    """One pair. shared-prompt: one row [prompt | chosen | rejected], rejected attends to the prompt and itself;
    concat: two rows prompt + chosen, prompt + rejected. full_logits: every position through the projection
    (the naive loss), else only the completion rows."""
    if layout == "concat":
        tokens, pairs = 2 * p + c + r, _causal(p + c) + _causal(p + r)
    else:
        tokens, pairs = p + c + r, _causal(p + c) + p * r + _causal(r)
    rows = tokens if full_logits else c + r
    return pass_flops(dims, tokens, pairs, rows, train, lora_on)["total"]


def run_flops(dims, sft=None, dpo=None, examples_seen=0, n_pairs_cached=0):
    """{"train", "reference", "naive_dpo"} FLOPs of a run that saw `examples_seen` examples (steps x batch),
    at the mean cost of its data set's examples. sft: [(p, c)]; dpo: [(p, c, r)] (all pairs; the cached
    reference pass runs once over `n_pairs_cached` of them).
    naive_dpo: the same DPO in the TRL-style layout: concat rows, full logits, the reference recomputed in
    every step (adapters off, no grad)."""
    if sft is not None:
        mean = sum(sft_example_flops(dims, p, c) for p, c in sft) / len(sft)
        return {"train": mean * examples_seen, "reference": 0.0, "naive": mean * examples_seen}
    n = len(dpo)
    train = sum(dpo_example_flops(dims, *x) for x in dpo) / n
    ref = sum(dpo_example_flops(dims, *x, train=False, lora_on=True) for x in dpo) / n
    naive = sum(dpo_example_flops(dims, *x, layout="concat", full_logits=True)
                + dpo_example_flops(dims, *x, layout="concat", full_logits=True, train=False, lora_on=True)
                for x in dpo) / n
    return {"train": train * examples_seen, "reference": ref * n_pairs_cached, "naive": naive * examples_seen}
