"""Reference log-probs for DPO, from the model being trained, without a second copy of it.

Strategies:
  adapters-off  the base network: every LoRA adapter switched off (lora.adapters_disabled), under no_grad.
  adapter       the frozen copy of the starting SFT adapter (lora.use_adapter(model, "reference")), no_grad.
  cached        one no-grad pass over the whole preference set before training, with one of the two above as
                the source, stored in OUT/ref_logps.safetensors under a sha256 key of everything the numbers
                depend on: the data file bytes, the tokenizer files, the truncation settings and the reference
                weights. The next run with the same key reuses the file; a different key means the file is
                stale: that is reported and the file recomputed, never used.
The reference forward runs in eval mode (no LoRA dropout) and restores the model's mode afterwards.
"""
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minift.train import distributed

from minift.model import lora
from minift.errors import MinifTError
from minift.train.losses import token_logps

STRATEGIES = ("cached", "adapters-off", "adapter")  # the first is the default
CACHE_FILE = "ref_logps.safetensors"
REF_ADAPTER = "reference"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json")


# --- the cache key -----------------------------------------------------------------------------------------


def file_digest(*paths) -> str:
    """sha256 over the bytes of the given files, each preceded by its base name (order matters)."""
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise MinifTError(f"{p}: file not found (needed for the reference cache key)")
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def tokenizer_digest(tokenizer_dir) -> str:
    """sha256 of the tokenizer files present in a checkpoint dir (tokenizer.json, its config, templates)."""
    files = [Path(tokenizer_dir) / n for n in TOKENIZER_FILES if (Path(tokenizer_dir) / n).is_file()]
    if not files:
        raise MinifTError(f"{tokenizer_dir}: no tokenizer files to hash for the reference cache key")
    return file_digest(*files)


def _update_tensor(h, name, t):
    t = distributed.full(t.detach())  # FSDP: the whole tensor (a collective), so every layout hashes alike
    h.update(f"{name}|{t.dtype}|{list(t.shape)}\0".encode())
    # Raw bytes of the tensor as it is in memory (any dtype, bf16 included, viewed as bytes): two different
    # weights can only collide through sha256 itself.
    h.update(t.contiguous().view(-1).view(torch.uint8).cpu().numpy())  # buffer protocol: no extra copy


def weights_digest(model, adapter=None) -> str:
    """sha256 of the reference weights: the model config, every base parameter as loaded (LoRA factors
    excluded; a tied matrix counted once) and, when `adapter` is named, that adapter's factors and scaling."""
    h = hashlib.sha256(repr(model.config).encode())
    for name, p in model.named_parameters():  # named_parameters() yields a shared (tied) tensor once
        if "lora_" not in name:
            _update_tensor(h, name, p)
    if adapter is not None:
        for path, m in lora.lora_modules(model, adapter):
            h.update(f"{path}|scaling={m.scaling[adapter]!r}\0".encode())
            _update_tensor(h, f"{path}.lora_A", m.lora_A[adapter].weight)
            _update_tensor(h, f"{path}.lora_B", m.lora_B[adapter].weight)
    return h.hexdigest()


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def key_parts(data_file, tokenizer_dir, **settings) -> dict:
    """The caller's share of the key: data file and tokenizer digests, and settings that change the tokens
    (max_length, truncation, chat template choices ...). The weights digest is added by Reference."""
    return {"data": file_digest(data_file), "tokenizer": tokenizer_digest(tokenizer_dir), "settings": settings}


# --- the reference -----------------------------------------------------------------------------------------


def _stderr(msg):
    if distributed.current().main:
        print(msg, file=sys.stderr)


