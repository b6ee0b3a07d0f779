"""Preference losses beyond DPO: SimPO and ORPO (no reference model) and KTO (unpaired data), with TRL's metric names.

Each takes per-sequence log-probs (losses.SeqLogps: sums over the completion tokens of each sequence, from the
fused kernel, so only completion positions reach the vocabulary projection) and explicit arguments, and returns
(loss_sum, metric_sums) summed over the micro-batch's P pairs (or P examples for KTO); the trainer divides both
by the step's total count, as for DPO. Token-averaged quantities (the NLL terms, logits/*) are the mean over
the micro-batch's tokens entered as P * that mean, as losses.dpo_loss_sums does, so one micro-batch reproduces
TRL exactly.

SimPO (Meng, Xia, Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"), as TRL 1.16
computes it (trl/experimental/cpo/cpo_trainer.py, CPOTrainer.cpo_loss with loss_type="simpo"):
    a = mean log p per completion token (chosen: a_w, rejected: a_l)
    loss = -(1-eps) logsig(beta (a_w - a_l) - gamma) - eps logsig(-(beta (a_w - a_l) - gamma))
    rewards = beta * a.   sft_weight w > 0 adds w * (mean NLL of the chosen tokens): TRL's cpo_alpha (CPO-SimPO).
ORPO (Hong, Lee, Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference Model"), as TRL 1.16
computes it (trl/experimental/orpo/orpo_trainer.py, ORPOTrainer.odds_ratio_loss and get_batch_loss_metrics):
    log odds(y) = a - log(1 - exp(a)),   a = mean log p per completion token
    loss = NLL(chosen) - lambda * logsig(log odds(y_w) - log odds(y_l));   rewards = lambda * a
  Difference from TRL 1.16: its NLL term runs over the prompt and the completion of the chosen row; here, as in
  the paper (eq. 2: the SFT loss of the response given the prompt), over the completion tokens only, so that the
  prompt never reaches the vocabulary projection. TRL's lambda is its `beta`.
KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 7), as TRL 1.16
computes it (trl/trainer/kto_trainer.py, KTOTrainer._compute_loss, loss_type="kto"):
    r = log pi(y|x) - log ref(y|x)  (sums over the completion)
    z = max(0, mean over the micro-batch of [log pi(y'|x) - log ref(y'|x)]), no gradient: the KL estimate, from
        mismatched pairs (x, y') of the same batch
    desirable:   w_d * (1 - sigmoid(beta (r - z)))     undesirable:   w_u * (1 - sigmoid(beta (z - r)))
    loss = mean over the examples;  rewards = beta * r
  Difference from TRL 1.16: TRL rotates the completions within each batch to form (x, y'); here each example's
  y' is fixed once when the data are read (unpaired.py), so that the reference log-probs of y' can be cached
  per example like DPO's. Both are the same estimator: a batch mean over mismatched prompt-completion pairs.

logits/* (mean over the vocabulary of the logits at each completion position, averaged over completion tokens)
follows TRL's DPOTrainer and KTOTrainer. TRL's CPO and ORPO trainers average over every position of the padded
batch instead, prompt and pads included, a number that depends on the padding; it is not reproduced.
"""
import torch
import torch.nn.functional as F

from minift.errors import MinifTError
from minift.train.losses import SeqLogps, split_pairs


def _pairs(policy: SeqLogps, where):
    S = policy.logps.shape[0]
    if S % 2 or S == 0:
        raise MinifTError(f"pref_losses.{where}: a paired batch needs 2P sequences (P >= 1), got {S}")
    return S // 2


def _mean_logps(policy: SeqLogps):
    """[S] mean log p per completion token of each sequence (TRL's average_log_prob=True)."""
    return policy.logps / policy.n_tokens.clamp(min=1)


