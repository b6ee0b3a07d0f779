"""LoRA (Hu et al. 2021) on our Transformer, readable and writable in PEFT's adapter format.

A target nn.Linear is replaced, in place, by a `LoRALinear` that keeps the same frozen `weight` Parameter (so
base state-dict names do not change) and adds, per adapter name, factors A (r x in) and B (out x r):

    y = x W^T + scaling * B(A(dropout(x))),   scaling = alpha / r   (rsLoRA: alpha / sqrt(r))

Several adapters can live on one base, as in PEFT: DPO trains "default" while a frozen copy of the SFT adapter
("reference") or the bare base (`adapters_disabled`) gives the reference log-probs, with no second model.
References (read to learn, not copied): the LoRA and rsLoRA (Kalajdzievski 2023) papers, PEFT's file format.
"""
import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minift.model.checkpoint import save_hf, to_hf_name
from minift.errors import MinifTError

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # HF names; never lm_head
PREFIX = "base_model.model."  # PEFT's prefix before the HF module path in adapter_model.safetensors


def lora_scaling(alpha, r, rslora=False) -> float:
    # rsLoRA: alpha / sqrt(r) keeps the update's size stable as r grows (plain alpha / r shrinks it).
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoRALinear(nn.Linear):
    """A frozen nn.Linear plus named low-rank adapters; at most one adapter is applied at a time."""

    def __init__(self, base: nn.Linear):
        nn.Module.__init__(self)  # skip nn.Linear.__init__: adopt the base parameters instead of allocating new ones
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.lora_A, self.lora_B, self.lora_dropout = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.settings = {}  # adapter name -> dict(r, alpha, dropout, rslora), written to adapter_config.json
        self.scaling = {}
        self.active = None  # name of the applied adapter
        self.disabled = False  # True: compute the base layer only
        self.merged = None  # name of the adapter currently added into `weight`

    def add_adapter(self, name, r, alpha, dropout=0.0, rslora=False, dtype=None):
        if name in self.lora_A:
            raise MinifTError(f"adapter {name!r} already exists")
        if dtype is None:  # PEFT's default: half-precision bases get fp32 adapters (stable optimizer updates)
            dtype = torch.float32 if self.weight.dtype in (torch.float16, torch.bfloat16) else self.weight.dtype
        kw = dict(bias=False, device=self.weight.device, dtype=dtype)
        self.lora_A[name] = nn.Linear(self.in_features, r, **kw)
        self.lora_B[name] = nn.Linear(r, self.out_features, **kw)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))  # PEFT's default init of A
        nn.init.zeros_(self.lora_B[name].weight)  # B = 0: the adapter starts as the identity change
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.settings[name] = dict(r=r, alpha=alpha, dropout=dropout, rslora=rslora)
        self.scaling[name] = lora_scaling(alpha, r, rslora)
        if self.active is None:
            self.active = name

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        name = self.active
        if self.disabled or self.merged is not None or name not in self.lora_A:
            return y  # the base layer alone: no LoRA branch is computed at all
        # Compute in the input dtype; the (possibly fp32) factors get their gradient through the cast.
        a = self.lora_A[name].weight.to(x.dtype)
        b = self.lora_B[name].weight.to(x.dtype)
        # The scaling multiplies the rank-r product, not the [tokens x out] one: r/out of the elementwise work.
        return y + F.linear(self.scaling[name] * F.linear(self.lora_dropout[name](x), a), b)

    def delta(self, name):
        """scaling * B @ A in fp32 (out x in), the change this adapter makes to `weight`."""
        return self.scaling[name] * (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float())

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, adapters={self.settings}, active={self.active!r}"


def lora_modules(model, name=None):
    """(path, LoRALinear) pairs, optionally only those holding adapter `name`."""
    return [(p, m) for p, m in model.named_modules()
            if isinstance(m, LoRALinear) and (name is None or name in m.lora_A)]


