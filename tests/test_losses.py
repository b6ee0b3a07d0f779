"""SFT and DPO losses against transformers (fp64 log-softmax of the HF model's logits) and TRL's own loss code.

The policy is our tiny Llama with a LoRA adapter whose B factors are random (so policy != reference); the HF
policy is the HF model with each adapter delta (scaling * B @ A) added into its weight, the HF reference is the
HF model itself. Tolerance 1e-5 (rtol and atol): our path runs in fp32, the references in fp64; sequence sums
of ~10 log-probs of magnitude ~6 keep ~1e-6 relative error in fp32.
"""
import copy
import types
from collections import defaultdict

import pytest
import torch

from minift.train import batching, data, losses

from minift.model import lora
from minift.train.reference import Reference

from conftest import make_pairs

TOL = dict(rtol=1e-5, atol=1e-5)
BETA = 3.5  # large: the tiny random model's log-ratios are small (|delta| < 1); this puts beta*delta at
# [0.6, 1.2, -2.1] for the pairs below, so the losses are in their nonlinear range and hinge's relu clips one pair
LAYOUT_CONCAT, LAYOUT_SHARED = "concat", "shared-prompt"


@pytest.fixture(scope="module")
def setup(adapted):
    model, hf_policy, hf_ref = adapted
    pairs = make_pairs()
    return model, hf_policy, hf_pairs(hf_policy, pairs), hf_pairs(hf_ref, pairs), pairs


