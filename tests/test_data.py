"""JSONL readers: named one-line errors for malformed rows, skip_bad_rows counts, the prompt-prefix guarantee,
truncation rules and the eval split. A tiny byte-level BPE tokenizer with a ChatML template (conftest) keeps
these fast; its merges ("th", "the", "Ġt", ...) let a token straddle a prompt/completion boundary."""
import json
import warnings

import pytest
from conftest import CHATML, write_byte_tokenizer

from minift.train.data import PrefExample, SFTExample, read_preferences, read_sft, split_eval
from minift.errors import MinifTError
from minift.model.tokenizer import Tokenizer

# Writes assistant turns with a "model" header but the generation prompt with "assistant": the full rendering
# does not start with the prompt's rendering (as with templates that rewrite earlier turns).
MISMATCH = CHATML.replace("'<|im_start|>' + message['role']",
                          "'<|im_start|>' + ('model' if message['role'] == 'assistant' else message['role'])")
ALTERNATE = ("{% for message in messages %}{% if loop.index0 > 0 and message['role'] == "
             "messages[loop.index0 - 1]['role'] %}{{ raise_exception('roles must alternate') }}{% endif %}"
             "{% endfor %}" + CHATML)


def _tok(tmp_path_factory, name, **kw):
    d = tmp_path_factory.mktemp(name)
    write_byte_tokenizer(d, **kw)
    return Tokenizer.from_dir(d)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return _tok(tmp_path_factory, "tok")


@pytest.fixture(scope="module")
def toks(tmp_path_factory, tok):
    return {"chatml": tok, "mismatch": _tok(tmp_path_factory, "mis", chat_template=MISMATCH),
            "alternate": _tok(tmp_path_factory, "alt", chat_template=ALTERNATE)}


def write(path, rows):
    """rows: dicts (dumped as JSON) or raw strings/bytes (written as they are)."""
    out = b""
    for r in rows:
        r = json.dumps(r) if isinstance(r, (dict, list)) else r
        out += (r.encode() if isinstance(r, str) else r) + b"\n"
    path.write_bytes(out)
    return path


def msg(role, content):
    return {"role": role, "content": content}


U, A = msg("user", "what is the dose?"), msg("assistant", "ten mg")
GOOD_SFT = {"prompt": "Q: the dose?", "completion": " ten mg"}
GOOD_PREF = {"prompt": "Q: the dose?", "chosen": " ten mg", "rejected": " a lot"}

