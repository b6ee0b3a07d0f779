"""JSONL training data -> token ids with target masks, in TRL's column formats, with line-numbered errors.

One JSON object per line (blank lines are skipped); fields other than the ones below (id, task, ...) are kept
in the example's `meta`.
  SFT         {"prompt": str, "completion": str}     plain text: prompt with the tokenizer's own specials (bos),
                                                      completion + eos
              {"prompt": [msgs], "completion": [msg]} conversational: one assistant message (a string is taken
                                                      as its content), rendered by the chat template
              {"messages": [msgs]}                    every assistant turn (content + end of turn) is a target
              {"text": str}                           every token is a target (language modelling), + eos
  preference  {"prompt", "chosen", "rejected"}       the same two forms: strings, or prompt as messages and
                                                      chosen / rejected as [assistant message] (or strings)

The prompt's tokens are always exactly a prefix of the sequence: prompt and completion are encoded separately
and concatenated, so BPE never merges a token across the boundary (the model then sees in training the same
prompt tokens it sees when generating). For conversations the chat template renders the prompt with its
generation prompt, then prompt + reply; the reply's text is what the second adds to the first, and a template
whose full rendering does not start with the prompt's rendering is reported as an error.
"""
import json
import random
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

from minift.errors import MinifTError

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class SFTExample:
    ids: list  # token ids, prompt first
    target_mask: list  # target_mask[t]: token t is a target (predicted from the hidden state at t - 1); [0] False
    meta: dict = field(default_factory=dict)  # the row's extra fields
    where: str = ""  # "FILE:LINE" of the row

    @property
    def n_targets(self):
        return sum(self.target_mask)


@dataclass
class PrefExample:
    prompt_ids: list
    chosen_ids: list  # the completion only (the prompt is not repeated)
    rejected_ids: list
    meta: dict = field(default_factory=dict)
    where: str = ""


class _BadRow(Exception):
    """A row-level problem; the reader prefixes FILE:LINE and raises it or counts it."""


def _kind(v):
    """The JSON name of a value's type, for messages."""
    for t, name in ((bool, "a boolean"), (str, "a string"), (dict, "an object"), (list, "a list"),
                    ((int, float), "a number")):
        if isinstance(v, t):
            return name
    return "null" if v is None else type(v).__name__


def _need(row, key):
    """A present, non-empty string or list field."""
    if row.get(key) is None:
        raise _BadRow(f"missing field {key!r}")
    v = row[key]
    if isinstance(v, str) and not v.strip():
        raise _BadRow(f"field {key!r} is empty")
    if isinstance(v, list) and not v:
        raise _BadRow(f"field {key!r} is an empty list")
    if not isinstance(v, (str, list)):
        raise _BadRow(f"field {key!r} must be a string or a list of messages, got {_kind(v)}")
    return v


