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
