"""torchrun: several processes train one model with PyTorch's own engine (torch.distributed, DDP, FSDP2).

    torchrun --nproc-per-node 2 train_sft.py ...                     # one machine, 2 processes (gloo on CPU)
    torchrun --nnodes 2 --node-rank R --nproc-per-node 8 --rdzv-endpoint HOST:29500 train_dpo.py ...

Each process learns its place from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).
Without torchrun nothing here does anything: `current()` is a one-process `Dist` and every helper is the
identity, so the trainer has one code path.

What makes W processes equal one process with the global batch:
  - each optimizer step's examples (batch-size x grad-accum x W) are cut into W equal contiguous shares;
  - every loss sum is divided by the step's GLOBAL count (tokens or pairs, all-reduced first), and the
    backward is scaled by W because DDP and FSDP average gradients over ranks: (1/W) sum_r W g_r = sum_r g_r;
  - logged losses and metrics are sums all-reduced in fp64, then divided by the same global count.
Parallel modes:
  ddp   the frozen base replicated on every rank; DDP all-reduces the LoRA gradients (small: the rank-r
        factors only), overlapped with the backward.
  fsdp  FSDP2 `fully_shard` on each block and on the root: every parameter, frozen base included, is cut
        into W row shards; a block's full weights exist only while that block computes. The model is never
        whole on one rank: it is built without storage, sharded, then each rank reads only its rows of
        each tensor from the safetensors files (`shard`).
"""
import contextlib
import datetime
import functools
import math
import os
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from minift.errors import MinifTError

PARALLEL = ("ddp", "fsdp")


