"""GGUF export (minift/model/export.py): read back by minift's own reader, by transformers' GGUF loader and,
when installed, by llama.cpp itself (llama-cpp-python); bad input is one error line and leaves no file."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_hf_model, save_checkpoint
from minift import cli
from minift.model import lora
from minift.model.checkpoint import load_model
from minift.model.export import export_gguf
from minift.model.gguf import convert_gguf

IDS = torch.tensor([[5, 17, 260, 99, 3, 255, 42, 7, 262, 120, 64, 33]])  # (1, 12) byte tokens and specials


def logits(model, ids=IDS):
    with torch.no_grad():
        return model.lm_head(model(ids)).float()  # (1, T, vocab)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """A Llama with its own output matrix and a non-default rope theta (both must reach the file)."""
    model = make_hf_model("llama", tie_word_embeddings=False, rope_theta=50000.0)
    return save_checkpoint(model, tmp_path_factory.mktemp("untied"), shard=False)


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory):
    """A nonzero LoRA adapter on every linear layer of tiny_llama (B starts at zero: randomise it)."""
    model = load_model(tiny_llama[0])
    torch.manual_seed(0)
    lora.apply_lora(model, "all-linear", r=4, alpha=8)
    with torch.no_grad():
        for _, m in lora.lora_modules(model):
            m.lora_B["default"].weight.normal_(0, 0.05)
    return lora.save_adapter(model, tmp_path_factory.mktemp("adapter") / "a"), model


# Tolerance 1e-4 (relative to the largest logit): the f32 export only moves values (q/k rows permuted, names
# changed), so the weights come back bit for bit; what may differ is the summation order of the readers'
# matmuls and attention (fp32 rounding ~1e-7 per op, a few hundred ops deep): far below 1e-4, while a wrong
# permutation, norm or head count gives errors of order 1.
@pytest.mark.parametrize("which", ["tied", "untied"])
def test_f32_round_trip_minift_and_transformers(which, tiny_llama, untied, tmp_path):
    import transformers

    ckpt = tiny_llama[0] if which == "tied" else untied
    out = export_gguf(ckpt, tmp_path / "m.gguf", "f32")
    ref = logits(load_model(ckpt))
    back = convert_gguf(out, tmp_path / "back")
    assert rel(logits(load_model(back)), ref) < 1e-4
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel(hf(IDS).logits, ref) < 1e-4
    cfg = json.loads((back / "config.json").read_text())
    assert cfg["tie_word_embeddings"] == (which == "tied") and cfg["num_key_value_heads"] == 2
    assert cfg["rope_theta"] == (10000.0 if which == "tied" else 50000.0)


def test_f16_round_trip_is_the_model_with_f16_weights(tiny_llama, tmp_path):
    """An independent reference: minift's own model with every matrix rounded to f16 (norms stay f32)."""
    ckpt = tiny_llama[0]
    back = convert_gguf(export_gguf(ckpt, tmp_path / "m.gguf", "f16"), tmp_path / "back")
    model = load_model(ckpt)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())
    # Same weights exactly, so only summation order differs (as above); the unrounded model is ~1e-3 away.
    assert rel(logits(load_model(back)), logits(model)) < 1e-4


def test_adapter_is_merged(tiny_llama, adapter, tmp_path):
    path, with_adapter = adapter
    back = convert_gguf(export_gguf(tiny_llama[0], tmp_path / "m.gguf", "f32", path), tmp_path / "back")
    ref = logits(with_adapter)  # the adapter computed as a side branch: an independent path from the merge
    assert rel(logits(load_model(back)), ref) < 1e-4
    assert rel(logits(load_model(tiny_llama[0])), ref) > 1e-2  # the adapter does change the model