def _messages(v, key):
    """Check a list of {"role", "content"} messages (extra keys such as "name" pass through to the template)."""
    if not isinstance(v, list):
        raise _BadRow(f"field {key!r} must be a list of messages, got {_kind(v)}")
    for i, m in enumerate(v):
        at = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise _BadRow(f"{at} must be an object with 'role' and 'content', got {_kind(m)}")
        if m.get("role") is None:
            raise _BadRow(f"{at} has no 'role'")
        if m["role"] not in ROLES:
            raise _BadRow(f"{at} has unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
        if m.get("content") is None:
            raise _BadRow(f"{at} has no 'content'")
        if not isinstance(m["content"], str):
            raise _BadRow(f"{at} content must be a string, got {_kind(m['content'])}")
        if not m["content"].strip():
            raise _BadRow(f"{at} content is empty")
    return v


def _reply(v, key):
    """The assistant message of a conversational completion: [{"role": "assistant", ...}] or a bare string."""
    if isinstance(v, str):
        return {"role": "assistant", "content": v}
    _messages(v, key)
    if len(v) != 1:
        raise _BadRow(f"field {key!r} must hold exactly one assistant message, got {len(v)}")
    if v[0]["role"] != "assistant":
        raise _BadRow(f"{key}[0] must be an assistant message, got role {v[0]['role']!r}")
    return v[0]


def _render(tok, messages, add_generation_prompt=False):
    try:
        return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except MinifTError as e:  # e.g. the template's raise_exception("roles must alternate ..."): a row problem
        raise _BadRow(str(e)) from None


def _extend(head, full, what):
    """The text `full` adds to `head`; the template must render the longer conversation as an extension."""
    if not full.startswith(head):
        raise _BadRow(f"the chat template does not extend the prompt at {what}: the rendered conversation does "
                      f"not start with the rendered prompt + generation prompt")
    return full[len(head):]


def _eos(tok):
    if tok.eos_id is None:
        raise MinifTError("the tokenizer has no eos token; plain-text rows need one to end the completion")
    return tok.eos_id


def _chat_reply_ids(tok, prompt, prompt_text, reply, key):
    text = _extend(prompt_text, _render(tok, prompt + [reply]), key)
    ids = tok.encode(text)
    if not ids:
        raise _BadRow(f"the chat template writes nothing for {key!r}")
    return ids


def _turns(tok, msgs):
    """messages -> (ids, target_mask): each assistant turn is a target, encoded apart from its context."""
    roles = [m["role"] for m in msgs]
    if "assistant" not in roles:
        raise _BadRow("'messages' has no assistant turn (nothing to learn)")
    if roles[0] == "assistant":
        raise _BadRow("'messages' starts with an assistant turn: there is no prompt before it")
    last = len(roles) - 1 - roles[::-1].index("assistant")  # later turns would only be context for nothing
    ids, mask, done = [], [], ""
    for i in range(last + 1):
        if roles[i] != "assistant":
            continue
        context = _extend(done, _render(tok, msgs[:i], add_generation_prompt=True), f"messages[{i}]")
        reply = _extend(done + context, _render(tok, msgs[: i + 1]), f"messages[{i}]")
        for text, is_target in ((context, False), (reply, True)):
            piece = tok.encode(text)
            ids += piece
            mask += [is_target] * len(piece)
        done += context + reply
    return ids, mask


def _sft_row(row, tok):
    """One SFT row -> (ids, target_mask, the fields it used)."""
    if "messages" in row:
        v = _need(row, "messages")
        ids, mask = _turns(tok, _messages(v, "messages"))
        return ids, mask, ("messages",)
    if "prompt" in row or "completion" in row:
        if "completion" not in row and "chosen" in row:
            raise _BadRow("missing field 'completion' (this is a preference row {prompt, chosen, rejected}; "
                          "train it with DPO)")
        prompt, completion = _need(row, "prompt"), _need(row, "completion")
        if isinstance(prompt, str):
            if not isinstance(completion, str):
                raise _BadRow(f"'prompt' is a string, so 'completion' must be one too, got {_kind(completion)}")
            p = tok.encode(prompt, add_special_tokens=True)
            c = tok.encode(completion) + [_eos(tok)]
        else:
            prompt = _messages(prompt, "prompt")
            reply = _reply(completion, "completion")
            prompt_text = _render(tok, prompt, add_generation_prompt=True)
            p = tok.encode(prompt_text)
            c = _chat_reply_ids(tok, prompt, prompt_text, reply, "completion")
        return p + c, [False] * len(p) + [True] * len(c), ("prompt", "completion")
    if "text" in row:
        text = _need(row, "text")
        if not isinstance(text, str):
            raise _BadRow(f"field 'text' must be a string, got {_kind(text)}")
        ids = tok.encode(text, add_special_tokens=True)
        if ids[-1:] != [_eos(tok)]:
            ids.append(_eos(tok))
        return ids, [False] + [True] * (len(ids) - 1), ("text",)
    raise _BadRow(f"no SFT fields: expected 'prompt' + 'completion', 'messages' or 'text' (has {sorted(row)})")


def _pref_row(row, tok):
    """One preference row -> (prompt_ids, chosen_ids, rejected_ids)."""
    prompt, chosen, rejected = _need(row, "prompt"), _need(row, "chosen"), _need(row, "rejected")
    if isinstance(prompt, str):
        for key, v in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(v, str):
                raise _BadRow(f"'prompt' is a string, so {key!r} must be one too, got {_kind(v)}")
        p = tok.encode(prompt, add_special_tokens=True)
        c, r = tok.encode(chosen) + [_eos(tok)], tok.encode(rejected) + [_eos(tok)]
    else:
        prompt = _messages(prompt, "prompt")
        c_msg, r_msg = _reply(chosen, "chosen"), _reply(rejected, "rejected")
        prompt_text = _render(tok, prompt, add_generation_prompt=True)
        p = tok.encode(prompt_text)
        c = _chat_reply_ids(tok, prompt, prompt_text, c_msg, "chosen")
        r = _chat_reply_ids(tok, prompt, prompt_text, r_msg, "rejected")
    if c == r:
        raise _BadRow("'chosen' and 'rejected' are identical")
    return p, c, r


def truncate_sft(ex, max_length):
    """Keep the first max_length tokens (the prompt's start); None when no target would remain."""
    if len(ex.ids) <= max_length:
        return ex
    mask = ex.target_mask[:max_length]
    return replace(ex, ids=ex.ids[:max_length], target_mask=mask) if any(mask) else None


def truncate_pref(ex, max_length):
    """Judge prompt + chosen and prompt + rejected each against max_length, cutting the completion's tail.

    None when the prompt leaves no room for a completion token, or the cut makes chosen == rejected (no
    preference left). Both layouts then see the same tokens."""
    room = max_length - len(ex.prompt_ids)
    if room < 1:
        return None
    if len(ex.chosen_ids) <= room and len(ex.rejected_ids) <= room:
        return ex  # nothing to cut: the same object, so the reader does not count it as truncated
    c, r = ex.chosen_ids[:room], ex.rejected_ids[:room]
    if c == r:
        return None
    return replace(ex, chosen_ids=c, rejected_ids=r)


def drop_shared_tail(ex):
    """The pair less the tokens that chosen and rejected share at their end (at least one token stays in each).

    A causal model's log-probs of the earlier tokens do not depend on the dropped ones, so a pair's scores become
    those of the span where the answers differ. Why: in a pair that differs in one phrase, the rejected answer's
    correct tail (the same medication and follow-up sentences as the chosen's, after the wrong diagnosis) would
    otherwise be pushed down with it. The shared prefix needs no such care: its tokens see the same context in
    both answers, so their log-ratios cancel in the margin."""
    c, r = ex.chosen_ids, ex.rejected_ids
    n = 0
    while n < min(len(c), len(r)) - 1 and c[-1 - n] == r[-1 - n]:
        n += 1
    return ex if n == 0 else replace(ex, chosen_ids=c[:len(c) - n], rejected_ids=r[:len(r) - n])


def _read(path, convert, truncate, max_length, skip_bad_rows, stats):
    path = Path(path)
    if not path.exists():
        raise MinifTError(f"{path}: file not found")
    if not path.is_file():
        raise MinifTError(f"{path}: not a file")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
        raise MinifTError(f"max_length must be an integer >= 2, got {max_length!r}")
    out, bad, n_rows, n_cut, n_dropped = [], [], 0, 0, 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                if not raw.strip():
                    continue
                n_rows += 1
                if lineno == 1:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark (Windows editors) is not data
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise _BadRow(f"not valid UTF-8 (byte {e.start})") from None
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    raise _BadRow(f"invalid JSON: {e.msg} (column {e.colno})") from None
                if not isinstance(row, dict):
                    raise _BadRow(f"a row must be a JSON object, got {_kind(row)}")
                ex = convert(row, where)
            except _BadRow as e:
                if not skip_bad_rows:
                    raise MinifTError(f"{where}: {e}") from None
                bad.append(f"{where}: {e}")
                continue
            if max_length is not None:
                cut = truncate(ex, max_length)
                n_cut += cut is not None and cut is not ex
                n_dropped += cut is None
                ex = cut
            if ex is not None:
                out.append(ex)
    if stats is not None:
        stats.update(rows=n_rows, bad=len(bad), truncated=n_cut, dropped=n_dropped, kept=len(out))
    if n_rows == 0:
        raise MinifTError(f"{path}: empty file (no JSON rows)")
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} bad row(s) of {n_rows}; first: {bad[0]}", stacklevel=3)
    if n_dropped:
        warnings.warn(f"{path}: dropped {n_dropped} row(s) with no completion token left within "
                      f"max_length={max_length}", stacklevel=3)
    if not out:
        first = f"; first bad row: {bad[0]}" if bad else ""
        raise MinifTError(f"{path}: no usable rows ({len(bad)} bad, {n_dropped} too long){first}")
    return out


