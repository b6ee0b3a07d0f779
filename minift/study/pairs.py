"""Preference pairs for the study: diagnostics of a pair set, and on-policy pairs sampled from a model.

    counts = label_counts(rows)            # {task: {field: {label: [chosen, rejected]}}}
    warnings = imbalance_warnings(counts)  # labels rejected far more (or less) often than chosen
    rows, sources = on_policy_pairs(rows, model_sampler(model, tok, temperature=1.0), k=4, seed=0)

Why the diagnostics: DPO raises the log-probability of each chosen answer and lowers each rejected one. If a
label is rejected much more often than it is chosen (over the whole set), lowering it is a cheap way to win
many pairs at once, and the model learns "never say nurse" rather than the cases. The check compares each
label's share of the rejections with its share of the choices.

On-policy pairs (the model's own mistakes as the rejected answers): for each DPO prompt, K answers are
sampled from the model at a temperature and scored with the task's own scorer against the row's gold fields;
chosen = the gold answer, rejected = a sampled answer that scores wrong. Prompts on which no sample is wrong
keep their bundled pair, and each pair says its source.
"""
from __future__ import annotations

import json
from pathlib import Path

from minift.errors import MinifTError
from minift.tasks import TASKS

IMBALANCE = 1.5  # warn when a label's share of rejections is > 1.5x (or < 1/1.5 of) its share of choices


def _text(v) -> str:
    """The reply text of a TRL column: a string or a one-message list."""
    if isinstance(v, str):
        return v
    if isinstance(v, list) and v and isinstance(v[-1], dict):
        return str(v[-1].get("content", ""))
    return ""


