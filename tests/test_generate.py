"""Generation on the embedded default model, through the command line as a user runs it."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_hf_model, save_checkpoint

from minift.model.checkpoint import load
from minift.eval.generate import generate, sample_next

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_default_model_knows_the_capital_of_france():
    run = subprocess.run([sys.executable, "-m", "minift.generate", "--prompt", "What is the capital of France?",
                          "--max-new-tokens", "30"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "Paris" in run.stdout


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, top_p=0.7, generator=g)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7; tokens 2 and 3 are never drawn
    assert int(sample_next(logits, 0.0)) == 0  # temperature 0 is greedy


def test_sampling_is_seeded_and_stops_at_the_stop_token(tmp_path):
    ckpt = save_checkpoint(make_hf_model("llama"), tmp_path / "ckpt", shard=False)
    model, tok = load(ckpt)
    prompt = tok.encode("the answer")
    a = generate(model, tok, [prompt], max_new_tokens=15, temperature=1.0, top_p=0.9, seed=3, stop_ids=set())
    b = generate(model, tok, [prompt], max_new_tokens=15, temperature=1.0, top_p=0.9, seed=3, stop_ids=set())
    assert a == b and len(a[0]) == 15
    stop = a[0][4]
    cut = generate(model, tok, [prompt], max_new_tokens=15, temperature=1.0, top_p=0.9, seed=3, stop_ids={stop})
    assert cut[0] == a[0][: a[0].index(stop)]


def test_checking_for_stops_every_n_tokens_changes_no_output(tiny_llama):
    # The decode loop asks the device whether all rows have stopped only every `check_every` tokens; rows that
    # stopped emit pads until then, cut off at the end. Greedy tokens must be identical for any interval,
    # with prompts of different lengths (left padding) and a stop token that ends rows at different steps.
    model, tok = load(tiny_llama[0])
    prompts = [tok.encode(t) for t in ("the answer", "in the end there was", "a", "an other thing here")]
    free = generate(model, tok, prompts, max_new_tokens=12, stop_ids=set())
    stop = free[0][3]  # a token the first row makes at step 3: it stops rows wherever it appears
    want = [row[:row.index(stop)] if stop in row else row for row in free]
    assert any(len(w) < 12 for w in want)
    calls = {}
    for every in (1, 3, 5, 16):
        chunks = []
        got = generate(model, tok, prompts, max_new_tokens=12, stop_ids={stop}, check_every=every,
                       on_tokens=lambda new: chunks.append(new.shape))
        assert got == want, every
        calls[every] = chunks
    # on_tokens sees every generated step exactly once, in chunks of check_every (the last one shorter)
    for every, chunks in calls.items():
        assert all(s[0] == len(prompts) for s in chunks)
        assert all(s[1] == every for s in chunks[:-1]) and 1 <= chunks[-1][1] <= every
    # the stream stops within one interval after every row has stopped (or at max_new_tokens)
    longest = max(len(w) + (w != free[i]) for i, w in enumerate(want))
    for every, chunks in calls.items():
        steps = sum(s[1] for s in chunks)
        assert steps == min(12, -(-longest // every) * every), (every, steps, longest)


def _reference_greedy(model, prompts, max_new_tokens, stop):
    """An independent greedy loop: each prompt alone, no cache, no padding, a full forward per step, argmax."""
    outs = []
    for p in prompts:
        ids = list(p)
        new = []
        for _ in range(max_new_tokens):
            t = int(model.lm_head(model(torch.tensor([ids]))[:, -1]).argmax(-1))
            if t in stop:
                break
            new.append(t)
            ids.append(t)
        outs.append(new)
    return outs


def _prompts_and_stop(model, tok):
    """Prompts of different lengths and a stop token that ends some rows early (taken from the reference)."""
    prompts = [tok.encode(t) for t in ("the answer", "in the end there was", "a", "an other thing here", "ok")]
    free = _reference_greedy(model, prompts, 12, set())
    return prompts, free[0][3]


@torch.no_grad()
def test_greedy_matches_a_reference_loop_with_and_without_dropping_rows(tiny_llama):
    # Left padding, the KV cache and rows leaving the batch once stopped must give the tokens each prompt gives
    # alone with a plain full forward per step. Token ids are compared exactly: argmax of fp32 logits that
    # differ by rounding only picks the same token unless two logits tie to ~1e-6, which a random model's
    # don't.
    model, tok = load(tiny_llama[0])
    model.eval()
    prompts, stop = _prompts_and_stop(model, tok)
    want = _reference_greedy(model, prompts, 12, {stop})
    assert any(len(w) < 12 for w in want) and any(len(w) == 12 for w in want)  # some rows stop early
    for every in (1, 2, 5):
        for drop in (True, False):
            got = generate(model, tok, prompts, max_new_tokens=12, stop_ids={stop}, check_every=every,
                           drop_finished=drop)
            assert got == want, (every, drop)


@torch.no_grad()
def test_num_samples_groups_k_rows_per_prompt(tiny_llama):
    model, tok = load(tiny_llama[0])
    model.eval()
    prompts, stop = _prompts_and_stop(model, tok)
    k, B = 3, len(prompts)
    # temperature 0: all k rows of a group are the greedy answer of their prompt
    greedy = _reference_greedy(model, prompts, 12, {stop})
    got = generate(model, tok, prompts, max_new_tokens=12, stop_ids={stop}, num_samples=k)
    assert got == [g for g in greedy for _ in range(k)]
    # sampling: one prefill + k copies draws exactly what k copies of each prompt draw (the same uniforms per
    # row index), whatever rows drop out and however often the loop checks
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=7, stop_ids={stop})
    shared = generate(model, tok, prompts, num_samples=k, **kw)
    copies = generate(model, tok, [p for p in prompts for _ in range(k)], **kw)
    assert shared == copies
    assert generate(model, tok, prompts, num_samples=k, check_every=4, drop_finished=False, **kw) == shared
    assert generate(model, tok, prompts, num_samples=k, **kw) == shared  # fixed seed: reproducible
    assert len(shared) == B * k
    # each sampled row continues its own prompt: with a small nucleus (top_p 0.3), every token of row j must
    # lie in the nucleus that a full forward of prompt j // k + the row's earlier tokens gives (a row decoded
    # from another prompt's cache rows would leave it)
    narrow = generate(model, tok, prompts, num_samples=k, **dict(kw, top_p=0.3))
    for j, row in enumerate(narrow):
        ids = list(prompts[j // k])
        for t in row:
            p = torch.softmax(model.lm_head(model(torch.tensor([ids]))[0, -1]), -1)
            before = p[p > p[t]].sum()  # mass of the tokens more likely than t
            assert before < 0.3 + 1e-4, (j, t)  # 1e-4: fp32 rounding of the cumulative sum
            ids.append(t)
    assert generate(model, tok, prompts, num_samples=k, **dict(kw, seed=8)) != shared  # the seed matters
    for g in range(B):
        group = shared[g * k:(g + 1) * k]
        assert all(stop not in row for row in group)
        assert len({tuple(r) for r in group}) > 1  # k samples of one prompt are not one answer repeated
