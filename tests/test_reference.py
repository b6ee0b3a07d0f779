"""Reference log-probs: on-the-fly strategies, and the cache (equal to on-the-fly, reused, invalidated when the
data, tokenizer, truncation settings or reference weights change)."""
import json
import shutil

import pytest
import torch

from minift.train import batching, data, losses

from minift.model import lora
from minift.model.checkpoint import load_model
from minift.errors import MinifTError
from minift.train.reference import CACHE_FILE, Reference, key_parts
from minift.model.tokenizer import Tokenizer

ROWS = [("What is the dose?", "Five milligrams daily.", "Take as much as you like."),
        ("Is the rash serious?", "See a doctor if it spreads.", "Ignore it."),
        ("Can I drink with this drug?", "Better not: it interacts.", "Sure, no problem."),
        ("How long does the fever last?", "Usually two to three days.", "Forever.")]
LAYOUT = "concat"


def write_rows(path, rows):
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in rows))
    return path


@pytest.fixture
def env(tiny_llama, tmp_path):
    ckpt, _ = tiny_llama
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    for f in ckpt.glob("tokenizer*"):
        shutil.copy(f, tok_dir / f.name)
    model = load_model(ckpt)
    lora.apply_lora(model, "all-linear", r=4, alpha=8, dropout=0.5)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, m in lora.lora_modules(model):
            w = m.lora_B["default"].weight
            w.copy_(0.1 * torch.randn(w.shape, generator=g))  # policy != base
    return dict(model=model, tok_dir=tok_dir, data=write_rows(tmp_path / "pairs.jsonl", ROWS), out=tmp_path / "out")


def load_pairs(env, max_length=64):
    return data.read_preferences(env["data"], Tokenizer.from_dir(env["tok_dir"]), max_length=max_length)


def at(batch, index):
    """The batch with its pairs' rows in the data set (what a cached lookup reads)."""
    batch.index = list(index)
    return batch


def batches(pairs, bs=3):
    """Batches over the whole set, in micro-batches of bs pairs, each with its pairs' indices."""
    return lambda: [at(batching.dpo_batch(pairs[i:i + bs], LAYOUT), range(i, min(i + bs, len(pairs))))
                    for i in range(0, len(pairs), bs)]


def cached(env, pairs, max_length=64, **kw):
    logs = []
    ref = Reference("cached", env["model"], out_dir=env["out"], log=logs.append,
                    key_parts=key_parts(env["data"], env["tok_dir"], max_length=max_length), **kw)
    status = ref.prepare(batches(pairs), len(pairs))
    return ref, status, logs


def must_not_run():
    raise AssertionError("the cache should have been reused, not recomputed")


def test_cached_equals_on_the_fly_and_is_reused(env):
    pairs = load_pairs(env)
    ref, status, logs = cached(env, pairs)
    assert status == "computed" and (env["out"] / CACHE_FILE).is_file()
    live = Reference("adapters-off", env["model"])
    for i in range(len(pairs)):  # other micro-batch shapes than the precompute pass used: fp32 rounding only
        idx = [i, (i + 1) % len(pairs)]
        batch = batching.dpo_batch([pairs[j] for j in idx], LAYOUT)
        torch.testing.assert_close(ref.logps(at(batch, idx)), live.logps(batch), rtol=1e-5, atol=1e-5)
    # the adapters-off reference is the base model, not the policy
    batch = batching.dpo_batch(pairs[:2], LAYOUT)
    assert (losses.sequence_logps(env["model"], batch).logps - live.logps(batch)).abs().max() > 1e-3

    again = Reference("cached", env["model"], out_dir=env["out"], log=logs.append,
                      key_parts=key_parts(env["data"], env["tok_dir"], max_length=64))
    assert again.prepare(must_not_run, len(pairs)) == "reused"
    assert "reusing" in logs[-1]
    torch.testing.assert_close(again.logps(at(batch, [0, 1])), ref.logps(at(batch, [0, 1])), rtol=0, atol=0)


def change_data(env):
    write_rows(env["data"], ROWS[:2] + [(ROWS[2][0], "Better not.", ROWS[2][2])] + ROWS[3:])