def test_q8_0_types_and_closeness(tiny_llama, tmp_path):
    from gguf import GGMLQuantizationType as T, GGUFReader

    out = export_gguf(tiny_llama[0], tmp_path / "m.gguf", "q8_0")
    types = {t.name: t.tensor_type for t in GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == T.Q8_0 and types["token_embd.weight"] == T.Q8_0
    assert types["blk.0.attn_norm.weight"] == T.F32 and "output.weight" not in types  # tied: no output matrix
    back = convert_gguf(out, tmp_path / "back")
    # 8-bit blocks: each weight within half a step of 1/127 of its block's largest; logits move by ~1e-2.
    assert rel(logits(load_model(back)), logits(load_model(tiny_llama[0]))) < 5e-2


def test_tokenizer_and_chat_template_metadata(tiny_llama, tmp_path):
    from gguf import GGUFReader

    from minift.model.tokenizer import Tokenizer

    ckpt = tiny_llama[0]
    r = GGUFReader(export_gguf(ckpt, tmp_path / "m.gguf", "f16"))
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tok = Tokenizer.from_dir(ckpt)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.chat_template"] == tok.chat_template
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (tok.bos_id, tok.eos_id)
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert len(meta["tokenizer.ggml.tokens"]) == 300  # padded to the embedding rows
    assert meta["llama.attention.head_count_kv"] == 2 and meta["llama.attention.head_count"] == 4
    # The tokenizer minift rebuilds from the file encodes a chat exactly as the original.
    back = Tokenizer.from_dir(convert_gguf(tmp_path / "m.gguf", tmp_path / "back"))
    chat = [{"role": "user", "content": "the 12 thin men ran in"}]
    assert back.encode_chat(chat, add_generation_prompt=True) == tok.encode_chat(chat, add_generation_prompt=True)


def test_llama3_rope_scaling_and_sliding_window(tmp_path):
    """rope_freqs holds llama.cpp's per-pair divisor, checked against Llama 3.1's rule written out here."""
    import math

    from gguf import GGUFReader

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    ckpt = save_checkpoint(make_hf_model("llama", rope_scaling=scaling, rope_theta=500000.0), tmp_path / "l3")
    r = GGUFReader(export_gguf(ckpt, tmp_path / "l3.gguf", "f32"))
    got = np.array(next(t for t in r.tensors if t.name == "rope_freqs.weight").data)
    d, want = 16, []
    for i in range(0, d, 2):
        wavelen = 2 * math.pi * 500000.0 ** (i / d)
        if wavelen < 64 / 4.0:
            want.append(1.0)
        elif wavelen > 64 / 1.0:
            want.append(8.0)
        else:
            smooth = (64 / wavelen - 1.0) / (4.0 - 1.0)
            want.append(1 / ((1 - smooth) / 8.0 + smooth))
    np.testing.assert_allclose(got, want, rtol=1e-6)  # fp32 storage of the same numbers

    ckpt = save_checkpoint(make_hf_model("mistral", sliding_window=8), tmp_path / "mistral")
    r = GGUFReader(export_gguf(ckpt, tmp_path / "m.gguf", "f32"))
    assert r.fields["llama.attention.sliding_window"].contents() == 8


@pytest.fixture(scope="module")
def other_adapter(tmp_path_factory):
    """An adapter trained for a model of another width: its shapes cannot fit tiny_llama."""
    d = tmp_path_factory.mktemp("other")
    model = load_model(save_checkpoint(make_hf_model("llama", hidden_size=32, intermediate_size=64), d / "ckpt"))
    lora.apply_lora(model, "all-linear", r=4, alpha=8)
    return lora.save_adapter(model, d / "adapter")


@pytest.fixture(scope="module")
def gpt2_ckpt(tiny_llama, tmp_path_factory):
    import shutil

    d = tmp_path_factory.mktemp("gpt2") / "ckpt"
    shutil.copytree(tiny_llama[0], d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    return d


@pytest.mark.parametrize("argv,words", [
    ("--ckpt {ckpt} --adapter {other} --out {out}/m.gguf", "has shape"),
    ("--ckpt {ckpt} --type q3_x --out {out}/m.gguf", "--type 'q3_x' is not supported"),
    ("--ckpt {gpt2} --out {out}/m.gguf", "unsupported model_type 'gpt2'"),
    ("--ckpt {ckpt} --out {out}/missing/m.gguf", "does not exist"),
])
def test_bad_input_is_one_error_line_and_no_file(argv, words, tiny_llama, other_adapter, gpt2_ckpt, tmp_path,
                                                 capsys):
    argv = argv.format(ckpt=tiny_llama[0], other=other_adapter, gpt2=gpt2_ckpt, out=tmp_path).split()
    with pytest.raises(SystemExit) as exit_:
        cli.export(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert list(tmp_path.iterdir()) == []  # no partial (or temporary) file left behind


def test_llama_cpp_runs_the_export(tiny_llama, tmp_path):
    """llama.cpp's own forward pass and chat formatting on the exported file."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install -e .[llama])")
    from minift.model.tokenizer import Tokenizer

    ckpt = tiny_llama[0]
    llm = llama_cpp.Llama(model_path=str(export_gguf(ckpt, tmp_path / "m.gguf", "f32")), n_ctx=64,
                          logits_all=True, n_threads=1, verbose=False)
    llm.eval(IDS[0].tolist())
    got = torch.tensor(np.array(llm.scores[:IDS.shape[1]]))  # (T, vocab)
    # ggml's kernels sum in another order and its softmax/exp differ in the last bits: 1e-3 still catches a
    # wrong permutation or norm (errors of order 1).
    assert rel(got, logits(load_model(ckpt))[0]) < 1e-3
    tok = Tokenizer.from_dir(ckpt)
    chat = [{"role": "user", "content": "the thin men"}]
    text = tok.apply_chat_template(chat, add_generation_prompt=True)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode_chat(chat, add_generation_prompt=True)


@pytest.mark.slow  # a whole (tiny) study with two arms, each exported
def test_the_study_exports_each_trained_arm(tiny_llama, tiny_data, tmp_path):
    """--export f32: a GGUF per arm in OUT/.../<arm>_gguf/, equal to the base with that arm's adapter applied
    as a side branch (an independent path from the merge); a rerun skips the export phases."""
    from minift.study.run import main

    ckpt, out = tiny_llama[0], tmp_path / "study"
    argv = ["--ckpt", str(ckpt), "--out", str(out), "--limit", "1", "--max-new-tokens", "2", "--export", "f32",
            "--sft.data", str(tiny_data / "sft.jsonl"), "--dpo.data", str(tiny_data / "dpo.jsonl"),
            "--test-data", str(tiny_data / "test.jsonl"), "--sft.max-steps", "2", "--dpo.max-steps", "2",
            "--sft.eval-every", "0", "--dpo.eval-every", "0", "--sft.batch-size", "2", "--dpo.batch-size", "2"]
    main(argv)
    seed = out / ckpt.name / "clinical" / "seed0"
    for arm in ("sft", "dpo"):
        gguf = seed / f"{arm}_gguf" / f"{arm}-f32.gguf"
        model = load_model(ckpt)
        lora.load_adapter(model, str(seed / arm))
        model.eval()  # (no LoRA dropout)
        back = convert_gguf(gguf, tmp_path / f"back_{arm}")
        assert rel(logits(load_model(back)), logits(model)) < 1e-4  # fp32 sums in another order: ~1e-6
    report = json.loads((out / "report.json").read_text())
    arms = report["models"][ckpt.name]["units"]["clinical"]["seeds"]["0"]
    assert Path(arms["dpo"]["gguf"]).name == "dpo-f32.gguf"
    main(argv)
    log = (out / "study.log").read_text().splitlines()
    assert sum("[skip] dpo gguf" in x for x in log) == 1 and not any("[run] dpo gguf" in x for x in log[-12:])