def _resolve_targets(targets, source="targets"):
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    targets = list(targets)
    if "all-linear" in targets:
        return list(TARGETS)
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise MinifTError(f"{source}: unsupported LoRA target module(s) {bad or '[]'} "
                          f"(supported: {', '.join(TARGETS)} or all-linear)")
    return [t for t in TARGETS if t in targets]


def _target_linears(model, targets):
    """(path, nn.Linear or LoRALinear) for every module whose last name is in `targets`, in model order."""
    if not (out := [(p, m) for p, m in model.named_modules()
                    if p.rsplit(".", 1)[-1] in targets and isinstance(m, nn.Linear)]):
        raise MinifTError(f"no module of the model matches LoRA targets {targets}")
    return out


def _set_trainable(model, name, trainable):
    for _, m in lora_modules(model, name):
        for p in (*m.lora_A[name].parameters(), *m.lora_B[name].parameters()):
            p.requires_grad_(trainable)


def apply_lora(model, targets, r, alpha, dropout=0.0, rslora=False, name="default", dtype=None) -> list:
    """Add adapter `name` on every target Linear (wrapping it if needed); freeze all non-LoRA parameters.

    The new adapter is trainable; other adapters keep their requires_grad. Returns the wrapped module paths."""
    if int(r) != r or r < 1:
        raise MinifTError(f"LoRA rank r must be a positive integer, got {r!r}")
    paths = []
    for path, mod in _target_linears(model, _resolve_targets(targets)):
        if not isinstance(mod, LoRALinear):
            parent, _, leaf = path.rpartition(".")
            mod = LoRALinear(mod)
            setattr(model.get_submodule(parent), leaf, mod)
        mod.add_adapter(name, int(r), alpha, dropout, rslora, dtype)
        paths.append(path)
    for pname, p in model.named_parameters():
        if "lora_" not in pname:
            p.requires_grad_(False)  # frozen: no gradient buffer is ever allocated for the base
    _set_trainable(model, name, True)
    return paths


def lora_summary(model) -> str:
    params = list(model.parameters())  # parameters() yields a tied weight once
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"


def _require(model, name):
    if not (mods := lora_modules(model, name)):
        raise MinifTError(f"the model has no LoRA adapter named {name!r}")
    return mods


def set_active_adapter(model, name):
    _require(model, name)
    if any(m.merged is not None for _, m in lora_modules(model)):
        raise MinifTError("cannot switch adapters while one is merged into the weights: unmerge_lora first")
    for _, m in lora_modules(model):
        m.active = name


@contextmanager
def use_adapter(model, name):
    before = [(m, m.active) for _, m in lora_modules(model)]
    set_active_adapter(model, name)
    try:
        yield model
    finally:
        for m, active in before:
            m.active = active


@contextmanager
def adapters_disabled(model):
    """Inside: the model computes exactly the base network (the DPO reference without a second copy).

    Use it (and use_adapter) for no-grad passes, or without gradient checkpointing: a checkpointed block is
    recomputed during backward, after the context has ended, with whatever adapter is then active."""
    mods = [m for _, m in lora_modules(model)]
    if any(m.merged is not None for m in mods):
        raise MinifTError("cannot disable adapters while one is merged into the weights: unmerge_lora first")
    for m in mods:
        m.disabled = True  # forward skips the branch entirely (not a multiply by zero)
    try:
        yield model
    finally:
        for m in mods:
            m.disabled = False


def add_adapter_copy(model, src="default", dst="reference"):
    """A frozen copy of adapter `src` under the name `dst` (e.g. the SFT adapter that DPO starts from)."""
    for _, m in _require(model, src):
        s = m.settings[src]
        m.add_adapter(dst, s["r"], s["alpha"], s["dropout"], s["rslora"], m.lora_A[src].weight.dtype)
        with torch.no_grad():
            m.lora_A[dst].weight.copy_(m.lora_A[src].weight)
            m.lora_B[dst].weight.copy_(m.lora_B[src].weight)
    _set_trainable(model, dst, False)