def read_pairs(path) -> list[dict]:
    """Rows of a TRL preference JSONL; one clear error for a missing, empty or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise MinifTError(f"{path}: file not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise MinifTError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not all(k in row for k in ("prompt", "chosen", "rejected")):
                raise MinifTError(f"{path}:{n}: a preference row needs 'prompt', 'chosen' and 'rejected'")
            rows.append(row)
    if not rows:
        raise MinifTError(f"{path}: no rows (empty file)")
    return rows


def write_pairs(path, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


# ------------------------------------------------------------------------------------------ diagnostics
def label_counts(rows: list[dict]) -> dict:
    """{task: {field: {label: [times chosen, times rejected]}}}. A pair rejects a label on a field only where
    its rejected answer names another label than its chosen one (a triage pair that only flips urgency does
    not reject its provider)."""
    out: dict = {}
    for row in rows:
        task = TASKS.get(row.get("task"))
        if task is None:
            continue
        good, bad = task.answer_labels(_text(row["chosen"])), task.answer_labels(_text(row["rejected"]))
        for fld, g in good.items():
            cell = out.setdefault(task.name, {}).setdefault(fld, {})
            if g is not None:
                cell.setdefault(g, [0, 0])[0] += 1
            b = bad.get(fld)
            if b is not None and b != g:
                cell.setdefault(b, [0, 0])[1] += 1
    return out


def imbalance_warnings(counts: dict, limit: float = IMBALANCE) -> list[str]:
    """One line per label whose share of a field's rejections differs from its share of the choices by more
    than `limit` times (either way)."""
    warnings = []
    for task, fields in counts.items():
        for fld, labels in fields.items():
            n_cho = sum(c for c, _ in labels.values())
            n_rej = sum(r for _, r in labels.values())
            if not n_cho or not n_rej:
                continue
            for lab, (c, r) in sorted(labels.items()):
                share_c, share_r = c / n_cho, r / n_rej
                ratio = share_r / share_c if share_c else float("inf")
                if ratio > limit or ratio < 1 / limit:
                    warnings.append(f"{task} {fld} '{lab}': {r / n_rej:.0%} of rejections but {c / n_cho:.0%} "
                                    f"of choices; DPO can learn a prior against or for it")
    return warnings


def diagnostics_lines(counts: dict) -> list[str]:
    """Human-readable table lines: task field: label chosen/rejected ..."""
    lines = []
    for task, fields in counts.items():
        for fld, labels in fields.items():
            cells = ", ".join(f"{lab} {c}/{r}" for lab, (c, r) in sorted(labels.items()))
            lines.append(f"{task} {fld} (chosen/rejected): {cells}")
    return lines


# ------------------------------------------------------------------------------------------ on-policy
def model_sampler(model, tok, temperature: float = 1.0, batch_size: int = 16):
    """sample(rows, max_new_tokens, seed, k) -> k sampled answers per row, from `model` at `temperature`.

    Each batch's prompts are prefilled once and decoded k times (generate(num_samples=k)): k rows per prompt
    in one batch of batch_size * k rows, which drop out of the batch as they stop."""
    from minift.eval.evaluate import messages
    from minift.eval.generate import generate

    def sample(rows, max_new_tokens, seed, k):
        prompts = [tok.encode_chat(messages(r), add_generation_prompt=True) for r in rows]
        order = sorted(range(len(rows)), key=lambda i: -len(prompts[i]))  # similar lengths batch together
        texts: list[list[str]] = [[] for _ in rows]
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            outs = generate(model, tok, [prompts[i] for i in idx], max_new_tokens=max_new_tokens,
                            temperature=temperature, seed=seed + s, num_samples=k)
            for j, ids in enumerate(outs):  # rows grouped per prompt: row j answers prompt idx[j // k]
                texts[idx[j // k]].append(tok.decode(ids, skip_special_tokens=True).strip())
        return texts
    return sample


def on_policy_pairs(rows: list[dict], sample, k: int = 4, seed: int = 0,
                    max_new_tokens: int | None = None) -> tuple[list[dict], dict]:
    """(pairs, {"on-policy": n, "bundled": n}): each row's rejected answer replaced by a wrong sample when one
    of its K samples (`sample(rows, max_new_tokens, seed, k)` -> k texts per row, see model_sampler) scores
    wrong; chosen stays the gold. Rows must carry their task's gold fields (the bundled dpo.jsonl rows do)."""
    for n, row in enumerate(rows, 1):
        task = TASKS.get(row.get("task"))
        if task is None:
            raise MinifTError(f"pair {n} ({row.get('id')}): on-policy pairs need a 'task' field naming one of "
                              f"{', '.join(TASKS)}")
        task.check_row(dict(row, answer=_text(row["chosen"])), f"pair {n} ({row.get('id')})")
    samples: dict[int, list[str]] = {i: [] for i in range(len(rows))}
    for name in dict.fromkeys(r["task"] for r in rows):  # one generation budget per task
        idx = [i for i, r in enumerate(rows) if r["task"] == name]
        got = sample([rows[i] for i in idx], max_new_tokens or TASKS[name].max_new_tokens, seed, k)
        if len(got) != len(idx) or any(len(texts) != k for texts in got):
            raise MinifTError(f"on-policy pairs: the sampler gave {[len(t) for t in got]} answers for "
                              f"{len(idx)} rows, not {k} each")
        for i, texts in zip(idx, got):
            samples[i].extend(texts)
    out, sources, parsed = [], {"on-policy": 0, "bundled": 0}, 0
    for i, row in enumerate(rows):
        task = TASKS[row["task"]]
        gold = dict(row, answer=_text(row["chosen"]))
        wrong = None
        for text in samples[i]:
            rec = task.score(gold, text)
            parsed += bool(rec["parsed"])
            if wrong is None and rec["parsed"] and not rec["correct"]:
                wrong = text
        if wrong is None:
            out.append(dict(row, source="bundled"))
            sources["bundled"] += 1
        else:
            out.append(dict(row, rejected=[{"role": "assistant", "content": wrong}], source="on-policy"))
            sources["on-policy"] += 1
    if parsed == 0:
        raise MinifTError(f"on-policy pairs: none of the {k * len(rows)} sampled answers names an answer of its "
                          "task; this model cannot make on-policy pairs (train SFT first, or use --pairs bundled)")
    return out, sources
