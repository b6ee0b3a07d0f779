"""Generation on the embedded default model, through the command line as a user runs it."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_hf_model, save_checkpoint

from minift.checkpoint import load
from minift.generate import generate, sample_next

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