# (name, reader, bad row, tokenizer, expected words in the message). The bad row is written on line 3,
# after a good row and a blank line, so the reported line number must count blank lines too.
BAD = [
    ("bad_json", "sft", '{"prompt": "a", "completion": }', "chatml", "invalid JSON"),
    ("truncated_json", "sft", '{"prompt": "a", "compl', "chatml", "invalid JSON"),
    ("not_object", "sft", '["a", "b"]', "chatml", "must be a JSON object, got a list"),
    ("bare_string", "pref", '"hello"', "chatml", "must be a JSON object, got a string"),
    ("missing_completion", "sft", {"prompt": "a"}, "chatml", "missing field 'completion'"),
    ("pref_row_in_sft", "sft", GOOD_PREF, "chatml", "preference row"),
    ("empty_completion", "sft", {"prompt": "a", "completion": ""}, "chatml", "field 'completion' is empty"),
    ("blank_prompt", "sft", {"prompt": "  \n", "completion": "b"}, "chatml", "field 'prompt' is empty"),
    ("null_prompt", "sft", {"prompt": None, "completion": "b"}, "chatml", "missing field 'prompt'"),
    ("number_prompt", "sft", {"prompt": 3, "completion": "b"}, "chatml", "must be a string or a list"),
    ("str_prompt_list_completion", "sft", {"prompt": "a", "completion": [A]}, "chatml", "must be one too"),
    ("text_not_string", "sft", {"text": ["a"]}, "chatml", "field 'text' must be a string"),
    ("unknown_columns", "sft", {"input": "a", "output": "b"}, "chatml", "no SFT fields"),
    ("message_no_role", "sft", {"messages": [{"content": "hi"}, A]}, "chatml", "messages[0] has no 'role'"),
    ("message_no_content", "sft", {"messages": [U, {"role": "assistant"}]}, "chatml",
     "messages[1] has no 'content'"),
    ("message_unknown_role", "sft", {"messages": [msg("bot", "hi"), A]}, "chatml", "unknown role 'bot'"),
    ("message_content_list", "sft", {"messages": [U, msg("assistant", ["x"])]}, "chatml",
     "content must be a string, got a list"),
    ("message_empty_content", "sft", {"messages": [U, msg("assistant", " ")]}, "chatml", "content is empty"),
    ("message_not_object", "sft", {"messages": ["hi", A]}, "chatml", "messages[0] must be an object"),
    ("messages_not_list", "sft", {"messages": {"role": "user"}}, "chatml", "must be a string or a list"),
    ("messages_empty", "sft", {"messages": []}, "chatml", "empty list"),
    ("no_assistant", "sft", {"messages": [U, msg("user", "more")]}, "chatml", "no assistant turn"),
    ("assistant_first", "sft", {"messages": [A, U]}, "chatml", "starts with an assistant turn"),
    ("completion_user_role", "sft", {"prompt": [U], "completion": [msg("user", "x")]}, "chatml",
     "must be an assistant message"),
    ("completion_two_messages", "sft", {"prompt": [U], "completion": [A, A]}, "chatml", "exactly one"),
    ("template_mismatch_messages", "sft", {"messages": [U, A]}, "mismatch", "does not extend the prompt"),
    ("template_mismatch_completion", "sft", {"prompt": [U], "completion": [A]}, "mismatch",
     "does not extend the prompt"),
    ("template_raises", "sft", {"messages": [U, msg("user", "x"), A]}, "alternate", "roles must alternate"),
    ("chosen_eq_rejected", "pref", {"prompt": "a", "chosen": "b", "rejected": "b"}, "chatml", "identical"),
    ("chosen_eq_rejected_chat", "pref", {"prompt": [U], "chosen": [A], "rejected": [A]}, "chatml", "identical"),
    ("missing_rejected", "pref", {"prompt": "a", "chosen": "b"}, "chatml", "missing field 'rejected'"),
    ("str_prompt_list_chosen", "pref", {"prompt": "a", "chosen": [A], "rejected": "c"}, "chatml",
     "'chosen' must be one too"),
    ("chosen_wrong_role", "pref", {"prompt": [U], "chosen": [msg("system", "x")], "rejected": [A]}, "chatml",
     "chosen[0] must be an assistant message"),
    ("pref_template_mismatch", "pref", {"prompt": [U], "chosen": [A], "rejected": "no"}, "mismatch",
     "does not extend the prompt at chosen"),
    ("invalid_utf8", "pref", b'{"prompt": "\xff"}', "chatml", "not valid UTF-8"),
]


def reader(kind):
    return read_sft if kind == "sft" else read_preferences


@pytest.mark.parametrize("name,kind,row,tok_name,words", BAD, ids=[b[0] for b in BAD])
def test_malformed_row_is_one_line_naming_file_and_line(tmp_path, toks, name, kind, row, tok_name, words):
    path = write(tmp_path / f"{name}.jsonl", [GOOD_SFT if kind == "sft" else GOOD_PREF, "", row])
    with pytest.raises(MinifTError) as e:
        reader(kind)(path, toks[tok_name])
    text = str(e.value)
    assert text.startswith(f"{path}:3: "), text
    assert words in text and "\n" not in text, text


