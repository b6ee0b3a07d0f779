"""Batch layouts: the flat (pred_index, targets, segment) lists, the shared-prompt mask, and the proof that the
shared-prompt layout gives the same per-sequence log-probs and gradients as concat (and as each sequence run
alone in fp64) on tiny Llama and Mistral (sliding window shorter than the rows) checkpoints."""
import copy

import pytest
import torch
from conftest import make_hf_model, save_checkpoint

from minift.train.batching import LAYOUTS, dpo_batch, sft_batch
from minift.model.checkpoint import load_model
from minift.train.data import PrefExample, SFTExample
from minift.errors import MinifTError

PAD = 263


def test_sft_batch_targets_are_next_tokens_and_never_pads():
    exs = [SFTExample([5, 6, 7, 8], [False, False, True, True]), SFTExample([9, 10], [False, True]),
           SFTExample([1, 2, 3, 4, 5, 6], [False, True, False, True, True, False])]
    b = sft_batch(exs, pad_id=PAD)
    assert b.ids.shape == (3, 6) and b.n_seqs == 3 and b.n_tokens == 12 and b.mask is None
    assert b.ids[1, 2:].eq(PAD).all() and b.positions[2].tolist() == list(range(6))
    flat = b.ids.reshape(-1)  # (B*T,)
    assert torch.equal(flat[b.pred_index + 1], b.targets)  # hidden at t predicts token t+1
    assert b.targets.tolist() == [7, 8, 10, 2, 4, 5] and b.segment.tolist() == [0, 0, 1, 2, 2, 2]
    hidden = torch.arange(18.0).reshape(3, 6, 1)  # (B, T, H=1): value = flat index
    assert hidden.flatten(0, 1)[b.pred_index][:, 0].long().tolist() == b.pred_index.tolist()
    with pytest.raises(MinifTError, match="token 0"):
        sft_batch([SFTExample([1, 2], [True, True])])


PAIRS = [PrefExample([11, 12], [21, 22], [31], where="f:1"),  # (p, c, r) = (2, 2, 1)
         PrefExample([13], [23], [33, 34, 35], where="f:2")]  # (1, 1, 3)


def test_shared_prompt_rows_mask_and_positions_by_hand():
    b = dpo_batch(PAIRS, "shared-prompt", pad_id=PAD)
    assert b.ids.tolist() == [[11, 12, 21, 22, 31], [13, 23, 33, 34, 35]]
    assert b.positions.tolist() == [[0, 1, 2, 3, 2], [0, 1, 1, 2, 3]]
    T, F = 1, 0
    assert b.mask.int().tolist() == [
        [[T, F, F, F, F],  # prompt
         [T, T, F, F, F],
         [T, T, T, F, F],  # chosen: prompt + itself
         [T, T, T, T, F],
         [T, T, F, F, T]],  # rejected: prompt + itself, not chosen
        [[T, F, F, F, F],
         [T, T, F, F, F],
         [T, F, T, F, F],
         [T, F, T, T, F],
         [T, F, T, T, T]]]
    # the last prompt token (flat 1 and 5) predicts chosen[0] and rejected[0]
    assert b.pred_index.tolist() == [1, 2, 5, 1, 5, 7, 8]
    assert b.targets.tolist() == [21, 22, 23, 31, 33, 34, 35] and b.segment.tolist() == [0, 0, 1, 2, 3, 3, 3]
    assert b.n_seqs == 4 and b.n_tokens == 10


def test_shared_prompt_pads_attend_to_themselves_only():
    pairs = PAIRS + [PrefExample([1], [4], [5])]  # a row of 3 beside rows of 5: two pad slots
    b = dpo_batch(pairs, "shared-prompt", pad_id=PAD)
    assert b.ids[2].tolist() == [1, 4, 5, PAD, PAD]
    assert b.mask[2, 3].tolist() == [False, False, False, True, False] and b.mask.any(-1).all()
    assert not b.mask[2, :3, 3:].any()  # no real token sees a pad


def test_concat_rows_and_same_targets_as_shared():
    c, s = dpo_batch(PAIRS, "concat", pad_id=PAD), dpo_batch(PAIRS, "shared-prompt", pad_id=PAD)
    assert c.ids.tolist() == [[11, 12, 21, 22], [13, 23, PAD, PAD], [11, 12, 31, PAD], [13, 33, 34, 35]]
    assert c.mask is None and c.n_tokens == 13 and c.n_seqs == 4
    assert torch.equal(c.ids.reshape(-1)[c.pred_index + 1], c.targets)
    assert torch.equal(c.targets, s.targets) and torch.equal(c.segment, s.segment)


def test_bad_layout_and_empty_inputs():
    for wrong in ("packed", "shared_prompt"):  # one spelling of each layout name
        with pytest.raises(MinifTError, match=f"unknown DPO layout '{wrong}'"):
            dpo_batch(PAIRS, wrong)
    with pytest.raises(MinifTError, match="f:9: prompt, chosen and rejected"):
        dpo_batch([PrefExample([], [1], [2], where="f:9")], "concat")
    with pytest.raises(MinifTError, match="no pairs"):
        dpo_batch([], "shared-prompt")