class Reference:
    """Reference log-probs [2P] (chosen first, then rejected, like the batch's segments) per DPO micro-batch.

    Reference(strategy, model, out_dir=None, key_parts=None, source=None, log=print-to-stderr)
      strategy: adapters-off | adapter | cached.  source (cached only): adapters-off | adapter; default
      adapter when the model holds a "reference" adapter, else adapters-off.
    For cached, call .prepare(make_batches, n_examples) once before training; make_batches() yields batches
    over the whole preference set (each with `batch.index`, its pairs' rows in the set) and is called only when
    the cache must be built. A cached lookup reads `batch.index` too.
    """

    def __init__(self, strategy, model, out_dir=None, key_parts=None, source=None, log=_stderr):
        if strategy not in STRATEGIES:
            raise MinifTError(f"reference strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        if source is None:
            source = strategy if strategy != "cached" else (
                "adapter" if lora.lora_modules(model, REF_ADAPTER) else "adapters-off")
        if source not in ("adapters-off", "adapter") or (strategy != "cached" and source != strategy):
            raise MinifTError(f"reference source must be adapters-off or adapter (and equal the strategy unless "
                              f"cached), got strategy {strategy!r}, source {source!r}")
        if source == "adapter" and not lora.lora_modules(model, REF_ADAPTER):
            raise MinifTError(f"reference 'adapter' needs a frozen adapter named {REF_ADAPTER!r} on the model "
                              "(lora.add_adapter_copy after loading the starting adapter)")
        if strategy == "cached" and out_dir is None:
            raise MinifTError("reference 'cached' needs an output dir to keep its file in")
        self.strategy, self.source, self.model, self.log = strategy, source, model, log
        self.path = Path(out_dir) / CACHE_FILE if out_dir is not None else None
        self.key_parts = dict(key_parts or {})
        self.table = None  # cached: (chosen[N], rejected[N]) fp32 on the CPU
        self.status = None  # cached: "reused", "computed" or "recomputed (stale)" after prepare()

    def _context(self):
        if self.source == "adapter":
            return lora.use_adapter(self.model, REF_ADAPTER)
        return lora.adapters_disabled(self.model)

    @torch.no_grad()
    def compute(self, batch):
        """On-the-fly reference log-probs of one batch: [n_seqs] fp32 sums over each sequence's targets."""
        was_training = self.model.training
        self.model.eval()  # no dropout on the reference adapter's branch
        try:
            with self._context():
                logp, _ = token_logps(self.model, batch)
        finally:
            self.model.train(was_training)
        return logp.new_zeros(int(batch.n_seqs)).index_add(0, batch.segment, logp)  # (S,)

    def logps(self, batch):
        """[2P] reference log-probs for this batch: a no-grad forward, or rows `batch.index` of the cached table."""
        if self.strategy != "cached":
            return self.compute(batch)
        if self.table is None:
            raise MinifTError("reference 'cached': call prepare() before training")
        if batch.index is None:
            raise MinifTError("reference 'cached': the batch has no .index (its pairs' rows in the data set)")
        idx = torch.as_tensor(list(batch.index), dtype=torch.long)
        if idx.numel() * 2 != int(batch.n_seqs):
            raise MinifTError(f"reference 'cached': {idx.numel()} example indices for a batch of "
                              f"{batch.n_seqs} sequences (need one per pair)")
        chosen, rejected = self.table
        return torch.cat([chosen[idx], rejected[idx]]).to(batch.ids.device)  # (2P,)

    def full_key(self):
        adapter = REF_ADAPTER if self.source == "adapter" else None
        parts = {**self.key_parts, "source": self.source, "weights": weights_digest(self.model, adapter)}
        return cache_key(parts), parts

    def prepare(self, make_batches, n_examples):
        """cached: load the file if its key matches, else run the no-grad pass and write it. Returns status."""
        if self.strategy != "cached":
            return None
        key, parts = self.full_key()
        stored = self._read(n_examples)
        # Every rank must take the same branch (the pass below is collective): reuse only if all can.
        if not distributed.any_rank(stored is None or stored[0] != key):
            self.table, self.status = stored[1], "reused"
            self.log(f"reference log-probs: reusing {self.path} (key {key[:12]})")
            return self.status
        if stored is not None:
            self.log(f"reference log-probs: {self.path} is stale (its key {stored[0][:12]} != {key[:12]}: data, "
                     "tokenizer, truncation or reference weights changed); recomputing")
            self.status = "recomputed (stale)"
        else:
            self.status = "computed"
        self.log(f"reference log-probs: one no-grad pass over {n_examples} pairs ({self.source}) ...")
        start = time.perf_counter()
        chosen = torch.full((n_examples,), float("nan"))
        rejected = torch.full((n_examples,), float("nan"))
        batches = make_batches() if callable(make_batches) else make_batches
        for batch in batches:  # under torchrun: this rank's share of the pairs
            idx = torch.as_tensor(list(batch.index), dtype=torch.long)
            logps = self.compute(batch).float().cpu()
            if idx.numel():  # empty: a repeat that keeps FSDP's collective forwards in step
                chosen[idx], rejected[idx] = logps[: idx.numel()], logps[idx.numel():]
        table = distributed.gather_rows(torch.stack([chosen, rejected], 1), ~torch.isnan(chosen))  # (N, 2)
        chosen, rejected = table[:, 0].contiguous(), table[:, 1].contiguous()
        missing = torch.isnan(chosen) | torch.isnan(rejected)
        if missing.any():
            raise MinifTError(f"reference 'cached': {int(missing.sum())} of {n_examples} examples got no "
                              f"log-probs (first: index {int(missing.nonzero()[0, 0])})")
        self.table = (chosen, rejected)
        self._write(key, parts)
        self.log(f"reference log-probs: computed for {n_examples} pairs in {time.perf_counter() - start:.1f} s, "
                 f"saved to {self.path} (key {key[:12]})")
        return self.status

    def _read(self, n_examples):
        """(key, (chosen, rejected)) from the file, or None when there is no usable file."""
        if not self.path.is_file():
            return None
        try:
            with safe_open(str(self.path), framework="pt") as f:
                key = (f.metadata() or {}).get("key", "")
                table = (f.get_tensor("chosen"), f.get_tensor("rejected"))
        except (SafetensorError, OSError, KeyError) as e:
            self.log(f"reference log-probs: cannot read {self.path} ({e}); recomputing")
            return None
        if any(t.shape != (n_examples,) for t in table):
            return ("shape-mismatch", table)  # a different data set: treated as stale
        return key, table

    def _write(self, key, parts):
        if not distributed.current().main:
            return  # rank 0 writes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        chosen, rejected = self.table
        save_file({"chosen": chosen.contiguous(), "rejected": rejected.contiguous()}, str(tmp),
                  metadata={"key": key, "parts": json.dumps(parts, sort_keys=True, default=str)})
        os.replace(tmp, self.path)  # atomic: a killed run never leaves a half-written cache