def hf_sequence(hf_model, prompt, completion):
    """(sum of log p, sum over positions of the mean-over-vocab logit, n tokens), all fp64, from full logits."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = hf_model(ids).logits[0].double()  # (T, V)
    pos = torch.arange(len(prompt) - 1, ids.shape[1] - 1)  # the positions that predict the completion
    logp = torch.log_softmax(logits[pos], -1).gather(1, ids[0, pos + 1, None]).squeeze(1)
    return logp.sum(), logits[pos].mean(-1).sum(), len(completion)


def hf_pairs(hf_model, pairs):
    """[2P] per-sequence fp64 log-probs, mean-logit sums and token counts (chosen first)."""
    rows = [hf_sequence(hf_model, e.prompt_ids, getattr(e, key)) for key in ("chosen_ids", "rejected_ids")
            for e in pairs]
    return [torch.tensor([r[k] for r in rows], dtype=torch.float64) for k in range(3)]


def trl_loss(hf_policy, pairs, ref, loss_types, loss_weights, beta, eps):
    """TRL 1.16's own DPOTrainer._compute_loss on the HF policy, with precomputed reference log-probs.

    It is an unbound method: a namespace with the attributes it reads stands in for the trainer."""
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    model = copy.deepcopy(hf_policy)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    rows = [e.prompt_ids + e.chosen_ids for e in pairs] + [e.prompt_ids + e.rejected_ids for e in pairs]
    plen = [len(e.prompt_ids) for e in pairs] * 2
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    attn, comp = torch.zeros_like(ids), torch.zeros_like(ids)
    for b, (r, lp) in enumerate(zip(rows, plen)):  # right padding, as TRL's collator does
        ids[b, :len(r)], attn[b, :len(r)], comp[b, lp:len(r)] = torch.tensor(r), 1, 1
    P = len(pairs)
    inputs = dict(input_ids=ids, attention_mask=attn, completion_mask=comp,
                  ref_chosen_logps=ref[:P], ref_rejected_logps=ref[P:])
    acc = types.SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    fake = types.SimpleNamespace(
        model=model, accelerator=acc, ld_alpha=None, precompute_ref_logps=True, aux_loss_enabled=False,
        f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, beta=beta, loss_types=loss_types,
        loss_weights=loss_weights, label_smoothing=eps, use_weighting=False, _total_train_tokens=0, _tp_size=1,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, ref_model=None, args=None)
    with torch.no_grad():
        loss = DPOTrainer._compute_loss(fake, model, inputs, False)
    mode = "train" if model.training else "eval"
    return float(loss), {k: v[-1] for k, v in fake._metrics[mode].items()}


METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "logits/chosen", "logits/rejected")


def ours(model, pairs, loss, eps=0.0, sft_weight=0.0, layout=LAYOUT_CONCAT, backward=False):
    batch = batching.dpo_batch(pairs, layout)
    ref = Reference("adapters-off", model).logps(batch)
    loss_sum, sums = losses.dpo_loss_sums(losses.sequence_logps(model, batch), ref, BETA, loss, eps, sft_weight)
    P = len(pairs)
    if backward:
        model.zero_grad(set_to_none=True)
        (loss_sum / P).backward()
    return loss_sum.detach() / P, {k: float(v) / P for k, v in sums.items()}


@pytest.mark.parametrize("loss,eps,sft_weight", [("sigmoid", 0.0, 0.0), ("ipo", 0.0, 0.0), ("hinge", 0.0, 0.0),
                                                  ("robust", 0.1, 0.0), ("sigmoid", 0.0, 0.5)])
def test_dpo_matches_trl_and_hf(setup, loss, eps, sft_weight):
    model, hf_policy, (pol, logit_sums, counts), (ref, _, _), pairs = setup
    # Independent log-probs from transformers' logits in fp64: ours must match them token sum by token sum.
    batch = batching.dpo_batch(pairs, LAYOUT_CONCAT)
    seq = losses.sequence_logps(model, batch)
    torch.testing.assert_close(seq.logps.double(), pol, **TOL)
    torch.testing.assert_close(Reference("adapters-off", model).logps(batch).double(), ref, **TOL)
    torch.testing.assert_close(seq.n_tokens, counts.long())
    torch.testing.assert_close(seq.mean_logits.double(), logit_sums / counts, **TOL)
    assert (pol - ref).abs().max() > 0.1  # the adapter makes the policy differ from the reference

    types_, weights = ([loss, "sft"], [1.0, sft_weight]) if sft_weight else ([loss], [1.0])
    want_loss, want = trl_loss(hf_policy, pairs, ref, types_, weights, BETA, eps)
    got_loss, got = ours(model, pairs, loss, eps, sft_weight)
    assert got_loss.item() == pytest.approx(want_loss, rel=1e-5, abs=1e-5)
    for k in METRICS:
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-5), k


def test_conservative_dpo_formula(setup):
    """sigmoid with label_smoothing: cDPO, -(1-e) logsig(b d) - e logsig(-b d). TRL 1.16's sigmoid ignores
    label_smoothing, so the formula is restated here (older TRL's dpo_loss "sigmoid" branch)."""
    model, _, (pol, _, _), (ref, _, _), pairs = setup
    P, eps = len(pairs), 0.2
    d = BETA * ((pol[:P] - ref[:P]) - (pol[P:] - ref[P:]))
    want = (-(1 - eps) * torch.nn.functional.logsigmoid(d) - eps * torch.nn.functional.logsigmoid(-d)).mean()
    got, _ = ours(model, pairs, "sigmoid", eps)
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-5)
    plain, _ = ours(model, pairs, "sigmoid", 0.0)
    assert abs(got.item() - plain.item()) > 1e-3  # label smoothing changes the loss


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_dpo_gradient_matches_autograd(setup, loss):
    """The fused kernel's backward inside the DPO loss equals autograd through full fp64 logits."""
    model, _, _, _, pairs = setup
    ours(model, pairs, loss, sft_weight=0.3, backward=True)
    got = lora_grads(model)
    m64 = copy.deepcopy(model).double()
    batch = batching.dpo_batch(pairs, LAYOUT_CONCAT)
    with torch.no_grad(), lora.adapters_disabled(m64):
        ref = naive_seq_logps(m64, batch)
    pol = naive_seq_logps(m64, batch)
    P = len(pairs)
    n = torch.bincount(batch.segment, minlength=2 * P)
    per_pair, _, _ = losses.dpo_losses(pol[:P], pol[P:], ref[:P], ref[P:], BETA, loss,
                                       chosen_tokens=n[:P], rejected_tokens=n[P:])
    (per_pair.mean() + 0.3 * (-pol[:P].sum() / n[:P].sum())).backward()
    want = lora_grads(m64)
    for k in got:
        # fp32 gradients against fp64. The error of an fp32 sum over many tokens scales with the tensor's largest
        # terms, not with each entry (a small entry can be the difference of large ones), so the absolute
        # tolerance is 1e-5 of the tensor's largest entry (~100 fp32 ulps of it); measured: <= 1.4e-6 of it.
        scale = want[k].abs().max().item()
        torch.testing.assert_close(got[k].double(), want[k], rtol=1e-4, atol=1e-5 * scale, msg=k)