# ---- layout equivalence on real (tiny) models ----
WINDOW = 6  # Mistral sliding window, shorter than all rows below but one (prompt 1 + chosen 4)
SHAPES = [(5, 7, 3), (9, 2, 11), (3, 12, 6), (1, 4, 8), (8, 8, 8)]  # (prompt, chosen, rejected) lengths


def make_pairs(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for p, c, r in SHAPES:
        ids = torch.randint(0, 260, (p + c + r,), generator=g).tolist()
        out.append(PrefExample(ids[:p], ids[p:p + c], ids[p + c:]))
    out[4].rejected_ids[0] = out[4].chosen_ids[0]  # a shared first reply token, common in real pairs
    return out


@pytest.fixture(scope="module", params=["llama", "mistral_window"])
def model(request, tiny_llama, tmp_path_factory):
    if request.param == "llama":
        return load_model(tiny_llama[0])
    hf = make_hf_model("mistral", sliding_window=WINDOW)
    m = load_model(save_checkpoint(hf, tmp_path_factory.mktemp("mistral_window")))
    assert m.config.sliding_window == WINDOW
    return m


def seq_logps(model, batch):
    """Per-sequence sums of target log-probs: fp64 log_softmax of the selected logits, summed by segment."""
    hidden = model(**batch.model_inputs())  # (B, T, H)
    logits = model.lm_head(hidden.flatten(0, 1)[batch.pred_index]).double()  # (M, V)
    lp = torch.log_softmax(logits, -1).gather(1, batch.targets[:, None])[:, 0]  # (M,)
    return torch.zeros(batch.n_seqs, dtype=lp.dtype).index_add(0, batch.segment, lp)


def alone_fp64(model, pairs):
    """Independent reference: each prompt + completion run by itself (no padding, no mask) in fp64."""
    m64 = copy.deepcopy(model).double()
    out = []
    for side in ("chosen_ids", "rejected_ids"):
        for e in pairs:
            comp = getattr(e, side)
            ids = torch.tensor([e.prompt_ids + comp])
            with torch.no_grad():
                logits = m64.lm_head(m64(ids))[0, len(e.prompt_ids) - 1:-1]  # (len(comp), V)
            out.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(comp)[:, None]).sum())
    return torch.stack(out)


def test_layouts_give_the_same_sequence_logps(model):
    pairs = make_pairs()
    with torch.no_grad():
        got = {lay: seq_logps(model, dpo_batch(pairs, lay, pad_id=PAD)) for lay in LAYOUTS}
        hidden = model(**dpo_batch(pairs, "shared-prompt", pad_id=PAD).model_inputs())
    assert torch.isfinite(hidden).all()  # pad rows are not empty attention rows (no NaN)
    ref = alone_fp64(model, pairs)
    # Sums of up to 12 log-probs of size ~6 (random model, V=300; sums up to ~70) from fp32 hidden states:
    # measured differences are ~2e-7, so 1e-5 absolute leaves room for other BLAS builds; a wrong mask or
    # position changes them by > 1e-2 (checked below).
    torch.testing.assert_close(got["shared-prompt"], got["concat"], rtol=0, atol=1e-5)
    torch.testing.assert_close(got["concat"], ref, rtol=0, atol=1e-5)
    # the layouts must matter: the shared row read with a plain causal mask (rejected sees chosen) differs
    b = dpo_batch(pairs, "shared-prompt", pad_id=PAD)
    b.mask = None
    with torch.no_grad():
        assert (seq_logps(model, b) - ref)[len(pairs):].abs().max() > 1e-2
    if model.config.sliding_window:  # and the window is active in these rows: without it the sums move
        model.config.sliding_window = None
        try:
            with torch.no_grad():
                assert (seq_logps(model, dpo_batch(pairs, "concat", pad_id=PAD)) - ref).abs().max() > 1e-3
        finally:
            model.config.sliding_window = WINDOW


def test_layouts_give_the_same_gradients(model):
    pairs = make_pairs(1)
    w = torch.randn(2 * len(pairs), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grads = {}
    for lay in LAYOUTS:
        model.zero_grad()
        (w * seq_logps(model, dpo_batch(pairs, lay, pad_id=PAD))).sum().backward()
        grads[lay] = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for name, g in grads["concat"].items():
        # fp32 gradients accumulated over ~100 tokens in two orders of operations (2P short rows vs P long
        # masked rows, where the prompt's gradient arrives summed from both replies): measured worst
        # difference 5.5e-7 of each tensor's largest entry, allowed 5e-6 of it. Relative to the tensor's
        # scale, not per entry, so that near-zero entries need not match to a few ulps of themselves.
        scale = g.abs().max().item()
        torch.testing.assert_close(grads["shared-prompt"][name], g, rtol=0, atol=5e-6 * scale, msg=name)
        assert scale > 0, name