def change_tokenizer(env):
    cfg = env["tok_dir"] / "tokenizer_config.json"
    cfg.write_text(cfg.read_text().replace("<|im_start|>' + message['role']", "<|im_start|>' + message['role'] + ''"))


def change_base_weight(env):
    with torch.no_grad():
        env["model"].layers[0].mlp.up_proj.weight[0, 0] += 1e-3


@pytest.mark.parametrize("change", [change_data, change_tokenizer, change_base_weight, "max_length"])
def test_stale_cache_is_detected_and_recomputed(env, change):
    pairs = load_pairs(env)
    first, status, _ = cached(env, pairs)
    assert status == "computed"
    max_length = 64
    if change == "max_length":
        max_length = 63
    else:
        change(env)
    pairs = load_pairs(env, max_length)
    ref, status, logs = cached(env, pairs, max_length=max_length)
    assert status == "recomputed (stale)"
    assert any("stale" in line for line in logs)
    live = Reference("adapters-off", env["model"])
    batch = batching.dpo_batch(pairs, LAYOUT)
    idx = list(range(len(pairs)))
    torch.testing.assert_close(ref.logps(at(batch, idx)), live.logps(batch), rtol=1e-5, atol=1e-5)
    if change in (change_data, change_base_weight):  # the numbers themselves changed, and were not reused
        assert not torch.equal(ref.logps(at(batch, idx)), first.logps(at(batch, idx)))
    # the rewritten file now carries the new key
    assert cached(env, pairs, max_length=max_length)[1] == "reused"


def test_adapter_source_keys_on_the_reference_copy(env):
    model = env["model"]
    lora.add_adapter_copy(model, "default", "reference")
    pairs = load_pairs(env)
    ref, status, _ = cached(env, pairs)
    assert status == "computed" and ref.source == "adapter"
    with torch.no_grad():  # training moves the policy adapter: the reference (and the cache) must not change
        for _, m in lora.lora_modules(model, "default"):
            m.lora_B["default"].weight.add_(0.05)
    assert cached(env, pairs)[1] == "reused"
    with torch.no_grad():  # a different reference adapter: stale
        m = lora.lora_modules(model, "reference")[0][1]
        m.lora_A["reference"].weight[0, 0] += 1e-3
    assert cached(env, pairs)[1] == "recomputed (stale)"


def test_adapter_reference_is_the_frozen_copy_in_eval_mode(env):
    model = env["model"]
    pairs = load_pairs(env)
    batch = batching.dpo_batch(pairs[:2], LAYOUT)
    model.eval()
    with torch.no_grad():
        start = losses.sequence_logps(model, batch).logps  # the starting adapter, no dropout
    lora.add_adapter_copy(model, "default", "reference")
    with torch.no_grad():
        for _, m in lora.lora_modules(model, "default"):
            m.lora_B["default"].weight.mul_(2.0)  # the policy moves on
    model.train()  # dropout 0.5 on the LoRA branch while training
    ref = Reference("adapter", model)
    a, b = ref.logps(batch), ref.logps(batch)
    assert model.training  # the mode is restored
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # no dropout in the reference pass
    torch.testing.assert_close(a, start, rtol=1e-5, atol=1e-5)
    assert not a.requires_grad


def test_bad_use(env):
    model = env["model"]
    with pytest.raises(MinifTError, match="needs a frozen adapter named 'reference'"):
        Reference("adapter", model)
    with pytest.raises(MinifTError, match="needs an output dir"):
        Reference("cached", model)
    with pytest.raises(MinifTError, match="strategy must be one of"):
        Reference("policy", model)
    pairs = load_pairs(env)
    ref = Reference("cached", model, out_dir=env["out"], key_parts={})
    batch = batching.dpo_batch(pairs[:2], LAYOUT)
    with pytest.raises(MinifTError, match="call prepare"):
        ref.logps(at(batch, [0, 1]))
    ref.prepare(batches(pairs), len(pairs))
    with pytest.raises(MinifTError, match=r"the batch has no \.index"):
        ref.logps(batching.dpo_batch(pairs[:2], LAYOUT))
    with pytest.raises(MinifTError, match="no log-probs"):  # a pass that skipped an example
        Reference("cached", model, out_dir=env["out"] / "x").prepare(batches(pairs[:2]), len(pairs))