def naive_seq_logps(model, batch):
    hidden = model(batch.ids, batch.positions, batch.mask)  # (B, T, H)
    logits = model.lm_head(hidden).flatten(0, 1)[batch.pred_index]  # (M, V)
    logp = torch.log_softmax(logits, -1).gather(1, batch.targets[:, None]).squeeze(1)
    return logp.new_zeros(int(batch.n_seqs)).index_add(0, batch.segment, logp)


def test_layouts_agree(setup):
    """shared-prompt and concat: same per-sequence log-probs, loss, metrics and gradients (fp32, 1e-5)."""
    model, _, _, _, pairs = setup
    results = {}
    for layout in (LAYOUT_CONCAT, LAYOUT_SHARED):
        batch = batching.dpo_batch(pairs, layout)
        seq = losses.sequence_logps(model, batch)
        loss, metrics = ours(model, pairs, "sigmoid", sft_weight=0.2, layout=layout, backward=True)
        results[layout] = (seq.logps.detach(), seq.n_tokens, loss, metrics, lora_grads(model))
    (lc, nc, loss_c, met_c, grad_c), (ls, ns, loss_s, met_s, grad_s) = results.values()
    assert batching.dpo_batch(pairs, LAYOUT_SHARED).ids.shape[0] == len(pairs)  # really one row per pair
    torch.testing.assert_close(ls, lc, **TOL)
    torch.testing.assert_close(ns, nc)
    torch.testing.assert_close(loss_s, loss_c, **TOL)
    for k in METRICS:
        assert met_s[k] == pytest.approx(met_c[k], rel=1e-5, abs=1e-5), k
    for k in grad_c:
        torch.testing.assert_close(grad_s[k], grad_c[k], **TOL, msg=k)


def test_micro_batches_sum_to_the_step(setup):
    """Sums over two micro-batches / total pairs = one batch of all pairs (loss and metrics)."""
    model, _, _, _, pairs = setup
    pairs = pairs + make_pairs(1, seed=5)
    ref = Reference("adapters-off", model)

    def loss_sum(batch):
        return losses.dpo_loss_sums(losses.sequence_logps(model, batch), ref.logps(batch), BETA)[0]

    loss_all = loss_sum(batching.dpo_batch(pairs, LAYOUT_CONCAT))
    parts = [batching.dpo_batch(pairs[:2], LAYOUT_CONCAT), batching.dpo_batch(pairs[2:], LAYOUT_CONCAT)]
    assert len(pairs) == 4
    torch.testing.assert_close(sum(loss_sum(b) for b in parts) / 4, loss_all / 4, **TOL)


def test_policy_equals_reference_at_start(setup):
    """With the adapter as its own reference, DPO starts at log 2 with zero rewards (sigmoid)."""
    model, _, _, _, pairs = setup
    m = copy.deepcopy(model)
    lora.add_adapter_copy(m, "default", "reference")
    batch = batching.dpo_batch(pairs, LAYOUT_CONCAT)
    loss_sum, sums = losses.dpo_loss_sums(losses.sequence_logps(m, batch), Reference("adapter", m).logps(batch), BETA)
    P = len(pairs)
    assert (loss_sum / P).item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)
    assert float(sums["rewards/margins"]) == pytest.approx(0.0, abs=1e-6)


