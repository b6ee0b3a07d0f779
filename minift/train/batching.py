"""Batches: padded token rows plus the flat list of (hidden state, target token) pairs a loss needs.

Only the hidden states that predict a target go through the vocabulary projection. A loss gathers them with
`hidden.flatten(0, 1)[batch.pred_index]` -> (M, H) and scores them against `batch.targets` (M,); `batch.segment` (M,) says
which sequence each target belongs to, so per-sequence log-prob sums are one `index_add_` into n_seqs slots.
Targets are listed segment by segment, each in token order.

Rows are padded on the right. Pads are never targets; with mask None (plain causal) a real token never sees a
pad because every pad comes after it. Which id pads a row changes no result. `lengths` tells the model which
slots are real, so that it spends no compute on the pads (model.Unpadded).

DPO layouts (both give segments 0..P-1 = chosen of pair i, P..2P-1 = rejected of pair i, in that order, and
the same `targets` tensor):
  concat         2P rows: prompt + chosen for each pair, then prompt + rejected; mask None.
  shared-prompt  P rows [prompt | chosen | rejected]: the prompt is computed once. Rejected tokens attend to
                 the prompt and to themselves (causally), not to chosen, and their positions continue from the
                 prompt's end, so each rejected token sees exactly what it sees in concat (a sliding window,
                 applied by the model by position, agrees too). The last prompt token predicts both chosen[0]
                 and rejected[0], so pred_index holds it twice.
"""
from dataclasses import dataclass, fields

import torch

from minift.errors import MinifTError

LAYOUTS = ("shared-prompt", "concat")  # the first is the default


@dataclass
class Batch:
    ids: torch.Tensor  # (B, T) long, right-padded
    positions: torch.Tensor  # (B, T) long RoPE positions
    mask: torch.Tensor | None  # (B, T, T) bool, True = may attend; None = causal
    pred_index: torch.Tensor  # (M,) long: flat index into B*T of the hidden state predicting each target
    targets: torch.Tensor  # (M,) long target token ids
    segment: torch.Tensor  # (M,) long: the sequence each target belongs to, in 0..n_seqs-1
    n_seqs: int
    n_tokens: int  # real (non-pad) tokens in `ids`
    lengths: torch.Tensor | None = None  # (B,) real tokens per row; None: the model computes the pads too
    index: list | None = None  # the examples' positions in their data set (rows of a cached reference table)

    @property
    def n_targets(self):
        return self.targets.numel()

    def to(self, device):
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.to(device, non_blocking=True)
        return Batch(**moved)

    def model_inputs(self):
        """Keyword arguments for model(...)."""
        return dict(ids=self.ids, positions=self.positions, mask=self.mask, lengths=self.lengths)


def _tensor(rows, T, pad_id):
    out = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for b, row in enumerate(rows):
        out[b, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _finish(ids, positions, mask, preds, n_seqs, rows):
    """preds: [(segment, flat_pred_indices list, target ids list)] in segment order; rows: the unpadded rows."""
    pred_index = torch.tensor([i for _, idx, _ in preds for i in idx], dtype=torch.long)
    targets = torch.tensor([t for _, _, tg in preds for t in tg], dtype=torch.long)
    segment = torch.tensor([s for s, idx, _ in preds for _ in idx], dtype=torch.long)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    return Batch(ids, positions, mask, pred_index, targets, segment, n_seqs, int(lengths.sum()), lengths)


def sft_batch(examples, pad_id=0):
    """[SFTExample] -> Batch, one row per example, segment = row index."""
    if not examples:
        raise MinifTError("sft_batch: no examples")
    T = max(len(e.ids) for e in examples)
    preds = []
    for b, e in enumerate(examples):
        if len(e.target_mask) != len(e.ids) or (e.target_mask and e.target_mask[0]):
            raise MinifTError(f"{e.where or 'example'}: target_mask must match ids and leave token 0 "
                              "(nothing predicts it) out")
        ts = [t for t, m in enumerate(e.target_mask) if m]
        preds.append((b, [b * T + t - 1 for t in ts], [e.ids[t] for t in ts]))  # hidden t-1 predicts token t
    ids = _tensor([e.ids for e in examples], T, pad_id)
    positions = torch.arange(T).expand(len(examples), T).contiguous()  # (B, T)
    return _finish(ids, positions, None, preds, len(examples), [e.ids for e in examples])


def _check_pairs(pairs, layout):
    if layout not in LAYOUTS:
        raise MinifTError(f"unknown DPO layout {layout!r} (expected one of {', '.join(LAYOUTS)})")
    if not pairs:
        raise MinifTError("dpo_batch: no pairs")
    for e in pairs:
        if not (e.prompt_ids and e.chosen_ids and e.rejected_ids):
            raise MinifTError(f"{e.where or 'pair'}: prompt, chosen and rejected must each have a token")


def dpo_batch(pairs, layout="concat", pad_id=0):
    """[PrefExample] -> Batch with n_seqs = 2P: segment i = chosen of pair i, P + i = rejected of pair i.
    layout: "shared-prompt" or "concat"."""
    _check_pairs(pairs, layout)
    P = len(pairs)
    if layout == "concat":
        rows = [(e.prompt_ids, e.chosen_ids) for e in pairs] + [(e.prompt_ids, e.rejected_ids) for e in pairs]
        T = max(len(p) + len(c) for p, c in rows)
        # row r: the hidden state at p-1+j predicts completion token j
        preds = [(r, [r * T + len(p) - 1 + j for j in range(len(c))], c) for r, (p, c) in enumerate(rows)]
        ids = _tensor([p + c for p, c in rows], T, pad_id)
        positions = torch.arange(T).expand(2 * P, T).contiguous()  # (2P, T)
        return _finish(ids, positions, None, preds, 2 * P, [p + c for p, c in rows])  # the prompt computed twice

    T = max(len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in pairs)
    kind = torch.full((P, T), 3, dtype=torch.long)  # per slot: 0 prompt, 1 chosen, 2 rejected, 3 pad
    positions = torch.zeros(P, T, dtype=torch.long)
    chosen_preds, rejected_preds = [], []
    for i, e in enumerate(pairs):
        p, c, r = len(e.prompt_ids), len(e.chosen_ids), len(e.rejected_ids)
        kind[i, :p], kind[i, p:p + c], kind[i, p + c:p + c + r] = 0, 1, 2
        positions[i, :p + c] = torch.arange(p + c)
        positions[i, p + c:p + c + r] = torch.arange(p, p + r)  # rejected restarts where the prompt ends
        base = i * T
        chosen_preds.append((i, [base + p - 1 + j for j in range(c)], e.chosen_ids))
        # rejected[0] is predicted by the last prompt token, rejected[j] by slot p+c+j-1
        rejected_preds.append((P + i, [base + p - 1] + [base + p + c + j - 1 for j in range(1, r)], e.rejected_ids))
    q, k = kind[:, :, None], kind[:, None, :]  # (P, T, 1), (P, 1, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T) key slot <= query slot
    mask = causal & ((k == 0) | (k == q))  # (P, T, T): the prompt, and one's own completion
    # A pad attends only to itself: no attention row may be all False (SDPA would give NaN there).
    mask = torch.where(q == 3, torch.eye(T, dtype=torch.bool), mask)
    rows = [e.prompt_ids + e.chosen_ids + e.rejected_ids for e in pairs]
    return _finish(_tensor(rows, T, pad_id), positions, mask, chosen_preds + rejected_preds, 2 * P, rows)

