"""Parity of our hand-written model with transformers' on tiny random checkpoints loaded through our loader.

Tolerance: torch.testing.assert_close's fp32 default (rtol 1.3e-6, atol 1e-5). Both sides run the same math in
fp32; only the order of floating-point operations differs (SDPA vs eager attention), so differences stay at a
few ulps of logits of size ~1.
"""
from types import SimpleNamespace

import pytest
import torch
from conftest import make_hf_model, save_checkpoint

from minift.model.checkpoint import load_model
from minift.eval.generate import generate


def logits_of(ours, ids, **kw):
    with torch.no_grad():
        return ours.lm_head(ours(ids, **kw))


def hf_greedy(model, ids, n):
    """Reference greedy decoding: a full forward per step, no cache."""
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids[:, -n:]


CASES = {
    "llama_gqa_tied": dict(kind="llama", tie_word_embeddings=True),
    "llama3_rope_scaling": dict(kind="llama", rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "mistral_window": dict(kind="mistral", sliding_window=8),
    "mistral_no_window": dict(kind="mistral", sliding_window=None),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    kw = dict(CASES[request.param])
    hf = make_hf_model(kw.pop("kind"), **kw)
    ckpt = save_checkpoint(hf, tmp_path_factory.mktemp(request.param))
    return hf, load_model(ckpt)


def test_logits_match_transformers(pair):
    hf, ours = pair
    torch.manual_seed(1)
    ids = torch.randint(0, 300, (2, 40))  # 40 > sliding window 8 and > llama3 original context 16
    with torch.no_grad():
        ref = hf(ids).logits
    torch.testing.assert_close(logits_of(ours, ids), ref)


def test_greedy_continuation_matches_transformers(pair):
    hf, ours = pair
    torch.manual_seed(2)
    ids = torch.randint(0, 300, (1, 7))
    ref = hf_greedy(hf, ids, 20)
    tok = SimpleNamespace(pad_id=0, stop_ids=set())
    got = generate(ours, tok, [ids[0].tolist()], max_new_tokens=20)
    assert got[0] == ref[0].tolist()


def test_batched_left_padded_generation_equals_one_by_one(pair):
    _, ours = pair
    tok = SimpleNamespace(pad_id=0, stop_ids=set())
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    together = generate(ours, tok, prompts, max_new_tokens=12)
    alone = [generate(ours, tok, [p], max_new_tokens=12)[0] for p in prompts]
    assert together == alone


def test_explicit_causal_mask_equals_default(pair):
    _, ours = pair
    ids = torch.randint(0, 300, (2, 12))
    causal = torch.ones(12, 12, dtype=torch.bool).tril().expand(2, 12, 12)
    torch.testing.assert_close(logits_of(ours, ids, mask=causal), logits_of(ours, ids), rtol=0, atol=1e-5)


def test_gradient_checkpointing_gives_same_gradients(tiny_llama):
    ckpt, _ = tiny_llama
    grads = []
    for flag in (False, True):
        model = load_model(ckpt).train()
        model.gradient_checkpointing = flag
        ids = torch.arange(30).view(2, 15)
        model.lm_head(model(ids)).logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # recomputation repeats the same ops exactly


def test_tied_embeddings_share_storage(tiny_llama):
    ckpt, _ = tiny_llama
    model = load_model(ckpt)
    assert model.lm_head.weight is model.embed.weight


def test_swiglu_function_matches_autograd_in_fp64():
    """The hand-written SwiGLU backward (only gate and up saved) against autograd through F.silu(gate) * up:
    gradcheck in fp64 (finite differences), then values and gradients at fp64 round-off, on values wide enough
    (|gate| up to ~12) that sigmoid saturates on both sides."""
    from minift.model.transformer import SwiGLU, swiglu

    g = torch.Generator().manual_seed(0)
    gate = (4 * torch.randn(5, 7, generator=g, dtype=torch.float64)).requires_grad_()
    up = torch.randn(5, 7, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(SwiGLU.apply, (gate, up))
    upstream = torch.randn(5, 7, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad((swiglu(gate, up) * upstream).sum(), (gate, up))
    ref = torch.autograd.grad((torch.nn.functional.silu(gate) * up * upstream).sum(), (gate, up))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_unpadded_rows_compute_what_padded_rows_compute(pair, checkpointing):
    """`lengths` makes the model skip the right pads (model.Unpadded): the real tokens' hidden states and every
    parameter's gradient must equal those of the padded forward; the pads' outputs are zeros. Both with mask None
    (causal) and with an explicit mask, and with Mistral's window (40 > 8). Tolerance: the fp32 default; the only
    difference is matmul shapes (N real rows instead of B x T), which changes the blocking, not the math."""
    _, ours = pair
    ours.train()
    ours.gradient_checkpointing = checkpointing
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([40, 23, 7])
    ids = torch.randint(0, 300, (3, 40), generator=g)
    valid = torch.arange(40)[None, :] < lengths[:, None]  # (3, 40)
    probe = torch.randn(3, 40, ours.config.dim, generator=g) * valid[..., None]  # real tokens only
    causal = torch.ones(40, 40, dtype=torch.bool).tril().expand(3, 40, 40)
    try:
        for mask in (None, causal):
            out = {}
            for lens in (None, lengths):
                ours.zero_grad(set_to_none=True)
                hidden = ours(ids, mask=mask, lengths=lens)  # (3, 40, dim)
                (hidden * probe).sum().backward()
                out[lens is None] = hidden.detach(), {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
            (h_pad, g_pad), (h_unpad, g_unpad) = out[True], out[False]
            torch.testing.assert_close(h_unpad[valid], h_pad[valid])
            assert h_unpad[~valid].abs().max() == 0
            assert g_unpad.keys() == g_pad.keys() and len(g_pad) > 5  # lm_head (untied) gets none: not used
            for name in g_pad:
                torch.testing.assert_close(g_unpad[name], g_pad[name], msg=name)
    finally:
        ours.gradient_checkpointing = False
        ours.zero_grad(set_to_none=True)
        ours.eval()
