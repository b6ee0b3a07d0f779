"""Loader: dtypes, export round trip, and named one-line errors for every kind of broken checkpoint."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import make_hf_model, save_checkpoint
from safetensors.torch import load_file, save_file

from minift.model.checkpoint import from_hf_name, load_model, save_hf, to_hf_name
from minift.model.config import ModelConfig
from minift.errors import MinifTError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_weight_map_round_trip_and_module_paths():
    assert to_hf_name("layers.3.attn.q_proj.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert to_hf_name("layers.12.mlp.down_proj") == "model.layers.12.mlp.down_proj"
    assert from_hf_name("model.layers.0.post_attention_layernorm.weight") == "layers.0.mlp_norm.weight"
    assert from_hf_name(to_hf_name("embed.weight")) == "embed.weight"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_files_load_exactly(tmp_path, dtype):
    hf = make_hf_model("llama").to(dtype)
    ckpt = save_checkpoint(hf, tmp_path / "ckpt", shard=False)
    ours = load_model(ckpt)  # CPU default: fp32 compute
    assert ours.embed.weight.dtype == torch.float32
    assert torch.equal(ours.layers[1].mlp.up_proj.weight, hf.model.layers[1].mlp.up_proj.weight.float())
    assert load_model(ckpt, dtype=dtype).norm.weight.dtype == dtype


def test_save_hf_is_read_back_by_transformers(tiny_llama, tmp_path):
    import transformers

    ckpt, hf = tiny_llama
    ours = load_model(ckpt)
    out = save_hf(ours, None, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits)


# --- broken checkpoints: each a MinifTError whose one line names the file or tensor ---------------------

@pytest.fixture
def ckpt(tiny_llama, tmp_path):
    src, _ = tiny_llama
    return shutil.copytree(src, tmp_path / "ckpt")


def first_shard(ckpt):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    return ckpt / sorted(set(index.values()))[0]


def expect_error(ckpt, *fragments):
    with pytest.raises(MinifTError) as e:
        load_model(ckpt)
    msg = str(e.value)
    assert "\n" not in msg
    for frag in fragments:
        assert frag in msg, msg
    return msg


def test_missing_directory(tmp_path):
    expect_error(tmp_path / "nope", "nope", "not found")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    expect_error(ckpt, "config.json")


def test_unknown_model_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    expect_error(ckpt, "model_type", "gpt2")


@pytest.mark.parametrize("field,value", [("attention_bias", True), ("hidden_act", "gelu"),
                                         ("rope_parameters", {"rope_type": "yarn", "factor": 4.0})])
def test_unsupported_settings_are_refused(ckpt, field, value):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg[field] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))
    expect_error(ckpt, field if field != "rope_parameters" else "yarn")


def test_missing_shard(ckpt):
    shard = first_shard(ckpt)
    shard.unlink()
    expect_error(ckpt, shard.name, "missing shard")


def test_wrong_shape_and_unexpected_tensor(ckpt):
    shard = first_shard(ckpt)
    tensors = load_file(shard)
    name = sorted(tensors)[0]
    tensors[name] = torch.zeros(3, 3)
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, shard)
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.self_attn.q_proj.bias"] = shard.name
    index_path.write_text(json.dumps(index))
    expect_error(ckpt, name, "[3, 3]", "unexpected tensor model.layers.0.self_attn.q_proj.bias")


def test_missing_tensor(ckpt):
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    index_path.write_text(json.dumps(index))
    expect_error(ckpt, "missing tensor model.layers.1.mlp.up_proj.weight")


def test_truncated_safetensors(ckpt):
    shard = first_shard(ckpt)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    expect_error(ckpt, shard.name)


def test_config_missing_field(tmp_path):
    with pytest.raises(MinifTError, match="hidden_size"):
        ModelConfig.from_hf_dict({"model_type": "llama", "vocab_size": 10})


def test_cli_prints_one_line_and_exits_nonzero(ckpt):
    (ckpt / "config.json").unlink()
    run = subprocess.run([sys.executable, "-m", "minift.generate", "--ckpt", str(ckpt), "--prompt", "hi"],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().startswith("error:") and "config.json" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