@torch.no_grad()
def merge_lora(model, name=None):
    """Add the active (or named) adapter into the base weights, in place; forward then skips the branch."""
    if not (mods := lora_modules(model)):
        raise MinifTError("the model has no LoRA adapters to merge")
    if any(m.merged is not None for _, m in mods):
        raise MinifTError("an adapter is already merged: unmerge_lora first")
    name = name or mods[0][1].active
    for _, m in _require(model, name):
        m.weight.copy_(m.weight.float() + m.delta(name))  # delta in fp32, then cast to the weight's dtype
        m.merged = name


@torch.no_grad()
def unmerge_lora(model):
    """Undo merge_lora: exact to the weight dtype's rounding (fp32: ~1e-7 relative; bf16: up to one ulp)."""
    for _, m in lora_modules(model):
        if m.merged is not None:
            m.weight.copy_(m.weight.float() - m.delta(m.merged))
            m.merged = None


def save_merged(model, tokenizer, out_dir) -> Path:
    """An HF checkpoint dir with the active adapter merged in; the model's weights are then restored exactly."""
    # Restore from a CPU copy rather than by unmerging: in bf16, (w + d) - d misses w by one ulp in about a
    # quarter of the entries, and training may go on after an export.
    originals = [(m, m.weight.detach().to("cpu", copy=True)) for _, m in lora_modules(model)]
    merge_lora(model)
    try:
        return save_hf(model, tokenizer, out_dir)
    finally:
        with torch.no_grad():
            for m, w in originals:
                m.weight.copy_(w)
                m.merged = None


def save_adapter(model, out_dir, name="default", base_model_name_or_path=None) -> Path:
    """adapter_config.json + adapter_model.safetensors, as PEFT's save_pretrained writes them."""
    mods = _require(model, name)
    s = mods[0][1].settings[name]
    targets = [t for t in TARGETS if any(p.rsplit(".", 1)[-1] == t for p, _ in mods)]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
              "revision": None, "r": s["r"], "lora_alpha": s["alpha"], "lora_dropout": s["dropout"],
              "target_modules": targets, "use_rslora": s["rslora"], "use_dora": False, "bias": "none",
              "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
              "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}
    tensors = {}
    for path, m in mods:
        key = PREFIX + to_hf_name(path)  # our module path -> HF module path
        tensors[key + ".lora_A.weight"] = m.lora_A[name].weight.detach().contiguous()
        tensors[key + ".lora_B.weight"] = m.lora_B[name].weight.detach().contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


# PEFT options that change what an adapter computes or which weights it holds; each must keep its neutral value.
MUST_BE_EMPTY = ("use_dora", "lora_bias", "fan_in_fan_out", "modules_to_save", "rank_pattern", "alpha_pattern",
                 "layers_to_transform", "layers_pattern", "layer_replication", "exclude_modules", "target_parameters",
                 "trainable_token_indices", "alora_invocation_tokens", "use_qalora", "megatron_config",
                 "arrow_config", "use_bdlora")
# init_lora_weights values that only choose the starting adapter; others (pissa, olora, corda, loftq) rewrite the base.
PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")


