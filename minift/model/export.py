"""Hugging Face checkpoint (+ optional LoRA adapter) -> one GGUF file that llama.cpp, Ollama and LM Studio run.

The inverse of minift/model/gguf.py, and it shares that file's knowledge: the tensor-name map (TENSOR_MAP),
the q/k row order llama.cpp's RoPE expects (permute_qk, the inverse of the reader's _unpermute) and the token
types. Writing and quantizing are the `gguf` package's (GGUFWriter, gguf.quants.quantize).

What goes in: the llama.* architecture keys (GQA head counts, rope theta, Llama 3 rope scaling as the
rope_freqs tensor llama.cpp multiplies the rotation periods by, sliding window for Mistral), every weight under
its llama.cpp name (no output.weight when the embeddings are tied: llama.cpp then reuses token_embd), and the
tokenizer (byte-level BPE vocabulary, merges, token types, BOS/EOS/pad, add_bos, the chat template), so that a
chat call in llama.cpp renders a conversation token for token as minift does.

    python -m minift.export --adapter runs/sft --out sft-q8_0.gguf --type q8_0
"""
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from minift.errors import MinifTError
from minift.model.gguf import CONTROL, TENSOR_MAP, USER_DEFINED, permute_qk

NORMAL, UNUSED = 1, 5  # gguf.TokenType values (CONTROL and USER_DEFINED come with the reader)
# --type -> (GGML tensor type, llama.cpp file type). More than the four asked for where gguf.quants has them.
TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
         "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q5_0": ("Q5_0", "MOSTLY_Q5_0"), "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
         "q4_0": ("Q4_0", "MOSTLY_Q4_0"), "q4_1": ("Q4_1", "MOSTLY_Q4_1")}
# HF name -> llama.cpp name, the reader's map turned round ({} = layer index).
TO_GGUF = {hf: gg for gg, hf in TENSOR_MAP.items()}


def gguf_name(hf):
    """'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight'."""
    parts = hf.split(".")
    if parts[:2] == ["model", "layers"]:
        return TO_GGUF[".".join(parts[:2] + ["{}"] + parts[3:])].format(parts[2])
    return TO_GGUF[hf]


