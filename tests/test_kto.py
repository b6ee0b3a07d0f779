"""KTO's unpaired data: the reader (labelled rows or preference pairs), its one-line errors, the KL sequences and
the batch. The tiny byte-level tokenizer with a ChatML template (conftest) keeps these fast."""
import json

import pytest
from conftest import write_byte_tokenizer

from minift.train.data import read_preferences, read_sft
from minift.errors import MinifTError
from minift.model.tokenizer import Tokenizer
from minift.train.unpaired import KTOExample, assign_kl, kto_batch, read_unpaired, split_unpaired


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_byte_tokenizer(d)
    return Tokenizer.from_dir(d)


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def row(prompt, completion, label):
    return {"prompt": prompt, "completion": completion, "label": label}


ROWS = [row("Q: the dose?", " ten mg", True), row("Q: the dose?", " a lot", False),
        row("Q: how often?", " twice daily", True), row("Q: when?", " now", False)]


def test_unpaired_rows_tokenize_like_sft(tmp_path, tok):
    """prompt + completion tokens equal the SFT reader's for the same fields; labels kept; extra fields in meta."""
    rows = [dict(r, id=i) for i, r in enumerate(ROWS)]
    exs = read_unpaired(write(tmp_path / "kto.jsonl", rows), tok)
    sft = read_sft(write(tmp_path / "sft.jsonl", [{"prompt": r["prompt"], "completion": r["completion"]}
                                                   for r in rows]), tok)
    assert [e.desirable for e in exs] == [True, False, True, False]
    for e, s in zip(exs, sft):
        assert e.prompt_ids + e.completion_ids == s.ids
        assert len(e.completion_ids) == s.n_targets
    assert [e.meta["id"] for e in exs] == [0, 1, 2, 3]
    assert exs[2].where.endswith("kto.jsonl:3")


def test_conversational_rows(tmp_path, tok):
    u = [{"role": "user", "content": "what is the dose?"}]
    exs = read_unpaired(write(tmp_path / "c.jsonl", [
        {"prompt": u, "completion": [{"role": "assistant", "content": "ten mg"}], "label": True},
        {"prompt": [{"role": "user", "content": "when?"}], "completion": "now", "label": False}]), tok)
    assert tok.decode(exs[0].prompt_ids).endswith("<|im_start|>assistant\n")
    assert tok.decode(exs[0].completion_ids).startswith("ten mg<|im_end|>")


def test_pairs_become_one_desirable_and_one_undesirable_row(tmp_path, tok):
    pairs = [{"prompt": "Q: the dose?", "chosen": " ten mg", "rejected": " a lot", "id": "a"},
             {"prompt": "Q: when?", "chosen": " now", "rejected": " later", "id": "b", "label": "routine"}]
    path = write(tmp_path / "dpo.jsonl", pairs)
    exs, pref = read_unpaired(path, tok), read_preferences(path, tok)
    assert len(exs) == 4
    assert [e.desirable for e in exs] == [True, False, True, False]
    assert [e.meta["id"] for e in exs] == ["a", "a", "b", "b"]
    assert exs[2].meta["label"] == "routine"  # a pair's own "label" (a task's gold field) is data, not KTO's flag
    for i, p in enumerate(pref):
        assert exs[2 * i].prompt_ids == exs[2 * i + 1].prompt_ids == p.prompt_ids
        assert (exs[2 * i].completion_ids, exs[2 * i + 1].completion_ids) == (p.chosen_ids, p.rejected_ids)
    # an eval split by prompt keeps both halves of a pair on one side
    train, held = split_unpaired(exs, 0.5, seed=0)
    assert len(train) == len(held) == 2
    assert {tuple(e.prompt_ids) for e in train}.isdisjoint({tuple(e.prompt_ids) for e in held})


def test_kl_completion_comes_from_another_prompt(tmp_path, tok):
    exs = read_unpaired(write(tmp_path / "kto.jsonl", ROWS), tok)
    for i, e in enumerate(exs):
        donors = [d for d in exs if d.completion_ids == e.kl_ids]
        assert donors and all(d.prompt_ids != e.prompt_ids for d in donors), i
    assert exs[0].kl_ids == exs[2].completion_ids  # rows 0 and 1 share a prompt: the next other prompt is row 2
    assert exs[3].kl_ids == exs[0].completion_ids  # cyclic


def test_truncation_cuts_completion_and_kl(tmp_path, tok):
    long = row("Q: x?", " " + "word " * 40, True)
    stats = {}
    exs = read_unpaired(write(tmp_path / "kto.jsonl", [long, row("Q: y?", " " + "other " * 40, False)]), tok,
                        max_length=20, stats=stats)
    assert stats["truncated"] == 2
    for e in exs:
        assert len(e.prompt_ids) + len(e.completion_ids) <= 20
        assert len(e.prompt_ids) + len(e.kl_ids) <= 20