def _shared_metrics(policy, P, avg, chosen_r, rejected_r):
    """TRL's rewards/*, logps/* (mean log p per token, as TRL's CPO and ORPO log them) and logits/*, as sums."""
    nc, nr = split_pairs(policy.n_tokens, P)
    mc, mr = split_pairs(policy.mean_logits * policy.n_tokens, P)  # per-sequence sums of mean-vocab logits
    ac, ar = split_pairs(avg.detach(), P)
    return {
        "rewards/chosen": chosen_r.sum(),
        "rewards/rejected": rejected_r.sum(),
        "rewards/accuracies": (chosen_r > rejected_r).float().sum(),
        "rewards/margins": (chosen_r - rejected_r).sum(),
        "logps/chosen": ac.sum(),
        "logps/rejected": ar.sum(),
        "logits/chosen": P * mc.sum() / nc.sum().clamp(min=1),
        "logits/rejected": P * mr.sum() / nr.sum().clamp(min=1),
    }


def _chosen_nll(policy, P):
    """Mean NLL per chosen completion token of the micro-batch (TRL's nll_loss: cross-entropy over its tokens)."""
    pc, _ = split_pairs(policy.logps, P)
    nc, _ = split_pairs(policy.n_tokens, P)
    return -pc.sum() / nc.sum().clamp(min=1)


# --- SimPO -------------------------------------------------------------------------------------------------


def simpo_losses(policy_chosen_avg_logps, policy_rejected_avg_logps, beta, gamma, label_smoothing=0.0):
    """Per-pair SimPO losses and rewards from mean per-token log-probs [P] (see the module docstring).

    Returns (losses[P], chosen_rewards[P], rejected_rewards[P]); rewards = beta * mean log p, detached."""
    eps = float(label_smoothing)
    margin = beta * (policy_chosen_avg_logps - policy_rejected_avg_logps) - gamma  # TRL: beta * (d - gamma/beta)
    losses = -(1 - eps) * F.logsigmoid(margin) - eps * F.logsigmoid(-margin)
    return losses, beta * policy_chosen_avg_logps.detach(), beta * policy_rejected_avg_logps.detach()


def simpo_loss_sums(policy: SeqLogps, beta, gamma, label_smoothing=0.0, sft_weight=0.0):
    """One micro-batch of SimPO: (loss_sum, metric_sums) over its P pairs; policy holds 2P sequences, chosen
    first. No reference log-probs: the reward is the policy's own length-normalised log-prob."""
    P = _pairs(policy, "simpo_loss_sums")
    avg = _mean_logps(policy)  # (2P,)
    losses, chosen_r, rejected_r = simpo_losses(*split_pairs(avg, P), beta, gamma, label_smoothing)
    nll = _chosen_nll(policy, P)
    loss_sum = losses.sum() + (sft_weight * P * nll if sft_weight else 0.0)
    with torch.no_grad():
        metrics = _shared_metrics(policy, P, avg, chosen_r, rejected_r)
        metrics["nll_loss"] = P * nll if sft_weight else torch.zeros(())  # TRL logs 0 when cpo_alpha is 0
    return loss_sum, metrics


