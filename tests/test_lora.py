"""LoRA: parity with PEFT both ways (plain and rsLoRA), merged export read by transformers, the base switch
used as the DPO reference, frozen base under AdamW, dropout, two adapters, and refused PEFT options."""
import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from minift.model.checkpoint import load_model
from minift.errors import MinifTError
from minift.model.lora import (LoRALinear, adapters_disabled, add_adapter_copy, apply_lora, load_adapter, lora_modules,
                         lora_summary, merge_lora, save_adapter, save_merged, unmerge_lora, use_adapter)

IDS = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(1))


def logits(model, ids=IDS):
    return model.lm_head(model(ids))


def randomise(model, name="default", seed=0, std=0.3):
    """B starts at zero (adapter = identity); give A and B random values so that the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model, name):
            for w in (m.lora_A[name].weight, m.lora_B[name].weight):
                w.copy_(std * torch.randn(w.shape, generator=g))


@pytest.fixture
def base(tiny_llama):
    return load_model(tiny_llama[0])


@pytest.fixture
def lora(base):
    apply_lora(base, "all-linear", r=4, alpha=8)
    randomise(base)
    return base


# --- PEFT parity --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rslora", [False, True])
def test_minift_adapter_loads_in_peft(tiny_llama, base, tmp_path, rslora):
    from peft import PeftModel

    ckpt, hf = tiny_llama
    apply_lora(base, ["q_proj", "v_proj", "down_proj"], r=4, alpha=16, dropout=0.1, rslora=rslora)
    randomise(base)
    save_adapter(base, tmp_path / "adapter", base_model_name_or_path=str(ckpt))
    peft = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "adapter").eval()
    assert peft.peft_config["default"].use_rslora == rslora
    with torch.no_grad():
        ours = logits(base.eval())
        # fp32 on both sides, same operations in a different order: a few ulps apart (assert_close fp32 defaults)
        torch.testing.assert_close(ours, peft(IDS).logits)
        assert not torch.allclose(ours, hf(IDS).logits, atol=1e-3)  # the adapter does change the output


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_loads_in_minift(tiny_llama, base, tmp_path, rslora):
    from peft import LoraConfig, get_peft_model

    _, hf = tiny_llama
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"],
                        use_rslora=rslora, task_type="CAUSAL_LM")
    peft = get_peft_model(copy.deepcopy(hf), config).eval()
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    peft.save_pretrained(tmp_path / "adapter")
    load_adapter(base, tmp_path / "adapter")
    assert len(lora_modules(base)) == 4 * base.config.n_layers
    assert not any(p.requires_grad for p in base.parameters())  # loaded frozen unless asked otherwise
    scale = 16 / math.sqrt(8) if rslora else 16 / 8
    assert lora_modules(base)[0][1].scaling["default"] == pytest.approx(scale)
    with torch.no_grad():
        torch.testing.assert_close(logits(base), peft(IDS).logits)


def test_saved_config_and_keys_follow_peft(lora, tmp_path):
    out = save_adapter(lora, tmp_path / "a", base_model_name_or_path="some/model")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"], cfg["base_model_name_or_path"]) == (4, 8, False, "some/model")
    assert cfg["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    keys = load_file(out / "adapter_model.safetensors")
    assert len(keys) == 2 * 7 * lora.config.n_layers
    assert keys["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert keys["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (64, 4)


# --- merge and merged export --------------------------------------------------------------------------------

def test_save_merged_is_read_by_transformers_and_unmerge_restores(lora, tmp_path):
    import transformers

    before = {n: p.detach().clone() for n, p in lora.named_parameters() if "lora_" not in n}
    with torch.no_grad():
        want = logits(lora)
    out = save_merged(lora, None, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, want)
    after = dict(lora.named_parameters())
    assert all(torch.equal(after[n], w) for n, w in before.items())  # export restores the weights bit for bit
    assert lora_modules(lora)[0][1].merged is None
    merge_lora(lora)  # merged in memory: the same function, branch skipped
    with torch.no_grad():
        torch.testing.assert_close(logits(lora), want)
    with pytest.raises(MinifTError, match="merged"):
        with adapters_disabled(lora):
            pass
    unmerge_lora(lora)
    for n, w in before.items():  # (w + d) - d in fp32: within a few fp32 ulps of w (|w| < 1 here)
        torch.testing.assert_close(after[n], w, rtol=0, atol=1e-6)


def test_save_merged_restores_bf16_weights_exactly(tiny_llama, tmp_path):
    model = load_model(tiny_llama[0], dtype=torch.bfloat16)
    apply_lora(model, "all-linear", r=4, alpha=8)
    randomise(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    out = save_merged(model, None, tmp_path / "merged")
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], w) for n, w in before.items())
    merged = load_file(out / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    m = model.layers[0].attn.q_proj
    want = (m.weight.float() + m.delta("default")).to(torch.bfloat16)  # merged in fp32, stored in bf16
    assert merged.dtype == torch.bfloat16 and torch.equal(merged, want)


# --- the base switch, frozen base, optimizer ----------------------------------------------------------------

def test_adapters_disabled_is_exactly_the_base(base):
    with torch.no_grad():
        want = logits(base)
    apply_lora(base, "all-linear", r=4, alpha=8)
    randomise(base)
    with torch.no_grad():
        for _, m in lora_modules(base):  # a multiply-by-zero would turn NaN factors into NaN outputs
            m.lora_A["default"].weight.fill_(float("nan"))
        with adapters_disabled(base):
            assert torch.equal(logits(base), want)
        assert torch.isnan(logits(base)).all()  # switched back on when the context ends


def test_only_lora_trains_and_adamw_leaves_base_bit_identical(lora):
    assert {n for n, p in lora.named_parameters() if p.requires_grad} == \
        {n for n, _ in lora.named_parameters() if "lora_" in n}
    base = {n: p.detach().clone() for n, p in lora.named_parameters() if "lora_" not in n}
    adapter = {n: p.detach().clone() for n, p in lora.named_parameters() if "lora_" in n}
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    lora.train()
    logits(lora).logsumexp(-1).mean().backward()
    assert all(p.grad is None for n, p in lora.named_parameters() if "lora_" not in n)  # none allocated
    opt.step()
    params = dict(lora.named_parameters())
    assert all(torch.equal(params[n], w) for n, w in base.items())
    assert all(not torch.equal(params[n], w) for n, w in adapter.items())


def test_summary_counts_tied_weights_once(base):
    total = sum(p.numel() for p in base.parameters())
    apply_lora(base, ["q_proj"], r=2, alpha=2)
    n_lora = base.config.n_layers * 2 * (64 + 64)  # A (2 x 64) + B (64 x 2) per layer
    assert lora_summary(base) == (f"trainable params: {n_lora:,} || all params: {total + n_lora:,} || "
                                  f"trainable%: {100 * n_lora / (total + n_lora):.4f}")
    assert base.config.tie_embeddings and base.lm_head.weight is base.embed.weight


# --- scaling, dropout, targets ------------------------------------------------------------------------------

@pytest.mark.parametrize("rslora", [False, True])
def test_layer_output_matches_fp64_formula(rslora):
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 10, bias=False)
    m = LoRALinear(lin)
    m.add_adapter("default", r=4, alpha=6, rslora=rslora)
    torch.nn.init.normal_(m.lora_B["default"].weight)
    assert m.scaling["default"] == (6 / 2 if rslora else 6 / 4)
    x = torch.randn(3, 12)
    A, B = m.lora_A["default"].weight.double(), m.lora_B["default"].weight.double()
    want = x.double() @ lin.weight.double().T + m.scaling["default"] * (x.double() @ A.T @ B.T)
    torch.testing.assert_close(m(x).double(), want, rtol=1e-5, atol=1e-5)  # fp32 vs fp64: ~1e-6 here
    assert m.weight is lin.weight


def test_dropout_only_on_the_lora_branch_and_only_in_train_mode(base):
    apply_lora(base, "all-linear", r=4, alpha=8, dropout=0.5)
    with torch.no_grad():
        base.train()
        zero_b = logits(base)  # B = 0: dropout on the branch must not touch the base path
        base.eval()
        torch.testing.assert_close(zero_b, logits(base), rtol=0, atol=0)
        randomise(base)
        a, b = logits(base), logits(base)
        assert torch.equal(a, b)  # eval: deterministic
        base.train()
        c, d = logits(base), logits(base)
        assert not torch.allclose(c, a) and not torch.allclose(c, d)


def test_targets_all_linear_vs_list_and_unknown(base):
    paths = apply_lora(copy.deepcopy(base), "all-linear", r=2, alpha=2)
    assert len(paths) == 7 * base.config.n_layers and "lm_head" not in paths
    paths = apply_lora(base, ["v_proj", "q_proj"], r=2, alpha=2)
    assert paths == ["layers.0.attn.q_proj", "layers.0.attn.v_proj", "layers.1.attn.q_proj", "layers.1.attn.v_proj"]
    for bad in (["lm_head"], ["qkv_proj"], []):
        with pytest.raises(MinifTError, match="target"):
            apply_lora(base, bad, r=2, alpha=2, name="other")
    assert "layers.0.attn.q_proj.weight" in base.state_dict()  # base names unchanged by wrapping


# --- two adapters (DPO after SFT) ---------------------------------------------------------------------------

def test_reference_copy_and_gradients_only_into_default(lora):
    with torch.no_grad():
        sft = logits(lora)
    add_adapter_copy(lora, "default", "reference")
    randomise(lora, "default", seed=5)  # the policy moves away from its SFT start
    with torch.no_grad():
        policy = logits(lora)
        with use_adapter(lora, "reference"):
            assert torch.equal(logits(lora), sft)
    assert not torch.allclose(policy, sft)
    with use_adapter(lora, "reference"):
        ref = logits(lora)
    (logits(lora).logsumexp(-1).mean() + ref.logsumexp(-1).mean()).backward()
    for n, p in lora.named_parameters():
        if ".default." in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None and not p.requires_grad, n


def test_adapter_round_trip_into_a_named_slot(lora, tiny_llama, tmp_path):
    save_adapter(lora, tmp_path / "sft")
    with torch.no_grad():
        want = logits(lora)
    other = load_model(tiny_llama[0])
    apply_lora(other, "all-linear", r=4, alpha=8)  # a fresh trainable policy ...
    load_adapter(other, tmp_path / "sft", name="reference")  # ... plus the loaded SFT adapter, frozen
    assert not any(p.requires_grad for n, p in other.named_parameters() if ".reference." in n)
    with torch.no_grad(), use_adapter(other, "reference"):
        assert torch.equal(logits(other), want)
    resumed = load_adapter(load_model(tiny_llama[0]), tmp_path / "sft", trainable=True)  # DPO --adapter start
    assert {n for n, p in resumed.named_parameters() if p.requires_grad} == \
        {n for n, _ in resumed.named_parameters() if "lora_" in n}


# --- refused options and broken adapter dirs ----------------------------------------------------------------

@pytest.fixture
def adapter_dir(tiny_llama, tmp_path):
    model = load_model(tiny_llama[0])  # not `base`: the tests load into a model without adapters
    apply_lora(model, "all-linear", r=4, alpha=8)
    return save_adapter(model, tmp_path / "adapter")


def edit_config(d, **changes):
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def expect_error(model, d, *fragments):
    with pytest.raises(MinifTError) as e:
        load_adapter(model, d)
    msg = str(e.value)
    assert "\n" not in msg and all(f in msg for f in fragments), msg


@pytest.mark.parametrize("option,value", [
    ("use_dora", True), ("bias", "all"), ("modules_to_save", ["lm_head"]), ("rank_pattern", {"q_proj": 8}),
    ("alpha_pattern", {"q_proj": 4}), ("target_modules", ["q_proj", "embed_tokens"]), ("layers_to_transform", [0]),
    ("fan_in_fan_out", True), ("init_lora_weights", "loftq"), ("target_modules", ".*q_proj"), ("peft_type", "IA3"),
    ("lora_bias", True)])
def test_unsupported_peft_options_are_refused(base, adapter_dir, option, value):
    edit_config(adapter_dir, **{option: value})
    expect_error(base, adapter_dir, option, "adapter_config.json")
    assert not lora_modules(base)  # nothing applied on refusal


@pytest.mark.parametrize("missing", ["adapter_config.json", "adapter_model.safetensors"])
def test_missing_files(base, adapter_dir, missing):
    (adapter_dir / missing).unlink()
    expect_error(base, adapter_dir, missing, "not found")


def test_missing_unexpected_and_misshapen_tensors(base, adapter_dir):
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    del tensors["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"]
    tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(3, 64)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(64)  # DoRA
    save_file(tensors, path)
    expect_error(base, adapter_dir, "adapter_model.safetensors",
                 "missing tensor base_model.model.model.layers.1.mlp.up_proj.lora_B.weight",
                 "unexpected tensor base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
                 "self_attn.k_proj.lora_A.weight has shape [3, 64]")
    assert not lora_modules(base)


def test_truncated_safetensors(base, adapter_dir):
    path = adapter_dir / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    expect_error(base, adapter_dir, "adapter_model.safetensors")
