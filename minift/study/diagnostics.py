"""What a preference arm did to the model, read from its own logs: on its held-out pairs (the eval split its
trainer keeps out of training), reward accuracy and margin at step 0 and at the end, and how far the chosen and
the rejected answers moved from the reference; then the share of its test answers that differ from SFT's. One
verdict line per arm, so that an arm that barely moved, or one that pushed both answers down (likelihood
displacement, Razin et al. 2024), is seen without opening a log.

DPO-style rewards are beta * (log p_policy - log p_reference) summed over a completion's tokens (TRL's
rewards/chosen), so reward / beta is the change of the answer's log-prob from the reference, in nats.
"""
from __future__ import annotations

import json
from pathlib import Path

from minift.eval.compare import read_run
from minift.train.losses import REFERENCE_FREE

# The verdict's rule. Trained: the held-out margin grew by at least MIN_GAIN nats (the study asks for a
# final margin of 2 nats; below 1 nat of growth the arm has barely moved the pairs apart). Displacement: the
# chosen answers themselves lost more than DISPLACED nats against the reference (a factor e^-1 in probability)
# while the margin grew: the rejected fell faster, but the gold answer was pushed down with it.
MIN_GAIN = 1.0
DISPLACED = 1.0
LENGTH_MOVED = 0.05  # a task's mean answer length more than 5% off SFT's is named in the verdict


def eval_records(train_dir) -> tuple[dict, dict] | None:
    """(first, last) eval records of metrics.jsonl ({"eval/...": value}), or None when the arm logged none."""
    path = Path(train_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    evals = [r for r in rows if "eval/rewards/margins" in r]
    return (evals[0], evals[-1]) if evals else None


def against_sft(arm_eval, sft_eval) -> dict:
    """{"changed_vs_sft": share of test items whose answer text differs from SFT's, "length_vs_sft": {task: the
    arm's mean answer length in words over SFT's}} (DPO is known to lengthen answers); {} when no item is shared."""
    a, b = read_run(arm_eval), read_run(sft_eval)
    keys = [k for k in a if k in b]
    if not keys:
        return {}
    length = {}
    for task in sorted({t for t, _ in keys}):
        words = [sum(len(str(run[k].get("output", "")).split()) for k in keys if k[0] == task) for run in (a, b)]
        length[task] = words[0] / words[1] if words[1] else None
    return {"changed_vs_sft": sum(a[k].get("output") != b[k].get("output") for k in keys) / len(keys),
            "length_vs_sft": length}


def arm_diagnostics(config: dict, train_dir, eval_dir=None, sft_eval_dir=None) -> dict:
    """{"margin_start", "margin_end", "accuracy_start", "accuracy_end", "chosen_change", "rejected_change",
    "changed_vs_sft", "length_vs_sft", "verdict"}; margins and changes in nats where the loss has a reference."""
    loss, beta = config.get("loss", "sigmoid"), config.get("beta") or 1.0
    rec = eval_records(train_dir)
    out: dict = {"loss": loss, "changed_vs_sft": None, "length_vs_sft": None}
    if sft_eval_dir:
        out.update(against_sft(eval_dir, sft_eval_dir))
    if rec is None:
        return {**out, "verdict": "no held-out evaluation logged (eval_every 0): nothing to judge"}
    first, last = rec
    scale = 1.0 / beta  # reward / beta: nats (for simpo: per-token mean log-prob; orpo: its own reward)
    out.update(margin_start=first["eval/rewards/margins"] * scale, margin_end=last["eval/rewards/margins"] * scale,
               accuracy_start=first.get("eval/rewards/accuracies"), accuracy_end=last.get("eval/rewards/accuracies"),
               step_start=first["step"], step_end=last["step"])
    if loss not in REFERENCE_FREE and "eval/rewards/chosen" in last:
        out.update(chosen_change=last["eval/rewards/chosen"] * scale,
                   rejected_change=last["eval/rewards/rejected"] * scale)
    out["verdict"] = verdict(out)
    return out


def verdict(d: dict) -> str:
    gain = d["margin_end"] - d["margin_start"]
    unit = "nats" if d["loss"] not in REFERENCE_FREE else "(reward / beta)"
    words = f"margin {d['margin_start']:.2f} -> {d['margin_end']:.2f} {unit}"
    if d.get("chosen_change") is not None:
        words += f"; chosen log-prob {d['chosen_change']:+.2f}, rejected {d['rejected_change']:+.2f}"
    if d.get("changed_vs_sft") is not None:
        words += f"; {d['changed_vs_sft']:.0%} of test answers changed from SFT's"
    moved = {t: r for t, r in (d.get("length_vs_sft") or {}).items() if r is not None and abs(r - 1) > LENGTH_MOVED}
    if moved:
        words += "; answer length vs SFT's: " + ", ".join(f"{t} {r:.2f}x" for t, r in moved.items())
    if gain < MIN_GAIN:
        return f"barely trained: {words}"
    if d.get("chosen_change") is not None and d["chosen_change"] < -DISPLACED:
        return f"displacement (the chosen answers fell too): {words}"
    return f"trained: {words}"