@pytest.mark.parametrize("kind", ["sft", "pref"])
def test_skip_bad_rows_counts_and_keeps_good_ones(tmp_path, tok, kind):
    bads = [b[2] for b in BAD if b[1] == kind and b[3] == "chatml"]
    good = GOOD_SFT if kind == "sft" else GOOD_PREF
    path = write(tmp_path / "mixed.jsonl", [good] + bads + [dict(good, id=7)])
    stats = {}
    with pytest.warns(UserWarning, match=rf"skipped {len(bads)} bad row\(s\) of {len(bads) + 2}; first: .*:2: "):
        out = reader(kind)(path, tok, skip_bad_rows=True, stats=stats)
    assert len(out) == 2 and out[1].meta == {"id": 7} and out[1].where == f"{path}:{len(bads) + 2}"
    assert stats == dict(rows=len(bads) + 2, bad=len(bads), truncated=0, dropped=0, kept=2)


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path, tok):
    path = write(tmp_path / "bad.jsonl", ['{"prompt": "a"}', "[1]"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(MinifTError, match=r"no usable rows \(2 bad, 0 too long\); first bad row: .*:1: "):
            read_sft(path, tok, skip_bad_rows=True)


@pytest.mark.parametrize("content,words", [(b"", "empty file"), (b"\n  \n\n", "empty file")])
def test_empty_file(tmp_path, tok, content, words):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    for read in (read_sft, read_preferences):
        with pytest.raises(MinifTError, match=f"^{path}: {words}"):
            read(path, tok)


def test_missing_path_and_directory(tmp_path, tok):
    with pytest.raises(MinifTError, match=f"^{tmp_path}/nope.jsonl: file not found$"):
        read_sft(tmp_path / "nope.jsonl", tok)
    with pytest.raises(MinifTError, match=f"^{tmp_path}: not a file$"):
        read_preferences(tmp_path, tok)


def test_extra_fields_are_kept(tmp_path, tok):
    path = write(tmp_path / "x.jsonl", [dict(GOOD_PREF, id="r1", task="dose", score=0.5)])
    (ex,) = read_preferences(path, tok)
    assert ex.meta == {"id": "r1", "task": "dose", "score": 0.5} and ex.where == f"{path}:1"


def test_a_utf8_byte_order_mark_is_not_data(tmp_path, tok):
    """Windows editors and spreadsheet exports start files with EF BB BF: the rows are the same rows."""
    plain = write(tmp_path / "plain.jsonl", [GOOD_PREF, GOOD_PREF])
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    got, want = read_preferences(bom, tok), read_preferences(plain, tok)
    assert [(e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in got] == \
        [(e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in want]
    inner = tmp_path / "inner.jsonl"  # a mark anywhere but at the start is a bad row, named by its line
    inner.write_bytes(plain.read_bytes() + b"\xef\xbb\xbf" + plain.read_bytes().splitlines()[0] + b"\n")
    with pytest.raises(MinifTError, match=f"{inner}:3: invalid JSON"):
        read_preferences(inner, tok)


# ---- the prefix guarantee ----
def test_plain_prompt_completion_ids_are_separate_encodings(tmp_path, tok):
    # "th" + "e there": encoded jointly BPE merges "the" across the boundary; we must not.
    row = {"prompt": "What is th", "completion": "e there"}
    (ex,) = read_sft(write(tmp_path / "p.jsonl", [row]), tok)
    p, c = tok.encode(row["prompt"], add_special_tokens=True), tok.encode(row["completion"])
    assert ex.ids == p + c + [tok.eos_id]
    assert ex.target_mask == [False] * len(p) + [True] * (len(c) + 1)
    joint = tok.encode(row["prompt"] + row["completion"])
    assert joint[: len(p)] != p  # the case is a real boundary merge, so the check above means something


def test_plain_prompt_gets_the_post_processor_bos(tmp_path_factory, tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import processors

    d = tmp_path_factory.mktemp("bos_tok")
    write_byte_tokenizer(d)
    backend = Backend.from_file(str(d / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 262)])
    backend.save(str(d / "tokenizer.json"))
    tok = Tokenizer.from_dir(d)
    rows = [GOOD_PREF, {"prompt": [U], "chosen": [A], "rejected": "no"}]
    plain, chat = read_preferences(write(tmp_path / "b.jsonl", rows), tok)
    assert plain.prompt_ids[0] == tok.bos_id == 262 and plain.chosen_ids[0] != tok.bos_id
    assert tok.bos_id not in chat.prompt_ids  # the ChatML template writes no bos; encode adds none either


def test_conversational_prompt_is_a_prefix(tmp_path, tok):
    sys_msg = msg("system", "be brief")
    rows = [{"prompt": [sys_msg, U], "completion": [A]}, {"prompt": [sys_msg, U], "chosen": [A], "rejected": "none"}]
    (sft,) = read_sft(write(tmp_path / "s.jsonl", rows[:1]), tok)
    (pref,) = read_preferences(write(tmp_path / "d.jsonl", rows[1:]), tok)
    prompt_text = tok.apply_chat_template([sys_msg, U], add_generation_prompt=True)
    p = tok.encode(prompt_text)
    n = len(p)
    assert sft.ids[:n] == p == pref.prompt_ids and sft.target_mask == [False] * n + [True] * (len(sft.ids) - n)
    assert tok.decode(sft.ids) == tok.apply_chat_template([sys_msg, U, A])
    assert sft.ids[n:] == pref.chosen_ids and tok.decode(pref.chosen_ids) == "ten mg<|im_end|>\n"
    assert tok.decode(pref.rejected_ids) == "none<|im_end|>\n"  # a bare string is the assistant's content


def test_messages_mark_assistant_turns_only(tmp_path, tok):
    convo = [msg("system", "s"), U, A, msg("user", "and the rest?"), msg("assistant", "there"), msg("user", "ok")]
    (ex,) = read_sft(write(tmp_path / "m.jsonl", [{"messages": convo}]), tok)
    # the trailing user turn trains nothing and is left out
    assert tok.decode(ex.ids) == tok.apply_chat_template(convo[:5])
    targets = tok.decode([t for t, m in zip(ex.ids, ex.target_mask) if m])
    assert targets == "ten mg<|im_end|>\nthere<|im_end|>\n"
    first = ex.target_mask.index(True)
    assert ex.ids[:first] == tok.encode(tok.apply_chat_template(convo[:2], add_generation_prompt=True))


# ChatML with transformers' {% generation %} markers around what the assistant writes: the same text as CHATML,
# and transformers then reports which tokens are the assistant's (return_assistant_tokens_mask).
CHATML_GEN = ("{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
              "{% generation %}{{ message['content'] + '<|im_end|>\n' }}{% endgeneration %}{% else %}"
              "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_conversations_match_transformers(tmp_path_factory, tmp_path, tok):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("gen_tok")
    write_byte_tokenizer(d, chat_template=CHATML_GEN)
    hf = AutoTokenizer.from_pretrained(d)
    convo = [msg("system", "s"), U, A, msg("user", "and the rest?"), msg("assistant", "there")]
    (ex,) = read_sft(write(tmp_path / "m.jsonl", [{"messages": convo}]), tok)
    ref = hf.apply_chat_template(convo, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ex.ids == ref["input_ids"] and ex.target_mask == [bool(m) for m in ref["assistant_masks"]]
    row = {"prompt": convo[:4], "chosen": [A], "rejected": "x"}
    (pair,) = read_preferences(write(tmp_path / "p.jsonl", [row]), tok)
    prompt = hf.apply_chat_template(convo[:4], add_generation_prompt=True, tokenize=True, return_dict=True)
    assert pair.prompt_ids == prompt["input_ids"]
    full = hf.apply_chat_template(convo[:4] + [A], tokenize=True, return_dict=True)["input_ids"]
    assert pair.prompt_ids + pair.chosen_ids == full


def test_text_rows_are_all_targets(tmp_path, tok):
    (ex,) = read_sft(write(tmp_path / "t.jsonl", [{"text": "the theory"}]), tok)
    assert ex.ids == tok.encode("the theory") + [tok.eos_id] and ex.target_mask == [False] + [True] * (len(ex.ids) - 1)


# ---- truncation ----
def test_sft_truncation_cuts_the_completion_tail_and_drops_promptless_rows(tmp_path, tok):
    rows = [{"prompt": "abcd", "completion": "efghij"}, {"prompt": "abcdefgh", "completion": "x"},
            {"prompt": "abcdefg", "completion": "xy"}, {"messages": [msg("user", "abcdefghijklmnop"), A]}]
    path = write(tmp_path / "t.jsonl", rows)
    full = read_sft(path, tok)
    stats = {}
    with pytest.warns(UserWarning, match=r"dropped 2 row\(s\) with no completion token left within max_length=8"):
        cut = read_sft(path, tok, max_length=8, stats=stats)
    assert stats == dict(rows=4, bad=0, truncated=2, dropped=2, kept=2)
    assert cut[0].ids == full[0].ids[:8] and cut[0].target_mask == [False] * 4 + [True] * 4
    assert cut[1].ids == full[2].ids[:8] and sum(cut[1].target_mask) == 1  # one completion token is enough
    assert all(len(e.ids) <= 8 for e in cut)


def test_preference_truncation_judges_each_side_with_the_prompt(tmp_path, tok):
    rows = [{"prompt": "abcd", "chosen": "ef", "rejected": "ghijkl"},  # only rejected is cut
            {"prompt": "abcdefgh", "chosen": "x", "rejected": "y"},  # prompt fills max_length: dropped
            {"prompt": "abcd", "chosen": "wxyz1", "rejected": "wxyz2"},  # identical once cut: dropped
            {"prompt": "abc", "chosen": "wxyz1", "rejected": "wxyz2"}]  # eos cut, last tokens differ: kept
    path = write(tmp_path / "t.jsonl", rows)
    full = read_preferences(path, tok)
    stats = {}
    with pytest.warns(UserWarning, match=r"dropped 2 row"):
        cut = read_preferences(path, tok, max_length=8, stats=stats)
    assert stats["dropped"] == 2 and stats["truncated"] == 2 and len(cut) == 2
    assert cut[0].chosen_ids == full[0].chosen_ids and cut[0].rejected_ids == full[0].rejected_ids[:4]
    assert cut[1].prompt_ids == full[3].prompt_ids and tok.decode(cut[1].chosen_ids) == "wxyz1"
    assert cut[1].rejected_ids == full[3].rejected_ids[:5]
    for e in cut:  # both layouts then hold rows of at most max_length tokens per side
        assert len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids)) <= 8


def test_bad_max_length(tmp_path, tok):
    with pytest.raises(MinifTError, match="max_length must be an integer >= 2"):
        read_sft(write(tmp_path / "a.jsonl", [GOOD_SFT]), tok, max_length=1)


# ---- eval split ----
def test_split_eval_is_seeded_disjoint_and_keeps_prompts_together():
    exs = [PrefExample([i % 7 + 1], [1], [2], {"i": i}) for i in range(40)]  # 7 prompts, several pairs each
    train, ev = split_eval(exs, 0.2, seed=3)
    assert sorted(e.meta["i"] for e in train + ev) == list(range(40)) and 0 < len(ev) < 40
    assert not {tuple(e.prompt_ids) for e in train} & {tuple(e.prompt_ids) for e in ev}
    assert [e.meta["i"] for e in ev] == sorted(e.meta["i"] for e in ev)  # file order kept
    assert split_eval(exs, 0.2, seed=3) == (train, ev) and split_eval(exs, 0.2, seed=4) != (train, ev)
    sft = [SFTExample([1, i, 9], [False, False, True]) for i in range(10)]
    assert [len(s) for s in split_eval(sft, 0.3, seed=0)] == [7, 3]
    assert split_eval(sft, 0.0) == (sft, [])
    with pytest.raises(MinifTError, match="eval fraction"):
        split_eval(sft, 1.0)