def read_sft(path, tokenizer, max_length=None, skip_bad_rows=False, stats=None):
    """SFT rows of a JSONL file -> [SFTExample]. stats (a dict), when given, receives the counts
    rows, bad, truncated, dropped, kept."""
    def convert(row, where):
        ids, mask, used = _sft_row(row, tokenizer)
        return SFTExample(ids, mask, {k: v for k, v in row.items() if k not in used}, where)

    return _read(path, convert, truncate_sft, max_length, skip_bad_rows, stats)


def read_preferences(path, tokenizer, max_length=None, skip_bad_rows=False, stats=None):
    """Preference rows of a JSONL file -> [PrefExample] (see read_sft for stats)."""
    used = ("prompt", "chosen", "rejected")

    def convert(row, where):
        p, c, r = _pref_row(row, tokenizer)
        return PrefExample(p, c, r, {k: v for k, v in row.items() if k not in used}, where)

    return _read(path, convert, truncate_pref, max_length, skip_bad_rows, stats)


def prompt_key(ex):
    """The prompt's token ids (as a tuple) of an SFT or preference example."""
    if isinstance(ex, PrefExample):
        return tuple(ex.prompt_ids)
    first = ex.target_mask.index(True) if True in ex.target_mask else len(ex.ids)
    return tuple(ex.ids[:first])


def split_eval(examples, fraction, seed=0):
    """(train, eval): about `fraction` of the examples held out, chosen at random with `seed`.

    Examples that share a prompt go to the same side, so that an eval prompt was never trained on (several
    preference pairs per prompt are common). Each side keeps the file's order."""
    if not 0 <= fraction < 1:
        raise MinifTError(f"eval fraction must be in [0, 1), got {fraction}")
    groups = {}
    for i, ex in enumerate(examples):
        groups.setdefault(prompt_key(ex), []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    want = max(1, round(fraction * len(examples))) if fraction > 0 else 0
    held = set()
    for g in order[:-1]:  # the last group always stays in train
        if len(held) >= want:
            break
        held.update(g)
    train = [ex for i, ex in enumerate(examples) if i not in held]
    return train, [ex for i, ex in enumerate(examples) if i in held]