# ---------------------------------------------------------------- tokenizer
def pre_tokenizer_name(pre: dict | None, path) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a tokenizer.json pre_tokenizer (the reader's _pre_tokenizer, inverted)."""
    kinds = [p["type"] for p in pre.get("pretokenizers", [])] if pre and pre["type"] == "Sequence" else \
        [pre["type"]] if pre else []
    if kinds == ["ByteLevel"]:
        return "gpt-2"  # llama.cpp's name for GPT-2's regex
    if kinds == ["Digits", "ByteLevel"] and pre["pretokenizers"][0].get("individual_digits"):
        return "smollm"  # SmolLM2 / StarCoder: every digit alone, then GPT-2's regex
    if kinds == ["Split", "ByteLevel"]:
        return "llama-bpe"  # Llama 3's split regex
    raise MinifTError(f"{path}: pre-tokenizer {kinds or None} has no llama.cpp counterpart "
                      "(supported: ByteLevel, Digits+ByteLevel, Split+ByteLevel)")


def tokenizer_fields(ckpt: Path, tok, vocab_size: int) -> dict:
    """Everything the GGUF tokenizer metadata needs, read from tokenizer.json and minift's Tokenizer."""
    path = ckpt / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec["model"]
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise MinifTError(f"{path}: only byte-level BPE tokenizers can be exported (llama.cpp 'gpt2' model)")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # rows beyond the tokenizer: unused padding tokens
    types = [UNUSED] * vocab_size
    for t, i in model["vocab"].items():
        tokens[i], types[i] = t, NORMAL
    for a in spec.get("added_tokens", []):
        if a["id"] >= vocab_size:
            raise MinifTError(f"{path}: token {a['content']!r} has id {a['id']} beyond vocab_size {vocab_size}")
        tokens[a["id"]], types[a["id"]] = a["content"], CONTROL if a.get("special") else USER_DEFINED
    if max(model["vocab"].values()) >= vocab_size:
        raise MinifTError(f"{path}: vocabulary is larger than the model's vocab_size {vocab_size}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    post = spec.get("post_processor") or {}
    # A BOS before every text: the post-processor says so (Llama 3 does; SmolLM2's chat template writes its own).
    add_bos = post.get("type") == "TemplateProcessing" and tok.bos_token is not None and \
        any(p.get("SpecialToken", {}).get("id") == tok.bos_token for p in post.get("single", []))
    return dict(tokens=tokens, types=types, merges=merges, pre=pre_tokenizer_name(spec.get("pre_tokenizer"), path),
                bos=tok.bos_id, eos=tok.eos_id, pad=tok.pad_id, add_bos=add_bos, template=tok.chat_template)


# ---------------------------------------------------------------- weights
def rope_factors(cfg):
    """Llama 3 scaling as llama.cpp takes it: one factor per rotated pair that divides the frequency.

    minift computes the scaled frequencies (rope_inv_freq); the factor is the plain frequency over the scaled
    one, so llama.cpp rotates exactly as minift does without a second copy of the scaling rule."""
    from dataclasses import replace

    from minift.model.transformer import rope_inv_freq

    plain, scaled = rope_inv_freq(replace(cfg, rope_scaling=None)), rope_inv_freq(cfg)
    return (plain.double() / scaled.double()).float().numpy()  # (head_dim/2,)


def _encode(name, w: np.ndarray, qtype, GGML):
    """(data, raw ggml type) for one tensor. Norms and other 1-D tensors stay f32, as llama.cpp keeps them; a
    matrix whose rows do not split into the type's blocks falls back to f16 (llama.cpp's converter does too)."""
    from gguf.quants import QuantError, quantize

    if w.ndim == 1 or qtype == GGML.F32:
        return w.astype(np.float32), GGML.F32
    if qtype == GGML.F16:
        return w.astype(np.float16), GGML.F16
    try:
        return quantize(w, qtype), qtype  # uint8 blocks, (rows, bytes per row)
    except QuantError:
        return w.astype(np.float16), GGML.F16


def load_merged(ckpt, adapter=None):
    """(minift model with the adapter merged into its weights, tokenizer, checkpoint dir)."""
    from minift.model.checkpoint import load
    from minift.model.fetch import default_checkpoint
    from minift.model.lora import load_adapter, merge_lora

    ckpt = Path(ckpt) if ckpt is not None else default_checkpoint()
    model, tok = load(ckpt, dtype=torch.float32)  # merge in fp32, round once when writing
    if adapter is not None:
        load_adapter(model, adapter)  # refuses an adapter whose modules or shapes do not fit this model
        merge_lora(model)
    return model, tok, ckpt


def export_gguf(ckpt_dir, out_file, type="q8_0", adapter_dir=None) -> Path:
    """Write `out_file` (.gguf) for checkpoint `ckpt_dir` (None: the embedded model) with `adapter_dir` merged.

    Written to a temporary file beside `out_file` and renamed at the end: never a partial file."""
    import gguf

    from minift.model.checkpoint import hf_state_dict

    if type not in TYPES:
        raise MinifTError(f"--type {type!r} is not supported (choose from {', '.join(TYPES)})")
    out_file = Path(out_file)
    if not out_file.parent.is_dir():
        raise MinifTError(f"--out {out_file}: folder {out_file.parent} does not exist")
    model, tok, ckpt = load_merged(ckpt_dir, adapter_dir)
    cfg = model.config
    GGML = gguf.GGMLQuantizationType
    qtype, ftype = GGML[TYPES[type][0]], gguf.LlamaFileType[TYPES[type][1]]
    fields = tokenizer_fields(ckpt, tok, cfg.vocab_size)

    fd, tmp = tempfile.mkstemp(prefix=f".{out_file.name}.partial-", dir=out_file.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, "llama")  # Mistral too: llama.cpp runs it as the llama architecture
        w.add_name(cfg.extra.get("_name_or_path") or ckpt.name)
        w.add_file_type(ftype)
        w.add_vocab_size(cfg.vocab_size)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.dim)
        w.add_block_count(cfg.n_layers)
        w.add_feed_forward_length(cfg.hidden_dim)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        if cfg.sliding_window is not None:
            w.add_sliding_window(cfg.sliding_window)
        if cfg.rope_scaling is not None:  # llama3: the rope_freqs tensor carries it; the type stays 'none'
            w.add_tensor("rope_freqs.weight", rope_factors(cfg))
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(fields["pre"])
        w.add_token_list(fields["tokens"])
        w.add_token_types(fields["types"])
        w.add_token_merges(fields["merges"])
        for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id)):
            if fields[key] is not None:
                add(fields[key])
        w.add_add_bos_token(fields["add_bos"])
        if fields["template"]:
            w.add_chat_template(fields["template"])
        for name, t in hf_state_dict(model).items():
            a = t.float().numpy()
            if name.endswith("q_proj.weight"):
                a = permute_qk(a, cfg.n_heads, name)
            elif name.endswith("k_proj.weight"):
                a = permute_qk(a, cfg.n_kv_heads, name)
            data, raw = _encode(name, a, qtype, GGML)
            w.add_tensor(gguf_name(name), data, raw_dtype=raw)  # uint8 blocks: the writer derives the shape
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out_file)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out_file


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def main(argv=None):
    import argparse
    import time

    p = argparse.ArgumentParser(prog="python -m minift.export",
                                description="Export a checkpoint (+ LoRA adapter, merged) as one GGUF file for "
                                            "llama.cpp / Ollama / LM Studio.")
    p.add_argument("--ckpt", default=None, help="HF checkpoint dir (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", default=None, help="PEFT LoRA adapter dir to merge into the weights")
    p.add_argument("--out", required=True, help="output .gguf file (its folder must exist)")
    p.add_argument("--type", default="q8_0", help=f"tensor type: {', '.join(TYPES)} (default: q8_0)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    out = export_gguf(args.ckpt, args.out, args.type, args.adapter)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.type}) in {time.perf_counter() - start:.1f} s")
