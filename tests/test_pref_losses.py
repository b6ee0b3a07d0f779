"""SimPO, ORPO and KTO against TRL 1.16's own loss code, and their gradients through the fused kernel.

The policy is our tiny Llama with a LoRA adapter whose B factors are random (a nonzero starting adapter); the HF
policy is the HF model in fp64 with each adapter delta added into its weight, the HF reference the HF model
itself. TRL's trainers run on the HF models (their own tokenisation-free entry points, with a namespace standing in
for the trainer), so TRL computes its log-probs from transformers' fp64 logits; ours come from the fused kernel in
fp32. Tolerance 1e-5 (rtol and atol): per-sequence sums of ~10 fp32 log-probs of magnitude ~6 keep ~1e-6 relative
error, and the losses are smooth functions of them with derivatives of order beta <= 2.
"""
import copy
import types
from collections import defaultdict

import pytest
import torch

from minift.train import batching, losses, pref_losses
from minift.errors import MinifTError
from minift.train.reference import Reference

from conftest import make_pairs
from minift.train.unpaired import KTOExample, assign_kl, kto_batch

TOL = dict(rel=1e-5, abs=1e-5)
CPU = types.SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "nll_loss")


@pytest.fixture(scope="module")
def setup(adapted):
    return adapted


def padded(rows, pad=0):
    """Right-padded (ids, attention mask) of a list of token lists."""
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, :len(r)], attn[b, :len(r)] = torch.tensor(r), 1
    return ids, attn


def trl_pair_batch(pairs):
    """The tokenized batch TRL's CPO / ORPO collators produce: {chosen,rejected}_{input_ids,attention_mask,labels},
    prompt positions labelled -100."""
    out = {}
    for key in ("chosen", "rejected"):
        rows = [e.prompt_ids + getattr(e, f"{key}_ids") for e in pairs]
        ids, attn = padded(rows)
        labels = ids.masked_fill(attn == 0, -100)
        for b, e in enumerate(pairs):
            labels[b, :len(e.prompt_ids)] = -100
        out.update({f"{key}_input_ids": ids, f"{key}_attention_mask": attn, f"{key}_labels": labels})
    return out


def trl_pair_trainer(cls, loss_method, **attrs):
    """A namespace with the attributes CPOTrainer / ORPOTrainer.get_batch_loss_metrics reads, their methods bound."""
    attrs = dict(accelerator=CPU, is_encoder_decoder=False, pad_token_id=0, padding_value=0, aux_loss_enabled=False,
                 label_smoothing=0.0, alpha=0.0, concatenated_inputs=cls.concatenated_inputs,
                 get_batch_logps=cls.get_batch_logps) | attrs
    fake = types.SimpleNamespace(**attrs)
    fake.concatenated_forward = types.MethodType(cls.concatenated_forward, fake)
    setattr(fake, loss_method, types.MethodType(getattr(cls, loss_method), fake))
    return fake


def ours_pairs(model, pairs, layout, fn, backward=False, **kw):
    batch = batching.dpo_batch(pairs, layout)
    loss_sum, sums = fn(losses.sequence_logps(model, batch), **kw)
    P = len(pairs)
    if backward:
        model.zero_grad(set_to_none=True)
        (loss_sum / P).backward()
    return loss_sum.item() / P, {k: float(v) / P for k, v in sums.items()}


def hf_completion_nll(hf_model, pairs):
    """Mean NLL per chosen completion token, fp64, from transformers' logits."""
    total, n = 0.0, 0
    for e in pairs:
        ids = torch.tensor([e.prompt_ids + e.chosen_ids])
        with torch.no_grad():
            logits = hf_model(ids).logits[0].double()
        pos = torch.arange(len(e.prompt_ids) - 1, ids.shape[1] - 1)
        total -= torch.log_softmax(logits[pos], -1).gather(1, ids[0, pos + 1, None]).sum().item()
        n += len(e.chosen_ids)
    return total / n