def test_sft_loss_matches_hf(setup):
    model, hf_policy, _, _, pairs = setup
    exs = [data.SFTExample(e.prompt_ids + e.chosen_ids, [False] * len(e.prompt_ids) + [True] * len(e.chosen_ids))
           for e in pairs]
    want = [hf_sequence(hf_policy, e.prompt_ids, e.chosen_ids) for e in pairs]
    nll, n = losses.sft_loss_sum(model, batching.sft_batch(exs))
    assert n == sum(w[2] for w in want)
    assert nll.item() == pytest.approx(-sum(w[0] for w in want).item(), rel=1e-5)
    mean = losses.sft_loss(model, batching.sft_batch(exs))
    assert mean.item() == pytest.approx(nll.item() / n, rel=1e-6)


def test_bad_inputs(setup):
    model, _, _, _, pairs = setup
    batch = batching.dpo_batch(pairs, LAYOUT_CONCAT)
    with pytest.raises(losses.MinifTError, match=r"ref_logps must have shape \[6\]"):
        losses.dpo_loss_sums(losses.sequence_logps(model, batch), torch.zeros(4), BETA)
    with pytest.raises(losses.MinifTError, match="unknown loss type 'kto'"):
        losses.dpo_losses(*torch.zeros(4, 2), BETA, "kto")
    with pytest.raises(losses.MinifTError, match="ipo"):
        losses.dpo_losses(*torch.zeros(4, 2), BETA, "ipo")


@pytest.mark.parametrize("loss", ["sigmoid", "hinge", "robust"])
def test_dpo_positive_against_its_formula_in_fp64(loss):
    """DPO-Positive (Pal et al. 2024, eq. 3): the score inside the loss is delta - lam * max(0, ref_c - pi_c).
    Written here from the paper with fp64 numbers in the 'sigmoid' form and mapped to hinge and robust the way
    delta enters them; a chosen answer above its reference gives plain DPO's loss and gradient."""
    pc = torch.tensor([-3.0, -5.5, -2.0, -7.25], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-4.0, -5.0, -6.0, -7.0], dtype=torch.float64)
    rc = torch.tensor([-3.5, -5.0, -2.5, -7.0], dtype=torch.float64)  # pairs 1 and 3: chosen fell below the ref
    rr = torch.tensor([-3.75, -5.25, -5.0, -7.125], dtype=torch.float64)  # binary fractions: fp32 holds them
    beta, lam, eps = 0.2, 5.0, 0.1
    got, _, _ = losses.dpo_losses(pc, pr, rc, rr, beta, loss, eps if loss == "robust" else 0.0, dpop_lambda=lam)
    fell = torch.clamp(rc - pc, min=0)
    z = beta * ((pc - rc) - (pr - rr) - lam * fell)
    sig = torch.sigmoid
    want = {"sigmoid": -torch.log(sig(z)),
            "hinge": torch.clamp(1 - z, min=0),
            "robust": (-(1 - eps) * torch.log(sig(z)) + eps * torch.log(sig(-z))) / (1 - 2 * eps)}[loss]
    torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)  # the same fp64 formula: exact
    plain, _, _ = losses.dpo_losses(pc, pr, rc, rr, beta, loss, eps if loss == "robust" else 0.0)
    above = fell == 0
    assert torch.equal(got[above], plain[above]) and (got[~above] > plain[~above]).all()
    g_dpop, = torch.autograd.grad(got.sum(), pc)
    g_plain, = torch.autograd.grad(plain.sum(), pc)
    if loss != "hinge":  # (hinge's pair 0 is clipped, gradient 0 either way)
        assert (g_dpop[~above].abs() > g_plain[~above].abs()).all()  # the penalty pushes a fallen chosen up harder
    assert torch.equal(g_dpop[above], g_plain[above])
    # dpo_loss_sums (the trainer's entry) passes the term through: its loss sum is the sum of these losses (it
    # takes the reference in fp32, as the cached table holds it: every reference value here is exact in fp32)
    policy = losses.SeqLogps(torch.cat([pc, pr]).detach(), torch.full((8,), 3), torch.zeros(8))
    total, _ = losses.dpo_loss_sums(policy, torch.cat([rc, rr]), beta, loss, eps if loss == "robust" else 0.0,
                                    dpop_lambda=lam)
    torch.testing.assert_close(total, want.sum().detach(), rtol=1e-12, atol=1e-12)


