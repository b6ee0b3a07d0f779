"""GGUF -> Hugging Face checkpoint directory (minift/model/fetch.py uses it for the embedded default model).

References: the GGUF format (ggml docs/gguf.md) read through the `gguf` package; llama.cpp's
convert_hf_to_gguf.py, whose q/k permutation `_unpermute` undoes; transformers' GGUF loader (our test peer).

A GGUF file holds quantized weights under llama.cpp names plus the tokenizer as metadata (token strings,
BPE merges, token types, special ids, chat template). `convert_gguf` turns it into the directory that
minift and transformers both read: config.json, model.safetensors (fp32, HF names), tokenizer.json,
tokenizer_config.json and generation_config.json.

Command line, for any llama-architecture GGUF with a BPE vocabulary:
    python -m minift.gguf FILE.gguf OUT_DIR
"""
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from minift.errors import MinifTError, run_cli

# llama.cpp tensor names ({} = layer index) -> Hugging Face Llama names.
TENSOR_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent when the embeddings are tied
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}

# Pre-tokenizers by llama.cpp's `tokenizer.ggml.pre` name, built as the matching HF tokenizer.json has them.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre):
    from tokenizers import Regex, pre_tokenizers as pt

    if pre in ("smollm", "starcoder", "refact"):  # every digit alone, then GPT-2's regex (HF SmolLM2 layout)
        return pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in ("gpt-2", "gpt2", "default"):
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("llama-bpe", "llama3", "smaug-bpe", "dbrx"):  # Llama 3: its own split regex, then bytes
        return pt.Sequence([pt.Split(Regex(_LLAMA3_REGEX), behavior="isolated"),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    return None


# Llama 3's tokenizer.json uses a whole pre-token when it is in the vocabulary, before any merge.
IGNORE_MERGES = {"llama-bpe", "llama3", "smaug-bpe", "dbrx"}
CONTROL, USER_DEFINED = 3, 4  # gguf.TokenType values


# ---------------------------------------------------------------- metadata
def _meta(reader, key, default=KeyError):
    field = reader.fields.get(key)
    if field is None:
        if default is KeyError:
            raise MinifTError(f"{reader.path}: GGUF metadata has no {key!r}")
        return default
    return field.contents()


def _f32_repr(x):
    """A float32 metadata value as its shortest decimal (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


def hf_config(reader) -> dict:
    """config.json for LlamaForCausalLM from the GGUF's llama.* metadata."""
    path, arch = reader.path, _meta(reader, "general.architecture")
    if arch != "llama":
        raise MinifTError(f"{path}: architecture {arch!r} is not supported (only 'llama')")
    scaling = _meta(reader, "llama.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in {t.name for t in reader.tensors}:
        raise MinifTError(f"{path}: RoPE scaling ({scaling}, rope_freqs) is not supported for GGUF conversion")
    k = lambda name, default=KeyError: _meta(reader, "llama." + name, default)  # noqa: E731
    dim, n_heads = int(k("embedding_length")), int(k("attention.head_count"))
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise MinifTError(f"{path}: no token_embd.weight tensor")
    vocab_size = int(tensors["token_embd.weight"].shape[-1])  # ggml order: (dim, vocab)
    ids = {n: _meta(reader, f"tokenizer.ggml.{n}_token_id", None) for n in ("bos", "eos", "padding")}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab_size, "hidden_size": dim,
        "intermediate_size": int(k("feed_forward_length")), "num_hidden_layers": int(k("block_count")),
        "num_attention_heads": n_heads, "num_key_value_heads": int(k("attention.head_count_kv", n_heads)),
        "head_dim": int(k("attention.key_length", dim // n_heads)),
        "max_position_embeddings": int(k("context_length")),
        "rms_norm_eps": _f32_repr(k("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32_repr(k("rope.freq_base", 10000.0)), "rope_scaling": None,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensors,  # no output matrix: lm_head is the embedding
        "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["padding"],
        "torch_dtype": "float32", "use_cache": True,
    }


# ---------------------------------------------------------------- weights
def _unpermute(w, n_head, name):
    """Undo llama.cpp's reordering of the q/k projection rows.

    RoPE rotates pairs of channels inside each head. Hugging Face Llama pairs channel i with i + head_dim/2
    (`rotate_half`); ggml's llama RoPE pairs neighbours 2i and 2i+1. So llama.cpp's converter reorders each
    head's output rows from [x0..x_{d/2-1}, y0..y_{d/2-1}] to [x0, y0, x1, y1, ...]
    (reshape (n_head, 2, d/2, in) -> swap axes 1 and 2). We apply the inverse: (n_head, d/2, 2, in) -> swap.
    For k, n_head is the number of key/value heads.
    """
    rows, cols = w.shape
    assert rows % (2 * n_head) == 0, f"{name}: {rows} rows do not split into {n_head} heads of even size"
    half = rows // n_head // 2
    w = w.reshape(n_head, half, 2, cols)  # (n_head, head_dim/2, 2 = [x, y], in): interleaved pairs
    w = w.swapaxes(1, 2)  # (n_head, 2, head_dim/2, in): first halves, then second halves
    return np.ascontiguousarray(w).reshape(rows, cols)  # (n_head * head_dim, in)


def permute_qk(w, n_head, name):
    """llama.cpp's q/k row order from Hugging Face's: the inverse of _unpermute (minift/model/export.py writes it).

    Each head's rows go from [x0..x_{d/2-1}, y0..y_{d/2-1}] to [x0, y0, x1, y1, ...]; for k, n_head is the
    number of key/value heads."""
    rows, cols = w.shape
    assert rows % (2 * n_head) == 0, f"{name}: {rows} rows do not split into {n_head} heads of even size"
    w = w.reshape(n_head, 2, rows // n_head // 2, cols)  # (n_head, 2 = [x, y], head_dim/2, in): halves
    w = w.swapaxes(1, 2)  # (n_head, head_dim/2, 2, in): interleaved pairs
    return np.ascontiguousarray(w).reshape(rows, cols)  # (n_head * head_dim, in)


def expected_shapes(cfg) -> dict:
    """HF name -> shape (out, in) for every weight the config implies."""
    h, d, f = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (cfg["vocab_size"], h)
    per_layer = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
                 "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
                 "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
                 "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f)}
    for i in range(cfg["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
    return shapes


def hf_name(gguf_name, path):
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight' through TENSOR_MAP."""
    parts = gguf_name.split(".")
    layer = parts[1] if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit() else None
    key = ".".join(["blk", "{}"] + parts[2:]) if layer is not None else gguf_name
    if key not in TENSOR_MAP:
        raise MinifTError(f"{path}: tensor {gguf_name!r} has no Hugging Face Llama counterpart")
    return TENSOR_MAP[key].format(layer)


def hf_tensors(reader, cfg) -> dict:
    """Every tensor dequantized to fp32 under its HF name, q/k un-permuted, shapes checked."""
    from gguf.quants import dequantize

    path, out = reader.path, {}
    shapes = expected_shapes(cfg)
    for t in reader.tensors:
        name = hf_name(t.name, path)
        w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)  # a copy: F32 data is a read-only map
        # GGUF lists dimensions fastest-first (ggml order); numpy/torch shape is the reverse: (out, in).
        want = tuple(int(n) for n in reversed(t.shape.tolist()))
        assert w.shape == want, f"{t.name}: dequantized to {w.shape}, header says {want}"
        if name not in shapes or w.shape != shapes[name]:
            raise MinifTError(f"{path}: tensor {t.name} has shape {w.shape}, config.json implies "
                              f"{shapes.get(name, 'no such tensor')}")
        if name.endswith("q_proj.weight"):
            w = _unpermute(w, cfg["num_attention_heads"], t.name)
        elif name.endswith("k_proj.weight"):
            w = _unpermute(w, cfg["num_key_value_heads"], t.name)
        out[name] = w
    missing = sorted(set(shapes) - set(out))
    if missing:
        raise MinifTError(f"{path}: {len(missing)} tensors missing, e.g. {missing[0]}")
    return out


# ---------------------------------------------------------------- tokenizer
def build_tokenizer(reader):
    """(tokenizers.Tokenizer, tokenizer_config dict) rebuilt from the GGUF tokenizer metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    path = reader.path
    kind, pre = _meta(reader, "tokenizer.ggml.model"), _meta(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise MinifTError(f"{path}: tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    pre_tokenizer = _pre_tokenizer(pre)
    if pre_tokenizer is None:
        raise MinifTError(f"{path}: pre-tokenizer {pre!r} is not supported (smollm, starcoder, gpt-2, llama-bpe)")
    tokens = _meta(reader, "tokenizer.ggml.tokens")
    types = _meta(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ")) for m in _meta(reader, "tokenizer.ggml.merges")]
    # GGUF stores byte-level tokens already spelled in GPT-2's byte alphabet (space = 'Ġ'), as tokenizer.json.
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=pre in IGNORE_MERGES)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|> ...) are special: matched whole in text, dropped by skip_special_tokens.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED])

    name = lambda key: (lambda i: None if i is None else tokens[i])(_meta(reader, key, None))  # noqa: E731
    bos, eos = name("tokenizer.ggml.bos_token_id"), name("tokenizer.ggml.eos_token_id")
    # add_bos_token: this SmolLM2 file says False, as the HF SmolLM2-Instruct tokenizer (its chat template
    # begins with <|im_start|>); Llama 3 files say True. A file without the key: no BOS, as transformers does.
    if _meta(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, tokens.index(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
              "pad_token": name("tokenizer.ggml.padding_token_id") or eos,
              "unk_token": name("tokenizer.ggml.unknown_token_id"),
              "model_max_length": int(_meta(reader, "llama.context_length", 2048)),
              "clean_up_tokenization_spaces": False, "add_prefix_space": False}
    template = _meta(reader, "tokenizer.chat_template", None)
    if template is not None:
        config["chat_template"] = template
    return tok, {k: v for k, v in config.items() if v is not None}


# ---------------------------------------------------------------- conversion
def convert_gguf(gguf_path, out_dir) -> Path:
    """Write an HF checkpoint dir for a llama GGUF. Built in a temp dir and renamed: never left half-written."""
    import torch
    from gguf import GGUFReader
    from safetensors.torch import save_file

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise MinifTError(f"{gguf_path}: not found")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise MinifTError(f"{out_dir}: already exists and is not an empty directory")
    try:
        reader = GGUFReader(gguf_path)
    except (ValueError, OSError) as e:
        raise MinifTError(f"{gguf_path}: not a readable GGUF file ({e})") from None
    reader.path = gguf_path  # for error messages
    cfg = hf_config(reader)
    tensors = hf_tensors(reader, cfg)
    tok, tok_config = build_tokenizer(reader)
    if tok.get_vocab_size() != cfg["vocab_size"]:
        raise MinifTError(f"{gguf_path}: {tok.get_vocab_size()} tokens but vocab_size {cfg['vocab_size']}")
    gen_config = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg[k] is not None}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        save_file({k: torch.from_numpy(v) for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        tok.save(str(tmp / "tokenizer.json"))
        for name, data in (("config.json", cfg), ("tokenizer_config.json", tok_config),
                           ("generation_config.json", gen_config)):
            (tmp / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        for f in [tmp, *tmp.iterdir()]:  # mkdtemp makes the dir private; give it the usual permissions
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked above); rename needs the name free
        try:
            os.rename(tmp, out_dir)
        except OSError:
            raise MinifTError(f"{out_dir}: appeared while converting (another conversion finished first)") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return out_dir


def main(argv=None):
    import argparse
    import time

    p = argparse.ArgumentParser(prog="python -m minift.gguf",
                                description="Convert a llama GGUF into a Hugging Face checkpoint dir (fp32).")
    p.add_argument("gguf", help="input .gguf file (llama architecture, byte-level BPE vocabulary)")
    p.add_argument("out_dir", help="output directory (must not exist, or be empty)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    out = convert_gguf(args.gguf, args.out_dir)
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")