@pytest.mark.parametrize("layout", ["concat", "shared-prompt"])
@pytest.mark.parametrize("eps,cpo_alpha", [(0.0, 0.0), (0.1, 0.5)])
def test_simpo_matches_trl(setup, layout, eps, cpo_alpha):
    from trl.experimental.cpo import CPOTrainer

    model, hf_policy, _ = setup
    pairs = make_pairs()
    beta, gamma = 2.0, 0.5  # beta * (difference of mean log-probs) - gamma lands in [-1, 0.5]: the nonlinear range
    fake = trl_pair_trainer(CPOTrainer, "cpo_loss", beta=beta, loss_type="simpo", simpo_gamma=gamma,
                            cpo_alpha=cpo_alpha, label_smoothing=eps)
    with torch.no_grad():
        want_loss, want = CPOTrainer.get_batch_loss_metrics(fake, hf_policy, trl_pair_batch(pairs))
    got_loss, got = ours_pairs(model, pairs, layout, pref_losses.simpo_loss_sums, beta=beta, gamma=gamma,
                               label_smoothing=eps, sft_weight=cpo_alpha)
    assert got_loss == pytest.approx(want_loss.item(), **TOL)
    for k in PAIR_METRICS:
        assert got[k] == pytest.approx(want[k], **TOL), k
    assert 0 < want["rewards/accuracies"] < 1 or want["rewards/margins"] != 0  # a batch that tells cases apart


@pytest.mark.parametrize("layout", ["concat", "shared-prompt"])
def test_orpo_matches_trl(setup, layout):
    """Everything but the NLL term equals TRL's; TRL's NLL runs over prompt + completion, ours over the
    completion (the paper's), so the loss is compared as TRL's - TRL's NLL + the completion NLL from fp64 logits."""
    from trl.experimental.orpo import ORPOTrainer

    model, hf_policy, _ = setup
    pairs, lam = make_pairs(), 0.7
    fake = trl_pair_trainer(ORPOTrainer, "odds_ratio_loss", beta=lam)
    with torch.no_grad():
        want_loss, want = ORPOTrainer.get_batch_loss_metrics(fake, hf_policy, trl_pair_batch(pairs))
    nll = hf_completion_nll(hf_policy, pairs)
    got_loss, got = ours_pairs(model, pairs, layout, pref_losses.orpo_loss_sums, orpo_lambda=lam)
    assert got["nll_loss"] == pytest.approx(nll, **TOL)
    assert got_loss == pytest.approx(want_loss.item() - want["nll_loss"] + nll, **TOL)
    for k in PAIR_METRICS[:-1] + ("log_odds_ratio", "log_odds_chosen"):
        assert got[k] == pytest.approx(want[k], **TOL), k
    assert abs(want["nll_loss"] - nll) > 1e-3  # the two NLL definitions really differ (else the test shows nothing)


def test_log1mexp():
    """log(1 - e^x) in fp32 against fp64 over [-20, -1e-7], both branches, relative error within 1e-6 (a few
    fp32 ulps). Mean log-probs per token live in this range (uniform over a 49k vocabulary is -10.8)."""
    x = -torch.logspace(-7, 1.3, 200).float()
    want = torch.log(-torch.expm1(x.double()))
    got = pref_losses.log1mexp(x).double()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def kto_examples():
    g = torch.Generator().manual_seed(3)
    rand = lambda k: torch.randint(0, 256, (k,), generator=g).tolist()  # noqa: E731
    labels = [True, False, True, True, False]
    exs = [KTOExample(rand(3 + i), rand(2 + (i * 3) % 5), lab) for i, lab in enumerate(labels)]
    return assign_kl(exs)


def trl_kto(hf_policy, exs, ref, ref_kl, beta, dw, uw):
    """TRL 1.16's own KTOTrainer._compute_loss on the HF policy, with precomputed reference log-probs."""
    from trl.trainer.kto_trainer import KTOTrainer
    from trl.trainer.utils import add_fused_lm_head

    model = copy.deepcopy(hf_policy)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits"))
    inputs = {}
    for prefix, key in (("", "completion_ids"), ("KL_", "kl_ids")):
        rows = [e.prompt_ids + getattr(e, key) for e in exs]
        ids, attn = padded(rows)
        comp = torch.zeros_like(ids)
        for b, e in enumerate(exs):
            comp[b, len(e.prompt_ids):len(rows[b])] = 1
        inputs.update({f"{prefix}input_ids": ids, f"{prefix}attention_mask": attn, f"{prefix}completion_mask": comp})
    inputs.update(label=torch.tensor([e.desirable for e in exs]), ref_logps=ref, ref_KL_logps=ref_kl)
    fake = types.SimpleNamespace(model=model, accelerator=CPU, calculate_KL=True, precompute_ref_logps=True,
                                 loss_type="kto", beta=beta, desirable_weight=dw, undesirable_weight=uw,
                                 aux_loss_enabled=False, _total_train_tokens=0, _tp_size=1,
                                 _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    fake._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, fake)
    with torch.no_grad():
        loss = KTOTrainer._compute_loss(fake, model, inputs, False)
    return loss.item(), {k: v[-1] for k, v in fake._metrics["eval"].items()}


