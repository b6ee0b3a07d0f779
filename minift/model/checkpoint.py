"""Hugging Face checkpoint dir <-> our Transformer: one visible weight map, named errors, merged export.

A checkpoint dir holds config.json, model.safetensors (or shards listed in model.safetensors.index.json) and the
tokenizer files. Every missing, unexpected or wrongly shaped tensor is reported by name, all in one error.
"""
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minift.model.config import ModelConfig
from minift.errors import MinifTError
from minift.model.transformer import Transformer, rope_inv_freq

# HF name -> our name; `{}` is the layer index. This table is the whole translation.
WEIGHT_MAP = {
    "model.embed_tokens.weight": "embed.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attn_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.q_proj.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attn.k_proj.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attn.v_proj.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.o_proj.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.gate_proj.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.up_proj.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.down_proj.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
OURS_TO_HF = {v: k for k, v in WEIGHT_MAP.items()}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints saved; we recompute them


def _translate(name: str, table: dict) -> str:
    """Translate a tensor name, or a module path (no `.weight`), through `table`."""
    layer = re.search(r"layers\.(\d+)\.", name)
    generic = name.replace(layer.group(0), "layers.{}.", 1) if layer else name
    for suffix in ("", ".weight"):
        if generic + suffix in table:
            out = table[generic + suffix]
            out = out[: len(out) - len(suffix)] if suffix else out
            return out.format(layer.group(1)) if layer else out
    raise KeyError(name)


def to_hf_name(ours: str) -> str:
    """`layers.3.attn.q_proj.weight` -> `model.layers.3.self_attn.q_proj.weight` (module paths work too)."""
    return _translate(ours, OURS_TO_HF)


def from_hf_name(hf: str) -> str:
    return _translate(hf, WEIGHT_MAP)


def expected_tensors(cfg: ModelConfig) -> dict:
    """HF name -> shape for every tensor a checkpoint of this config must hold."""
    d, hd, V = cfg.dim, cfg.head_dim, cfg.vocab_size
    shapes = {"embed.weight": (V, d), "norm.weight": (d,), "lm_head.weight": (V, d)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes.update({p + "attn_norm.weight": (d,), p + "mlp_norm.weight": (d,),
                       p + "attn.q_proj.weight": (cfg.n_heads * hd, d), p + "attn.k_proj.weight": (cfg.n_kv_heads * hd, d),
                       p + "attn.v_proj.weight": (cfg.n_kv_heads * hd, d), p + "attn.o_proj.weight": (d, cfg.n_heads * hd),
                       p + "mlp.gate_proj.weight": (cfg.hidden_dim, d), p + "mlp.up_proj.weight": (cfg.hidden_dim, d),
                       p + "mlp.down_proj.weight": (d, cfg.hidden_dim)})
    if cfg.tie_embeddings:
        del shapes["lm_head.weight"]  # the embedding matrix serves both ends
    return {to_hf_name(k): v for k, v in shapes.items()}


def _tensor_files(ckpt: Path) -> dict:
    """HF tensor name -> the safetensors file holding it (single file or sharded index)."""
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise MinifTError(f"{index}: not a safetensors index ({e})") from None
        missing = sorted({f for f in weight_map.values() if not (ckpt / f).is_file()})
        if missing:
            raise MinifTError(f"{index}: missing shard file(s) {', '.join(missing)}")
        return {name: ckpt / f for name, f in weight_map.items()}
    single = ckpt / "model.safetensors"
    if not single.is_file():
        raise MinifTError(f"{ckpt}: no model.safetensors or model.safetensors.index.json")
    return {name: single for name in _open(single).keys()}


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise MinifTError(f"{path}: cannot read safetensors file ({e})") from None


def read_state_dict(ckpt, cfg: ModelConfig, dtype, device) -> dict:
    """Check every name and shape first (one error listing all problems), then read tensors as our names."""
    files, handles = checked_files(ckpt, cfg)
    state = {}
    for name, path in files.items():
        try:
            tensor = handles[path].get_tensor(name)
        except (SafetensorError, OSError) as e:  # e.g. a file truncated after its header
            raise MinifTError(f"{path}: cannot read tensor {name} ({e})") from None
        state[from_hf_name(name)] = tensor.to(device=device, dtype=dtype)
    return state


def checked_files(ckpt, cfg: ModelConfig):
    """(HF name -> file, file -> open handle), after checking every name and shape against the config."""
    ckpt = Path(ckpt)
    files = {n: f for n, f in _tensor_files(ckpt).items() if not n.endswith(IGNORED_SUFFIXES)}
    expected = expected_tensors(cfg)
    if cfg.tie_embeddings:
        files.pop("lm_head.weight", None)  # some tied checkpoints store a copy; the embedding is the truth
    handles = {f: _open(f) for f in set(files.values())}
    problems = [f"missing tensor {n}" for n in expected if n not in files]
    problems += [f"unexpected tensor {n} in {files[n].name}" for n in files if n not in expected]
    for name, shape in expected.items():
        if name in files:
            got = tuple(handles[files[name]].get_slice(name).get_shape())
            if got != shape:
                problems.append(f"tensor {name} in {files[name].name} has shape {list(got)}, config expects {list(shape)}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise MinifTError(f"{ckpt}: checkpoint does not match its config.json: {'; '.join(problems[:5])}{more}")
    return files, handles


class ShardReader:
    """Reads row ranges of tensors (our names) without reading the rest: what one FSDP rank holds."""

    def __init__(self, ckpt, cfg: ModelConfig):
        self.files, self.handles = checked_files(ckpt, cfg)

    def rows(self, ours: str, start: int, stop: int) -> torch.Tensor:
        hf = to_hf_name(ours)
        if hf not in self.files and ours == "lm_head.weight":
            hf = to_hf_name("embed.weight")  # tied: the embedding matrix serves both ends
        path = self.files[hf]
        try:
            return self.handles[path].get_slice(hf)[start:stop]  # reads only these rows from the file
        except (SafetensorError, OSError) as e:
            raise MinifTError(f"{path}: cannot read tensor {hf} ({e})") from None


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def file_dtype(ckpt) -> torch.dtype:
    """The dtype the checkpoint is stored in (read from a header, no tensor data)."""
    name, path = next(iter(_tensor_files(Path(ckpt)).items()))
    return SAFETENSORS_DTYPES.get(_open(path).get_slice(name).get_dtype(), torch.float32)


def load_model(ckpt, dtype=None, device="cpu", shell=False) -> Transformer:
    """Build the Transformer for `ckpt` and fill it. dtype None: fp32 on CPU (bf16 matmuls are ~100x slower
    there), the file's own dtype elsewhere. shell=True: the file is checked but no weight is read; each weight
    is a placeholder without storage (one element at stride 0) until distributed.shard fills this rank's rows,
    so LoRA can be attached first exactly as on a loaded model (same random init) and no rank holds the model."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise MinifTError(f"{ckpt}: checkpoint directory not found")
    cfg = ModelConfig.from_hf(ckpt)
    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "cpu" else file_dtype(ckpt)
    if shell:
        checked_files(ckpt, cfg)
        state = {from_hf_name(n): torch.zeros((), dtype=dtype, device=device).expand(shape)
                 for n, shape in expected_tensors(cfg).items()}
    else:
        state = read_state_dict(ckpt, cfg, dtype, device)
    with torch.device("meta"):
        model = Transformer(cfg)  # no memory, no random init: every weight comes from the file
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.inv_freq = rope_inv_freq(cfg).to(device)  # buffers are not in the file
    return model.eval()


def load(ckpt_dir=None, dtype=None, device="cpu", shell=False):
    """(model, tokenizer) from an HF checkpoint dir; None = the embedded SmolLM2-135M-Instruct."""
    from minift.model.tokenizer import Tokenizer

    if ckpt_dir is None:
        from minift.model.fetch import default_checkpoint

        ckpt_dir = default_checkpoint()
    model = load_model(ckpt_dir, dtype=dtype, device=device, shell=shell)
    return model, Tokenizer.from_dir(ckpt_dir)


def hf_state_dict(model: Transformer) -> dict:
    """Our weights under HF names, contiguous, ready for safetensors. LoRA factors are left out (merge first)."""
    state = {}
    for name, tensor in model.state_dict().items():
        if "lora_" in name or (name == "lm_head.weight" and model.config.tie_embeddings):
            continue
        state[to_hf_name(name)] = tensor.detach().contiguous()
    return state


def save_hf(model: Transformer, tokenizer, out_dir) -> Path:
    """Write an HF checkpoint dir (config.json, model.safetensors, tokenizer files) that transformers loads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = model.config.to_hf_dict()
    state = hf_state_dict(model)
    dtype = next(iter(state.values())).dtype
    hf["torch_dtype"] = hf["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(out)
    return out
