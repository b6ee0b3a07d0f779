"""Losses on completion tokens: per-token and per-sequence log-probs, SFT, and DPO with TRL's metric names.

Only the hidden states that predict a completion token go through the vocabulary projection, and they go
through the fused kernel (kernels.linear_token_logprobs), so no [tokens x vocab] logits tensor is ever built.

DPO formulas follow TRL 1.16 (trl/trainer/dpo_trainer.py, DPOTrainer._compute_loss), with the reverse-KL
(standard DPO) scores, delta = (pi_c - ref_c) - (pi_r - ref_r):
    sigmoid  -(1-eps) logsig(beta delta) - eps logsig(-beta delta)     eps = label_smoothing (conservative DPO)
    ipo      ((pi_c - ref_c)/n_c - (pi_r - ref_r)/n_r - 1/(2 beta))^2  n = completion tokens (TRL's normalisation)
    hinge    relu(1 - beta delta)
    robust   (-(1-eps) logsig(beta delta) + eps logsig(-beta delta)) / (1 - 2 eps)
Difference from TRL 1.16: its "sigmoid" ignores label_smoothing (only "robust", "exo_pair" and "aot" read it);
here eps > 0 gives conservative DPO (Mitchell 2023), the form older TRL versions used for "sigmoid". At eps = 0
the two are the same. ipo and hinge ignore eps, as in TRL.

DPO-Positive (Pal et al. 2024, "Smaug"; not in TRL): with dpop_lambda = lam > 0, delta in sigmoid, hinge and
robust becomes delta - lam * max(0, ref_c - pi_c), so a chosen answer whose log-prob falls below the reference's
costs margin. It targets likelihood displacement, where both answers of a pair lose probability.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F

from minift.kernels import linear_token_logprobs
from minift.errors import MinifTError

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")  # dpo_losses, against a reference
REFERENCE_FREE = ("simpo", "orpo")  # minift/train/pref_losses.py: scored from the policy alone, no reference pass
UNPAIRED = ("kto",)  # minift/train/pref_losses.py: one completion per example, marked desirable or not
LOSS_TYPES = DPO_LOSS_TYPES + REFERENCE_FREE + UNPAIRED  # train_dpo.py --loss; the first is the default


class SeqLogps(NamedTuple):
    logps: torch.Tensor  # [S] fp32, sum of log p(target) over each sequence's targets (differentiable)
    n_tokens: torch.Tensor  # [S] int64, targets per sequence
    mean_logits: torch.Tensor  # [S] fp32, mean over the sequence's targets of the mean-over-vocab logit (no grad)


def _head_weight(model):
    weight = getattr(model.lm_head, "weight", None)
    if weight is None:  # e.g. a wrapped head; the loss needs the plain [V, H] projection
        raise MinifTError(f"losses: model.lm_head ({type(model.lm_head).__name__}) has no .weight [V, H]")
    return weight


def token_logps(model, batch):
    """(logp[M] fp32, hidden_sel[M, H]): log p(target) at each prediction position of the batch."""
    hidden = model(**batch.model_inputs())  # (B, T, H); pads not computed when batch.lengths is set
    hidden_sel = hidden.flatten(0, 1)[batch.pred_index]  # (M, H): only positions that predict a target
    logp = linear_token_logprobs(hidden_sel, _head_weight(model), batch.targets)  # (M,)
    return logp, hidden_sel


def sequence_logps(model, batch) -> SeqLogps:
    """Per-sequence sums of target log-probs, target counts and mean logits ([n_seqs] each)."""
    logp, hidden_sel = token_logps(model, batch)
    S, seg = int(batch.n_seqs), batch.segment
    logps = logp.new_zeros(S).index_add(0, seg, logp)  # (S,) segment sums; gradient flows back per token
    n_tokens = torch.bincount(seg, minlength=S)  # (S,)
    # TRL's logits/* metric is the mean over the vocabulary of the logits at each completion position, averaged
    # over positions. mean_v(h . W_v) = h . mean_v(W_v) (the mean is linear), so one [H] vector replaces the
    # [M, V] logits: a matrix-vector product instead of a second pass over the vocabulary.
    with torch.no_grad():
        w_mean = _head_weight(model).mean(0, dtype=torch.float32)  # (H,)
        tok_mean = hidden_sel.float() @ w_mean  # (M,)
        logit_sums = tok_mean.new_zeros(S).index_add(0, seg, tok_mean)  # (S,)
    return SeqLogps(logps, n_tokens, logit_sums / n_tokens.clamp(min=1))


# --- SFT ---------------------------------------------------------------------------------------------------


def sft_loss_sum(model, batch):
    """(sum of -log p over the batch's targets, number of targets). The trainer divides by the whole step's
    target count, so the gradient does not depend on how a step is split into micro-batches."""
    logp, _ = token_logps(model, batch)
    return -logp.sum(), logp.numel()


def sft_loss(model, batch):
    """Mean negative log-likelihood per target token of one batch (a convenience for evaluation and tests)."""
    nll, n = sft_loss_sum(model, batch)
    return nll / max(n, 1)


# --- DPO ---------------------------------------------------------------------------------------------------


def dpo_losses(pc, pr, rc, rr, beta, loss_type, label_smoothing=0.0, chosen_tokens=None, rejected_tokens=None,
               dpop_lambda=0.0):
    """Per-pair DPO losses and implicit rewards, following TRL 1.16 (see the module docstring).

    pc/pr: policy log-probs of chosen/rejected [P]; rc/rr: reference log-probs [P]. chosen_tokens and
    rejected_tokens [P] (completion token counts) are needed by ipo only.
    Returns (losses[P], chosen_rewards[P], rejected_rewards[P]); rewards = beta * (pi - ref), detached."""
    chosen_ratio, rejected_ratio = pc - rc, pr - rr  # log pi/ref per sequence, (P,)
    delta = chosen_ratio - rejected_ratio
    if dpop_lambda:  # DPO-Positive: only a chosen answer that fell below the reference is penalised
        if loss_type == "ipo":
            raise MinifTError("losses.dpo_losses: dpop_lambda applies to sigmoid, hinge and robust, not ipo")
        delta = delta - dpop_lambda * torch.relu(-chosen_ratio)
    eps = float(label_smoothing)
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise MinifTError("losses.dpo_losses: loss 'ipo' needs chosen_tokens and rejected_tokens (counts)")
        # TRL: average per completion token, so that beta means the same for short and long completions
        avg_delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (avg_delta - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "robust":
        if not 0.0 <= eps < 0.5:
            raise MinifTError(f"losses.dpo_losses: robust DPO needs label_smoothing in [0, 0.5), got {eps}")
        clean = -(1 - eps) * F.logsigmoid(beta * delta)
        flipped = -eps * F.logsigmoid(-beta * delta)
        losses = (clean - flipped) / (1 - 2 * eps)  # unbiased under labels flipped with probability eps
    else:
        raise MinifTError(f"losses.dpo_losses: unknown loss type {loss_type!r}; one of {', '.join(DPO_LOSS_TYPES)}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def split_pairs(x, n_pairs):
    """[2P] -> ([P] chosen, [P] rejected): segments 0..P-1 are the chosen sequences, P..2P-1 the rejected."""
    return x[:n_pairs], x[n_pairs:]


def dpo_loss_sums(policy: SeqLogps, ref_logps, beta, loss_type="sigmoid", label_smoothing=0.0, sft_weight=0.0,
                  dpop_lambda=0.0):
    """One micro-batch of DPO from log-probs: (loss_sum, metric_sums), both summed over its P pairs.

    policy: the policy's SeqLogps of the batch's 2P sequences (chosen first, then rejected), with gradient.
    ref_logps [2P]: the reference's log-probs of the same sequences (no gradient). The trainer divides loss_sum
    and every metric sum by the step's total number of pairs.

    Token-averaged quantities (TRL's "sft" loss term and logits/*) are averaged over the tokens of this
    micro-batch and entered as P * that mean, so that one micro-batch reproduces TRL exactly, and a step of
    several micro-batches averages them as TRL does under gradient accumulation.
    TRL equivalent of sft_weight w > 0: loss_type=[loss, "sft"], loss_weights=[1, w] (TRL 1.16 has no
    rpo_alpha; its "sft" term is the mean NLL of the chosen completion tokens of the micro-batch)."""
    S = policy.logps.shape[0]
    P = S // 2
    if S != 2 * P or P == 0:
        raise MinifTError(f"losses.dpo_loss_sums: a DPO batch needs 2P sequences (P >= 1), got {S}")
    if ref_logps.shape != (2 * P,):
        raise MinifTError(f"losses.dpo_loss_sums: ref_logps must have shape [{2 * P}], got {list(ref_logps.shape)}")
    pc, pr = split_pairs(policy.logps, P)
    rc, rr = split_pairs(ref_logps.to(policy.logps.device, torch.float32), P)
    nc, nr = split_pairs(policy.n_tokens, P)
    losses, chosen_r, rejected_r = dpo_losses(pc, pr, rc, rr, beta, loss_type, label_smoothing, nc, nr, dpop_lambda)
    loss_sum = losses.sum()
    if sft_weight:
        nll_chosen = -pc.sum() / nc.sum().clamp(min=1)  # mean NLL per chosen completion token
        loss_sum = loss_sum + sft_weight * P * nll_chosen
    with torch.no_grad():
        mc, mr = split_pairs(policy.mean_logits * policy.n_tokens, P)  # per-sequence sums of mean-vocab logits
        metrics = {
            "rewards/chosen": chosen_r.sum(),
            "rewards/rejected": rejected_r.sum(),
            "rewards/accuracies": (chosen_r > rejected_r).float().sum(),
            "rewards/margins": (chosen_r - rejected_r).sum(),
            "logps/chosen": pc.detach().sum(),
            "logps/rejected": pr.detach().sum(),
            "logits/chosen": P * mc.sum() / nc.sum().clamp(min=1),
            "logits/rejected": P * mr.sum() / nr.sum().clamp(min=1),
        }
    return loss_sum, metrics