def test_dpo_positive_is_refused_where_it_has_no_meaning():
    from minift.train.train_config import DPOConfig

    with pytest.raises(losses.MinifTError, match="not ipo"):
        losses.dpo_losses(*torch.zeros(4, 2), BETA, "ipo", chosen_tokens=torch.ones(2), rejected_tokens=torch.ones(2),
                          dpop_lambda=1.0)
    for loss in ("ipo", "simpo", "orpo", "kto"):
        with pytest.raises(losses.MinifTError, match=f"--dpop-lambda applies to .* not {loss}"):
            DPOConfig(loss=loss, dpop_lambda=1.0).check()


def test_drop_shared_tail_keeps_the_span_where_the_answers_differ():
    P = data.PrefExample
    cut = data.drop_shared_tail(P([9], [1, 2, 7, 8], [3, 7, 8]))
    assert (cut.chosen_ids, cut.rejected_ids) == ([1, 2], [3])
    cut = data.drop_shared_tail(P([9], [1, 7, 8], [7, 8]))  # rejected is chosen's tail: one token stays in each
    assert (cut.chosen_ids, cut.rejected_ids) == ([1, 7], [7])
    same = P([9], [1, 2], [1, 3])
    assert data.drop_shared_tail(same) is same  # nothing shared at the end: the pair as it was


def test_drop_shared_tail_scores_the_differing_span_against_hf_fp64(adapted):
    """The cut pairs' log-probs and DPO loss equal those of the full pairs' answers read by transformers in fp64 up
    to the last differing token: the dropped tail changes nothing before it (causal attention)."""
    model, hf_policy, hf_ref = adapted
    tail = [5, 17, 33, 2]
    full = [data.PrefExample(e.prompt_ids, e.chosen_ids + tail, e.rejected_ids + tail) for e in make_pairs()]
    for e in full:  # the make_pairs answers end in different tokens, so the cut is exactly the tail
        assert e.chosen_ids[-len(tail) - 1] != e.rejected_ids[-len(tail) - 1]
    cut = [data.drop_shared_tail(e) for e in full]

    def hf_span(hf, e, key):
        """fp64 sum of log p over the answer's tokens before the tail, read from the full sequence's logits."""
        ids = torch.tensor([e.prompt_ids + getattr(e, key)])
        with torch.no_grad():
            logp = torch.log_softmax(hf(ids).logits[0].double(), -1)  # (T, V)
        n = len(getattr(e, key)) - len(tail)
        pos = torch.arange(len(e.prompt_ids) - 1, len(e.prompt_ids) - 1 + n)
        return logp[pos, ids[0, pos + 1]].sum()

    want = {k: torch.stack([hf_span(hf, e, key) for key in ("chosen_ids", "rejected_ids") for e in full])
            for k, hf in (("policy", hf_policy), ("ref", hf_ref))}
    batch = batching.dpo_batch(cut, LAYOUT_CONCAT)
    with torch.no_grad():
        got = losses.sequence_logps(model, batch).logps.double()
        ref = Reference("adapters-off", model).logps(batch).double()
    torch.testing.assert_close(got, want["policy"], rtol=1e-5, atol=1e-5)  # fp32 sums of ~10 terms against fp64
    torch.testing.assert_close(ref, want["ref"], rtol=1e-5, atol=1e-5)
    loss, _ = ours(model, cut, "sigmoid")
    P = len(cut)
    delta = (want["policy"][:P] - want["ref"][:P]) - (want["policy"][P:] - want["ref"][P:])
    torch.testing.assert_close(loss.double(), -torch.nn.functional.logsigmoid(BETA * delta).mean(),
                               rtol=1e-5, atol=1e-5)


def test_drop_shared_tail_is_refused_where_it_has_no_meaning():
    from minift.train.train_config import DPOConfig

    DPOConfig(loss="ipo", drop_shared_tail=True).check()
    for over in ({"loss": "simpo"}, {"loss": "orpo"}, {"loss": "kto"}, {"sft_weight": 1.0}):
        with pytest.raises(losses.MinifTError, match="--drop-shared-tail applies to"):
            DPOConfig(drop_shared_tail=True, **over).check()
