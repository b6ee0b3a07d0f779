"""KTO's data: unpaired rows (one completion, marked desirable or not), read from JSONL with line-numbered errors,
or made from preference pairs, so that the bundled pair files serve KTO too.

Rows, as TRL's unpaired preference format:
    {"prompt": str, "completion": str, "label": true|false}            plain text
    {"prompt": [msgs], "completion": [assistant msg], "label": ...}    conversational
    {"prompt", "chosen", "rejected"}    a preference pair: one desirable row (chosen) and one undesirable (rejected)
A file holds one kind or the other, not both. Prompts and completions are tokenized exactly as data.py does for
SFT and DPO (the prompt's tokens are a prefix; chat templates rendered as transformers renders them).

The KL sequences. KTO's reference point is an estimate of KL(pi || ref) from mismatched pairs (x, y'): a prompt
with a completion written for another prompt. Each example gets its y' once, here: the completion of the next
example (cyclically, in file order) whose prompt differs. Fixed per example, the reference log-prob of (x, y')
can be cached like the reference log-probs of DPO's pairs (TRL 1.16 rotates completions within each batch
instead; both give a batch mean over mismatched pairs).
"""
from dataclasses import dataclass, field

import torch

from minift.train.batching import dpo_batch
from minift.train.data import PrefExample, _BadRow, _kind, _need, _pref_row, _read, _sft_row, split_eval
from minift.errors import MinifTError


@dataclass
class KTOExample:
    prompt_ids: list
    completion_ids: list
    desirable: bool
    kl_ids: list = None  # the mismatched completion y' (another example's completion), set by assign_kl
    meta: dict = field(default_factory=dict)
    where: str = ""  # "FILE:LINE" of the row


def pairs_to_unpaired(pairs):
    """[PrefExample] -> [KTOExample]: chosen as a desirable example, rejected as an undesirable one, in that
    order for each pair (the prompt is shared, so an eval split by prompt keeps both halves together)."""
    out = []
    for e in pairs:
        out.append(KTOExample(e.prompt_ids, e.chosen_ids, True, meta=dict(e.meta), where=e.where))
        out.append(KTOExample(e.prompt_ids, e.rejected_ids, False, meta=dict(e.meta), where=e.where))
    return out


def _unpaired_row(row, tok):
    """One {"prompt", "completion", "label"} row -> (prompt_ids, completion_ids, desirable)."""
    if "label" not in row:
        raise _BadRow("missing field 'label' (true for a desirable completion, false for an undesirable one)")
    label = row["label"]
    if not isinstance(label, bool):
        raise _BadRow(f"field 'label' must be a boolean (true or false), got {_kind(label)} {label!r}")
    prompt, completion = _need(row, "prompt"), _need(row, "completion")
    ids, mask, _ = _sft_row({"prompt": prompt, "completion": completion}, tok)
    first = mask.index(True)
    return ids[:first], ids[first:], label


def _truncate(examples, max_length):
    """Cut each completion's tail to fit max_length; drop an example whose prompt leaves no room. The same list
    object when nothing is cut (the reader counts a new one as truncated)."""
    if all(len(e.prompt_ids) + len(e.completion_ids) <= max_length for e in examples):
        return examples
    kept = [KTOExample(e.prompt_ids, e.completion_ids[:max_length - len(e.prompt_ids)], e.desirable, None, e.meta,
                       e.where) for e in examples if len(e.prompt_ids) < max_length]
    return kept or None


def assign_kl(examples, max_length=None):
    """Give each example its mismatched completion y': the completion of the next example (cyclically) whose
    prompt differs, cut to fit max_length after the example's own prompt. In place; returns the examples."""
    n = len(examples)
    for i, e in enumerate(examples):
        j = next((k % n for k in range(i + 1, i + n) if examples[k % n].prompt_ids != e.prompt_ids), None)
        if j is None:
            raise MinifTError(f"{e.where or 'KTO data'}: every example has the same prompt; KTO's KL estimate pairs "
                              "each prompt with another prompt's completion, so it needs at least two prompts")
        kl = examples[j].completion_ids
        e.kl_ids = kl[:max_length - len(e.prompt_ids)] if max_length is not None else kl
    return examples


def check_labels(examples, what):
    """Both kinds of example must be present: KTO pushes desirable rewards up and undesirable ones down."""
    n_good = sum(e.desirable for e in examples)
    if n_good == len(examples):
        raise MinifTError(f"{what}: all {n_good} rows are desirable (label true); KTO also needs undesirable rows "
                          "(label false), or preference pairs {prompt, chosen, rejected}")
    if n_good == 0:
        raise MinifTError(f"{what}: all {len(examples)} rows are undesirable (label false); KTO also needs "
                          "desirable rows (label true), or preference pairs {prompt, chosen, rejected}")


def read_unpaired(path, tokenizer, max_length=None, skip_bad_rows=False, stats=None):
    """KTO rows of a JSONL file (unpaired rows, or preference pairs converted) -> [KTOExample], y' assigned.
    stats (a dict), when given, receives the counts rows, bad, truncated, dropped, kept (rows, not examples)."""
    kinds = []

    def convert(row, where):
        # chosen / rejected make a pair: a pair row may carry a "label" of its own (a task's gold field, kept in meta)
        kind = "pairs" if "chosen" in row or "rejected" in row else "unpaired"
        if kinds and kind != kinds[0]:
            raise _BadRow(f"a {'preference pair' if kind == 'pairs' else 'labelled row'} in a file of "
                          f"{'preference pairs' if kinds[0] == 'pairs' else 'labelled rows'}: use one kind per file")
        if not kinds:
            kinds.append(kind)  # the first row decides the file's kind
        used = ("prompt", "completion", "label") if kind == "unpaired" else ("prompt", "chosen", "rejected")
        meta = {k: v for k, v in row.items() if k not in used}
        if kind == "pairs":
            return pairs_to_unpaired([PrefExample(*_pref_row(row, tokenizer), meta, where)])
        p, c, label = _unpaired_row(row, tokenizer)
        return [KTOExample(p, c, label, None, meta, where)]

    rows = _read(path, convert, _truncate, max_length, skip_bad_rows, stats)
    examples = [e for row in rows for e in row]
    check_labels(examples, str(path))
    return assign_kl(examples, max_length)


def split_unpaired(examples, fraction, seed=0):
    """(train, eval) as data.split_eval splits: examples that share a prompt (the two halves of a converted
    pair) go to the same side."""
    keyed = [PrefExample(e.prompt_ids, [], [], meta={"i": i}) for i, e in enumerate(examples)]
    train, held = split_eval(keyed, fraction, seed)
    return [examples[k.meta["i"]] for k in train], [examples[k.meta["i"]] for k in held]


def kto_batch(examples, layout="shared-prompt", pad_id=0):
    """[KTOExample] -> Batch with n_seqs = 2P: segment i = (prompt, completion) of example i, P + i = its KL
    sequence (prompt, y'), in either pair layout (batching.dpo_batch), and batch.desirable, bool (P,)."""
    for e in examples:
        if not e.kl_ids:
            raise MinifTError(f"{e.where or 'KTO example'}: no KL completion (call unpaired.assign_kl first)")
    batch = dpo_batch([PrefExample(e.prompt_ids, e.completion_ids, e.kl_ids, where=e.where) for e in examples],
                      layout, pad_id)
    batch.desirable = torch.tensor([e.desirable for e in examples], dtype=torch.bool)
    return batch