@dataclass
class Dist:
    """This process's place in the job. The default is a single process."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"
    parallel: str = "none"  # none | ddp | fsdp
    mesh: object = None  # the 1-D DeviceMesh FSDP shards over

    @property
    def main(self):
        return self.rank == 0  # rank 0 alone writes files and draws the progress bar

    @property
    def on(self):
        return self.parallel != "none"


_current = Dist()


def current() -> Dist:
    return _current


def launched() -> bool:
    """True inside a process started by torchrun (or any launcher that sets the same variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(parallel="ddp", device="auto", timeout_min=30) -> Dist:
    """Join the process group torchrun describes: nccl on CUDA (one GPU per local rank), gloo on the CPU."""
    global _current
    if not launched():
        return _current
    if parallel not in PARALLEL:
        raise MinifTError(f"--parallel must be one of {', '.join(PARALLEL)}, got {parallel!r}")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() if device == "auto" else str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(local)
        device, backend = f"cuda:{local}", "nccl"
    else:
        device, backend = "cpu", "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_min))
    from torch.distributed.device_mesh import init_device_mesh

    # An explicit mesh on the CPU: FSDP2's default mesh would ask for the CUDA device of this rank.
    mesh = init_device_mesh("cuda" if cuda else "cpu", (world,))
    _current = Dist(rank, world, local, device, parallel, mesh)
    return _current


def close():
    """Meet at a barrier, then leave the group. Call once the model is gone: FSDP2 on gloo can abort at exit
    when a rank tears down while a peer still holds sharded parameters."""
    global _current
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
    _current = Dist()


def leave():
    """End this torchrun rank once its run has returned and close() has left the group, skipping the
    interpreter's teardown. A gloo worker thread lets go of a finished collective's buffers a moment after the
    collective returns; they are tensors Python owns, so freeing them takes the GIL, and a thread that asks for
    it while the interpreter is finalizing is stopped mid-destructor: the process aborts ("terminate called
    without an active exception", seen under FSDP in tests/test_distributed.py). Nothing is left to tear down
    (every file is written and closed), so the rank flushes its output and exits here."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def entry(run):
    """Decorates a run function `run(cfg, ...)` (recipes.run_sft, run_dpo): join the group from cfg.parallel and
    cfg.device, run, then close() once the run has returned and its model is gone. Bad input is met by every
    rank alike (each reads the data and arguments): rank 0 says it, the others exit quietly with the same code.
    A nested call (a study running several phases) joins the group once."""

    @functools.wraps(run)
    def wrapped(cfg, *args, **kwargs):
        outer = not dist.is_initialized()
        d = init(getattr(cfg, "parallel", "ddp"), getattr(cfg, "device", "auto"))
        try:
            result = run(cfg, *args, **kwargs)
        except MinifTError:
            if d.on and not d.main:
                sys.exit(2)
            raise
        if outer:
            close()
        return result

    return wrapped


# --- splitting work ----------------------------------------------------------------------------------------


def rank_share(items, d=None):
    """This rank's contiguous share of a list whose length is a multiple of the world size (one step's examples)."""
    d = d or _current
    if len(items) % d.world:
        raise MinifTError(f"{len(items)} items cannot be split evenly over {d.world} ranks")
    n = len(items) // d.world
    return items[d.rank * n:(d.rank + 1) * n]


def balanced_chunks(items, size, d=None):
    """(chunk, real) pairs covering this rank's near-equal share of `items` in chunks of `size`, the same number
    of chunks on every rank. FSDP's forward is a collective (each block all-gathers its weights), so a rank
    with fewer chunks repeats its last one with real=False (computed, result dropped) instead of stopping early
    and leaving the others waiting. A rank with no items at all borrows item 0."""
    d = d or _current
    per = math.ceil(len(items) / d.world)
    mine = items[d.rank * per:(d.rank + 1) * per]
    n_chunks = math.ceil(per / size)
    chunks = [(mine[i:i + size], True) for i in range(0, len(mine), size)]
    filler = chunks[-1][0] if chunks else items[:1]
    return chunks + [(filler, False)] * (n_chunks - len(chunks))


# --- reductions --------------------------------------------------------------------------------------------


def all_reduce_sum(values, d=None):
    """Sum a list (or dict) of numbers over ranks, in fp64 so the sum of W partial sums loses nothing."""
    d = d or _current
    if not d.on:
        return values
    keys = list(values) if isinstance(values, dict) else None
    flat = [values[k] for k in keys] if keys else list(values)
    t = torch.tensor([float(v) for v in flat], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    out = t.tolist()
    return dict(zip(keys, out)) if keys else out


def any_rank(flag: bool, d=None) -> bool:
    """True on every rank when it is True on any (a signal seen by one rank stops all at the same step)."""
    d = d or _current
    if not d.on:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_rows(table: torch.Tensor, filled: torch.Tensor, d=None) -> torch.Tensor:
    """One table from the rows each rank filled (`filled` [N] bool); rows are disjoint across ranks, so a sum of
    zero-elsewhere copies is exact (x + 0 == x). Rows no rank filled stay NaN."""
    d = d or _current
    if not d.on:
        return table
    t = torch.where(filled.view(-1, *[1] * (table.dim() - 1)), table, 0).to(d.device, torch.float64)
    n = filled.to(d.device, torch.float64)
    dist.all_reduce(t)
    dist.all_reduce(n)
    t[n == 0] = float("nan")
    return t.to("cpu", table.dtype)


def all_gather_object(obj, d=None) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (small Python objects: RNG states)."""
    d = d or _current
    if not d.on:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def grad_sync(model, sync: bool):
    """Context for one micro-batch's backward: gradients are reduced across ranks only when `sync` (the last
    micro-batch of a step); before it they accumulate locally (DDP no_sync, FSDP2 set_requires_gradient_sync)."""
    if isinstance(model, DDP) and not sync:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def barrier(d=None):
    if (d or _current).on:
        dist.barrier()


# --- wrapping ----------------------------------------------------------------------------------------------