def test_batch_layouts_agree_on_targets():
    exs = assign_kl([KTOExample([1, 2, 3], [4, 5], True), KTOExample([6, 7], [8, 9, 10], False),
                     KTOExample([11], [12], True)])
    concat, shared = kto_batch(exs, "concat"), kto_batch(exs, "shared-prompt")
    assert concat.n_seqs == shared.n_seqs == 6
    assert concat.targets.tolist() == shared.targets.tolist() == [4, 5, 8, 9, 10, 12, 8, 9, 10, 12, 4, 5]
    assert shared.ids.shape[0] == 3 and concat.ids.shape[0] == 6
    assert shared.desirable.tolist() == [True, False, True]


BAD = [
    ("a string label", [row("Q: a?", " b", True), row("Q: c?", " d", "yes")],
     r"kto\.jsonl:2: field 'label' must be a boolean \(true or false\), got a string 'yes'"),
    ("a number label", [row("Q: a?", " b", 1)], r"kto\.jsonl:1: field 'label' must be a boolean.*got a number 1"),
    ("no label", [{"prompt": "Q: a?", "completion": " b"}], r"kto\.jsonl:1: missing field 'label'"),
    ("only desirable", [row("Q: a?", " b", True), row("Q: c?", " d", True)],
     r"kto\.jsonl: all 2 rows are desirable \(label true\); KTO also needs undesirable rows"),
    ("only undesirable", [row("Q: a?", " b", False), row("Q: c?", " d", False)], r"all 2 rows are undesirable"),
    ("mixed kinds", [row("Q: a?", " b", True), {"prompt": "Q: c?", "chosen": " d", "rejected": " e"}],
     r"kto\.jsonl:2: a preference pair in a file of labelled rows"),
    ("one prompt", [row("Q: a?", " b", True), row("Q: a?", " c", False)], r"at least two prompts"),
]


@pytest.mark.parametrize("name,rows,match", BAD, ids=[b[0] for b in BAD])
def test_bad_files_are_one_line_errors(tmp_path, tok, name, rows, match):
    with pytest.raises(MinifTError, match=match) as e:
        read_unpaired(write(tmp_path / "kto.jsonl", rows), tok)
    assert "\n" not in str(e.value)


# --- through the command line: train_dpo.py --loss simpo|orpo|kto ------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny checkpoint, preference pairs and unpaired rows (a few dozen of a few tokens each)."""
    from conftest import make_hf_model, save_checkpoint

    d = tmp_path_factory.mktemp("pref_cli")
    save_checkpoint(make_hf_model("llama", tie_word_embeddings=True), d / "ckpt", shard=False)
    pairs = [{"prompt": f"is {i} even?", "chosen": " yes" if i % 2 == 0 else " no",
              "rejected": " no" if i % 2 == 0 else " yes"} for i in range(24)]
    write(d / "dpo.jsonl", pairs)
    write(d / "kto.jsonl", [row(p["prompt"], p[k], k == "chosen") for p in pairs for k in ("chosen", "rejected")])
    return d


def run_cli(tiny, tmp_path, capsys, *args):
    """train_dpo.py in this process (cli._dpo behind run_cli, as the console command): (exit code, stderr)."""
    from minift import cli
    from minift.errors import run_cli as wrap

    argv = ["--ckpt", tiny / "ckpt", "--out", tmp_path / "out", "--no-progress", "--max-steps", 2,
            "--eval-every", 2, "--batch-size", 4, *args]
    try:
        wrap(lambda: cli._dpo([str(a) for a in argv]))
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.slow  # three short training runs: seconds each on a quiet machine
@pytest.mark.parametrize("loss,data,metric", [("simpo", "dpo.jsonl", "eval/rewards/accuracies"),
                                              ("orpo", "dpo.jsonl", "eval/log_odds_ratio"),
                                              ("kto", "kto.jsonl", "eval/rewards/margins")])
def test_train_dpo_runs_each_loss(tiny, tmp_path, capsys, loss, data, metric):
    code, err = run_cli(tiny, tmp_path, capsys, "--loss", loss, "--data", tiny / data)
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and metric in rows[0] and metric in rows[-1]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    # simpo and orpo run no reference pass (no cache file); kto caches its reference, like DPO
    assert (tmp_path / "out" / "ref_logps.safetensors").is_file() == (loss == "kto")


@pytest.mark.parametrize("args,words", [
    (["--loss", "orpo", "--orpo-lambda", "-0.5"], "error: --orpo-lambda must be at least 0, got -0.5"),
    (["--loss", "simpo", "--gamma", "-1"], "error: --gamma must be at least 0"),
    (["--loss", "kto", "--desirable-weight", "-1"], "error: --desirable-weight must be at least 0"),
])
def test_bad_flags_are_one_line(tiny, tmp_path, capsys, args, words):
    code, err = run_cli(tiny, tmp_path, capsys, "--data", tiny / "dpo.jsonl", *args)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(words)


@pytest.mark.parametrize("rows,words", [
    ([row("Q: a?", " b", True), row("Q: c?", " d", "no")], "kto.jsonl:2: field 'label' must be a boolean"),
    ([row("Q: a?", " b", True), row("Q: c?", " d", True)], "all 2 rows are desirable"),
])
def test_bad_kto_files_through_the_cli(tiny, tmp_path, capsys, rows, words):
    code, err = run_cli(tiny, tmp_path, capsys, "--loss", "kto", "--data", write(tmp_path / "kto.jsonl", rows))
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and words in last