@pytest.mark.parametrize("layout", ["concat", "shared-prompt"])
@pytest.mark.parametrize("dw,uw,kl_shift", [(1.0, 1.0, 0.0), (1.3, 0.8, 1.0)])
def test_kto_matches_trl(setup, layout, dw, uw, kl_shift):
    """kl_shift lowers the reference log-probs of the KL sequences (the same numbers go to TRL and to us): with
    this adapter the KL estimate is negative and clamped to 0; shifted, it is positive and enters the loss."""
    model, hf_policy, _ = setup
    exs, beta = kto_examples(), 2.0
    batch = kto_batch(exs, layout)
    P = len(exs)
    ref = Reference("adapters-off", model).logps(batch)  # (2P,): completions, then KL sequences
    ref[P:] -= kl_shift
    want_loss, want = trl_kto(hf_policy, exs, ref[:P].double(), ref[P:].double(), beta, dw, uw)
    loss_sum, sums = pref_losses.kto_loss_sums(losses.sequence_logps(model, batch), ref, batch.desirable, beta,
                                               dw, uw)
    assert loss_sum.item() / P == pytest.approx(want_loss, **TOL)
    for k in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
              "logits/chosen", "logits/rejected"):
        assert float(sums[k]) / P == pytest.approx(want[k], **TOL), k
    assert (want["kl"] > 0.1) == (kl_shift > 0)


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def naive_seq(model, batch):
    """SeqLogps through materialized logits (no fused kernel), in the model's dtype."""
    hidden = model(batch.ids, batch.positions, batch.mask)  # (B, T, H)
    logits = model.lm_head(hidden).flatten(0, 1)[batch.pred_index]  # (M, V)
    logp = torch.log_softmax(logits, -1).gather(1, batch.targets[:, None]).squeeze(1)
    S = int(batch.n_seqs)
    n = torch.bincount(batch.segment, minlength=S)
    mean = logits.mean(-1).detach()
    return losses.SeqLogps(logp.new_zeros(S).index_add(0, batch.segment, logp), n,
                           mean.new_zeros(S).index_add(0, batch.segment, mean) / n)


@pytest.mark.parametrize("name,kw", [("simpo", dict(beta=2.0, gamma=0.5, sft_weight=0.3)),
                                     ("orpo", dict(orpo_lambda=0.7))])
def test_gradient_matches_autograd(setup, name, kw):
    """The fused kernel's backward inside SimPO / ORPO equals autograd through full fp64 logits."""
    model, _, _ = setup
    fn = {"simpo": pref_losses.simpo_loss_sums, "orpo": pref_losses.orpo_loss_sums}[name]
    pairs = make_pairs()
    ours_pairs(model, pairs, "shared-prompt", fn, backward=True, **kw)
    got = lora_grads(model)
    m64 = copy.deepcopy(model).double()
    loss_sum, _ = fn(naive_seq(m64, batching.dpo_batch(pairs, "concat")), **kw)
    (loss_sum / len(pairs)).backward()
    want = lora_grads(m64)
    worst = 0.0
    for k in got:
        # fp32 gradients against fp64: an fp32 sum over many tokens errs in proportion to its largest terms, not
        # to each entry (a small entry can be the difference of large ones), so the absolute tolerance is 1e-5 of
        # the tensor's largest entry (~100 fp32 ulps of it)
        scale = want[k].abs().max().item()
        worst = max(worst, (got[k].double() - want[k]).abs().max().item() / scale)
        torch.testing.assert_close(got[k].double(), want[k], rtol=1e-4, atol=1e-5 * scale, msg=k)
    print(f"{name}: worst |grad error| / max |grad| = {worst:.2e}")


def test_bad_inputs(setup):
    model, _, _ = setup
    seq = losses.sequence_logps(model, batching.dpo_batch(make_pairs(), "concat"))
    with pytest.raises(MinifTError, match=r"ORPO needs lambda >= 0.*-0.5"):
        pref_losses.orpo_loss_sums(seq, orpo_lambda=-0.5)
    with pytest.raises(MinifTError, match=r"ref_logps must have shape \[6\]"):
        pref_losses.kto_loss_sums(seq, torch.zeros(4), torch.ones(3, dtype=torch.bool), 0.1)
    odd = losses.SeqLogps(seq.logps[:5], seq.n_tokens[:5], seq.mean_logits[:5])
    with pytest.raises(MinifTError, match="2P sequences"):
        pref_losses.simpo_loss_sums(odd, beta=2.0, gamma=0.5)