# --- ORPO --------------------------------------------------------------------------------------------------


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, without cancellation: log1p(-exp(x)) far from 0, log(-expm1(x)) near it
    (the branch at -log 2 is Maechler's, the one TRL uses)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_losses(policy_chosen_avg_logps, policy_rejected_avg_logps, orpo_lambda):
    """Per-pair ORPO odds-ratio terms from mean per-token log-probs [P] (the NLL term is added by the caller).

    Returns (losses[P] = -lambda * logsig(log odds ratio), chosen_rewards[P], rejected_rewards[P],
    log_odds_ratio[P] = logsig(...) and log_odds_chosen[P] = the log odds ratio, both detached: TRL's metrics)."""
    pc, pr = policy_chosen_avg_logps, policy_rejected_avg_logps
    # log odds(y) = log p / (1 - p) with p = exp(mean log p); always a < 0, so 1 - p > 0
    log_odds = (pc - pr) - (log1mexp(pc) - log1mexp(pr))
    ratio = F.logsigmoid(log_odds)
    return (-orpo_lambda * ratio, orpo_lambda * pc.detach(), orpo_lambda * pr.detach(), ratio.detach(),
            log_odds.detach())


def orpo_loss_sums(policy: SeqLogps, orpo_lambda):
    """One micro-batch of ORPO: (loss_sum, metric_sums) over its P pairs: the chosen completion's NLL (so no
    separate SFT stage is needed) plus lambda times the odds-ratio term. No reference log-probs."""
    if orpo_lambda < 0:
        raise MinifTError(f"ORPO needs lambda >= 0 (the weight of the odds-ratio term), got {orpo_lambda}")
    P = _pairs(policy, "orpo_loss_sums")
    avg = _mean_logps(policy)  # (2P,)
    losses, chosen_r, rejected_r, ratio, log_odds = orpo_losses(*split_pairs(avg, P), orpo_lambda)
    nll = _chosen_nll(policy, P)
    loss_sum = P * nll + losses.sum()
    with torch.no_grad():
        metrics = _shared_metrics(policy, P, avg, chosen_r, rejected_r)
        metrics.update({"nll_loss": P * nll, "log_odds_ratio": ratio.sum(), "log_odds_chosen": log_odds.sum()})
    return loss_sum, metrics


# --- KTO ---------------------------------------------------------------------------------------------------


def kto_kl(policy_kl_logps, reference_kl_logps):
    """KTO's reference point z: max(0, mean of log pi(y'|x) - log ref(y'|x)) over the batch's mismatched pairs,
    detached (TRL: no gradient flows through it)."""
    return (policy_kl_logps - reference_kl_logps).mean().detach().clamp(min=0)


def kto_losses(policy_logps, reference_logps, desirable, kl, beta, desirable_weight=1.0, undesirable_weight=1.0):
    """Per-example KTO losses [N] and rewards [N] (beta * log pi/ref, detached). desirable: bool [N]."""
    ratio = policy_logps - reference_logps  # (N,)
    up = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    down = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    return torch.where(desirable, up, down), beta * ratio.detach()


def kto_loss_sums(policy: SeqLogps, ref_logps, desirable, beta, desirable_weight=1.0, undesirable_weight=1.0):
    """One micro-batch of KTO: (loss_sum, metric_sums) over its P examples.

    policy holds 2P sequences: 0..P-1 the examples' (prompt, completion), P..2P-1 the mismatched (prompt, y')
    of each example (its KL sequence); ref_logps [2P] are the reference's log-probs of the same sequences;
    desirable: bool [P]. The metric sums follow TRL's per-batch means (rewards/chosen is the mean over the
    batch's desirable examples, ...), entered as P * that mean; a side absent from the batch enters 0 and is
    counted in "count/desirable" / "count/undesirable" (fractions of the step's examples)."""
    P = _pairs(policy, "kto_loss_sums")
    if ref_logps.shape != (2 * P,):
        raise MinifTError(f"pref_losses.kto_loss_sums: ref_logps must have shape [{2 * P}], got "
                          f"{list(ref_logps.shape)}")
    desirable = torch.as_tensor(desirable, dtype=torch.bool, device=policy.logps.device)
    if desirable.shape != (P,):
        raise MinifTError(f"pref_losses.kto_loss_sums: desirable must have shape [{P}], got {list(desirable.shape)}")
    pol, pol_kl = split_pairs(policy.logps, P)
    ref, ref_kl = split_pairs(ref_logps.to(policy.logps.device, torch.float32), P)
    kl = kto_kl(pol_kl.detach(), ref_kl)
    losses, rewards = kto_losses(pol, ref, desirable, kl, beta, desirable_weight, undesirable_weight)
    with torch.no_grad():
        n, _ = split_pairs(policy.n_tokens, P)
        m, _ = split_pairs(policy.mean_logits * policy.n_tokens, P)
        metrics = {"kl": P * kl, "count/desirable": desirable.sum().float(),
                   "count/undesirable": (~desirable).sum().float()}
        for side, sel in (("chosen", desirable), ("rejected", ~desirable)):
            k = sel.sum()
            if k == 0:  # TRL logs nothing for an absent side; 0 here, see count/*
                continue
            metrics[f"rewards/{side}"] = P * rewards[sel].sum() / k
            metrics[f"logps/{side}"] = P * pol.detach()[sel].sum() / k
            metrics[f"logits/{side}"] = P * m[sel].sum() / n[sel].sum().clamp(min=1)
        if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return losses.sum(), metrics