class DDP(torch.nn.parallel.DistributedDataParallel):
    """DDP whose attributes fall through to the model (losses read `model.lm_head.weight`, recipes `.config`)."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def is_wrapped(model) -> bool:
    return isinstance(model, DDP) or hasattr(model, "set_requires_gradient_sync")  # FSDP2 changes the class


def unwrap(model):
    """The model itself (DDP wraps it; FSDP2 changes it in place and needs no unwrapping)."""
    return model.module if isinstance(model, DDP) else model


def wrap(model, ckpt_dir=None, d=None):
    """DDP or FSDP2 around the model (LoRA attached). fsdp: the model comes from load(..., shell=True) and is
    filled here from `ckpt_dir`, each rank reading only its shards."""
    d = d or _current
    if d.parallel == "ddp":
        # No buffer sync in forward: the only buffer (RoPE frequencies) is computed identically on every rank.
        ids = [d.local_rank] if d.device.startswith("cuda") else None
        return DDP(model, device_ids=ids, forward_sync_buffers=False)
    if d.parallel == "fsdp":
        return shard(model, ckpt_dir, d)
    return model


def is_placeholder(t: torch.Tensor) -> bool:
    """A weight of a shell model: one element seen at every index (stride 0), no storage of its own."""
    return t.numel() > 1 and all(s == 0 for s in t.stride())


def shard(model, ckpt_dir, d):
    """FSDP2 on a shell model (load(..., shell=True)) with LoRA attached; each rank reads its rows from the files."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from minift.model.checkpoint import ShardReader
    from minift.model.transformer import rope_inv_freq

    # Keep what exists only in memory (the LoRA factors, initialised or loaded already: small), then drop all
    # storage: the model goes to the meta device, is sharded there, and each rank allocates only its shards.
    kept = {n: p.detach().clone() for n, p in model.named_parameters() if not is_placeholder(p)}
    model.to("meta")
    if model.config.tie_embeddings:  # .to() made two parameters of the tied one: one shared shard again
        model.lm_head.weight = model.embed.weight
    mp = None
    if d.device.startswith("cuda"):  # bf16 compute and all-gathers, fp32 gradient reduction
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kw = dict(mesh=d.mesh, **({"mp_policy": mp} if mp else {}))
    # The model returns a view of its padded output; nothing writes into it in place (the losses index it),
    # which is the case this warning is about.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for block in model.layers:
        fully_shard(block, **kw)
    fully_shard(model, **kw)  # the root: embedding, final norm, lm_head (tied: one shared parameter)
    model.to_empty(device=d.device)
    reader = ShardReader(ckpt_dir, model.config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            local, start, stop = local_rows(p, d)
            local.copy_(kept[name][start:stop] if name in kept else reader.rows(name, start, stop))
    model.inv_freq = rope_inv_freq(model.config).to(d.device)  # buffers are not in the file
    return model


def local_bytes(model, frozen_only=True) -> int:
    """Bytes of parameter storage held by this rank (its shards under FSDP)."""
    total = 0
    for p in model.parameters():
        if frozen_only and p.requires_grad:
            continue
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


# --- full tensors for saving -------------------------------------------------------------------------------


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective under FSDP: every rank must call it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@contextmanager
def gathered(model, params):
    """Inside: each named parameter of `params` is a plain full tensor (LoRA factors for saving an adapter).
    A collective: every rank enters. The sharded parameters are put back on exit."""
    swapped = []
    for name in params:
        owner, _, leaf = name.rpartition(".")
        mod = model.get_submodule(owner)
        p = getattr(mod, leaf)
        if hasattr(p, "full_tensor"):
            swapped.append((mod, leaf, p))
            mod._parameters[leaf] = torch.nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)
    try:
        yield model
    finally:
        for mod, leaf, p in swapped:
            mod._parameters[leaf] = p


def optimizer_state(model, optimizer, d=None):
    """The optimizer state as full tensors keyed by parameter name (on rank 0; {} elsewhere under FSDP)."""
    d = d or _current
    if d.parallel != "fsdp":
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, state, d=None):
    d = d or _current
    if d.parallel != "fsdp":
        return optimizer.load_state_dict(state)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def local_rows(p: torch.Tensor, d=None):
    """(this rank's tensor, first row, end row) of parameter p in the full tensor's rows."""
    d = d or _current
    if not hasattr(p, "to_local"):
        return p, 0, p.shape[0]
    local = p.to_local()  # (rows_r, ...)
    start = min(d.rank * math.ceil(p.shape[0] / d.world), p.shape[0])  # FSDP2 cuts dim 0 like torch.chunk
    return local, start, start + local.shape[0]


def set_local(p: torch.Tensor, value: torch.Tensor, d=None):
    """Copy the full tensor `value` into parameter p (into this rank's rows when p is sharded)."""
    local, start, stop = local_rows(p, d)
    local.copy_(value[start:stop])