def read_adapter_config(path: Path) -> dict:
    try:
        c = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MinifTError(f"{path}: not valid JSON ({e})") from None

    def refuse(option, why):
        raise MinifTError(f"{path}: unsupported PEFT option {option}={c.get(option)!r} ({why})")

    if c.get("peft_type") != "LORA":
        refuse("peft_type", "only LORA adapters are supported")
    if c.get("task_type") not in (None, "CAUSAL_LM"):
        refuse("task_type", "only CAUSAL_LM")
    if c.get("bias", "none") != "none":
        refuse("bias", "only bias='none'")
    for option in MUST_BE_EMPTY:
        if c.get(option) not in (None, False, {}, [], ""):
            refuse(option, "not supported by minift")
    if c.get("init_lora_weights", True) not in PLAIN_INITS:
        refuse("init_lora_weights", "this init changes the base weights")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in c:
            raise MinifTError(f"{path}: missing field {key}")
    if not isinstance(c["r"], int) or c["r"] < 1 or not isinstance(c["lora_alpha"], (int, float)):
        raise MinifTError(f"{path}: r={c['r']!r} must be a positive integer and lora_alpha={c['lora_alpha']!r} a number")
    targets = c["target_modules"]
    if isinstance(targets, str) and targets != "all-linear":
        refuse("target_modules", "regular-expression targets are not supported; list module names")
    return dict(r=c["r"], alpha=c["lora_alpha"], dropout=c.get("lora_dropout", 0.0) or 0.0,
                rslora=bool(c.get("use_rslora", False)),
                targets=_resolve_targets([targets] if isinstance(targets, str) else targets, f"{path}: target_modules"))


def load_adapter(model, adapter_dir, name="default", trainable=False):
    """Load a PEFT LoRA adapter dir into adapter `name` (applying LoRA first if the model lacks that adapter)."""
    cfg_path, st_path = Path(adapter_dir) / "adapter_config.json", Path(adapter_dir) / "adapter_model.safetensors"
    for f in (cfg_path, st_path):
        if not f.is_file():
            raise MinifTError(f"{f}: not found (a PEFT adapter dir holds adapter_config.json and adapter_model.safetensors)")
    c = read_adapter_config(cfg_path)
    try:
        handle = safe_open(str(st_path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise MinifTError(f"{st_path}: cannot read safetensors file ({e})") from None
    # Check every name and shape against the target modules before touching the model.
    expected = {}  # file key -> (module path, "A" or "B", shape)
    for path, m in _target_linears(model, c["targets"]):
        key = PREFIX + to_hf_name(path)
        expected[key + ".lora_A.weight"] = (path, "A", (c["r"], m.in_features))
        expected[key + ".lora_B.weight"] = (path, "B", (m.out_features, c["r"]))
    keys = set(handle.keys())
    problems = [f"missing tensor {k}" for k in expected if k not in keys]
    problems += [f"unexpected tensor {k}" for k in sorted(keys - set(expected))]
    for k, (_, _, shape) in expected.items():
        if k in keys and (got := tuple(handle.get_slice(k).get_shape())) != shape:
            problems.append(f"tensor {k} has shape {list(got)}, adapter_config.json (r={c['r']}) expects {list(shape)}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise MinifTError(f"{st_path}: {'; '.join(problems[:3])}{more}")
    have = lora_modules(model, name)
    wanted = list(dict.fromkeys(path for path, _, _ in expected.values()))
    if not have:
        apply_lora(model, c["targets"], c["r"], c["alpha"], c["dropout"], c["rslora"], name)
    elif [p for p, _ in have] != wanted or have[0][1].settings[name]["r"] != c["r"]:
        raise MinifTError(f"{cfg_path}: r or target_modules differ from those of the model's adapter {name!r}")
    with torch.no_grad():
        for k, (path, which, _) in expected.items():
            try:
                tensor = handle.get_tensor(k)
            except (SafetensorError, OSError) as e:  # e.g. a file truncated after its header
                raise MinifTError(f"{st_path}: cannot read tensor {k} ({e})") from None
            getattr(model.get_submodule(path), "lora_" + which)[name].weight.copy_(tensor)
    for _, m in lora_modules(model, name):  # an existing adapter takes the file's settings too
        m.settings[name] = dict(r=c["r"], alpha=c["alpha"], dropout=c["dropout"], rslora=c["rslora"])
        m.scaling[name] = lora_scaling(c["alpha"], c["r"], c["rslora"])
        m.lora_dropout[name] = nn.Dropout(c["dropout"]) if c["dropout"] > 0 else nn.Identity()
    _set_trainable(model, name, trainable)
    return model
