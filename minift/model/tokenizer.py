"""Tokenizer: a `tokenizers.Tokenizer` (tokenizer.json) plus the jinja2 chat template (tokenizer_config.json).

The chat template is rendered the way transformers renders it: a sandboxed jinja2 environment with
`trim_blocks` and `lstrip_blocks`, the helpers `raise_exception`, `tojson` and `strftime_now`, and the named
special tokens (`bos_token`, `eos_token`, ...) as template variables. A conversation is rendered to text and
then encoded WITHOUT adding special tokens, because the template already writes them; this is what
`transformers` `apply_chat_template(tokenize=True)` does, so the ids match the ones the model was tuned on.
"""
import json
from datetime import datetime
from pathlib import Path

from minift.errors import MinifTError

# The named special tokens transformers exposes to chat templates (its SPECIAL_TOKENS_ATTRIBUTES).
NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Tokens that end an assistant turn in common chat formats (Llama 3, ChatML, Phi-3, Gemma); counted as stop ids
# when the vocabulary has them and the chat template writes them.
TURN_END_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|eom_id|>")


def _token_str(value):
    """A special token as written in tokenizer_config.json: a string, or an AddedToken dict with 'content'."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MinifTError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None


def _pick_template(chat_template, path):
    """transformers allows one template string, or a list of {name, template} of which 'default' is used."""
    if chat_template is None or isinstance(chat_template, str):
        return chat_template
    if isinstance(chat_template, list):
        named = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
        raise MinifTError(f"{path}: chat_template is a list without a 'default' template (has {sorted(named)})")
    raise MinifTError(f"{path}: chat_template must be a string or a list of named templates")


def _compile_template(source):
    """A template compiled in the same kind of environment transformers uses (sandboxed, same whitespace rules)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja2's own tojson escapes HTML characters (<, >, &); chat templates want plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


class Tokenizer:
    """Text <-> ids and chat rendering for one checkpoint directory."""

    def __init__(self, backend, config=None, model_config=None, generation_config=None):
        self._tok = backend
        self.config = dict(config or {})
        self.chat_template = _pick_template(self.config.get("chat_template"), "tokenizer_config.json")
        self._compiled = None
        model_config, generation_config = model_config or {}, generation_config or {}

        # Named special tokens from tokenizer_config.json; ids from generation_config/config.json fill the gaps.
        self.special_tokens = {k: _token_str(self.config.get(k)) for k in NAMED_SPECIALS}
        self.special_tokens = {k: v for k, v in self.special_tokens.items() if v is not None}
        for key in ("bos_token", "eos_token", "pad_token"):
            if key not in self.special_tokens:
                tid = generation_config.get(key + "_id", model_config.get(key + "_id"))
                tid = tid[0] if isinstance(tid, list) and tid else tid
                if isinstance(tid, int) and backend.id_to_token(tid) is not None:
                    self.special_tokens[key] = backend.id_to_token(tid)

        # Stop ids: every eos the generation config names, plus turn-end tokens the template writes.
        stops = set()
        for src in (generation_config, model_config):
            ids = src.get("eos_token_id")
            stops.update([ids] if isinstance(ids, int) else (ids or []))
        if self.eos_id is not None:
            stops.add(self.eos_id)
        for tok in TURN_END_TOKENS:
            tid = backend.token_to_id(tok)
            if tid is not None and self.chat_template and tok in self.chat_template:
                stops.add(tid)
        self.stop_ids = stops

    # ---- loading and saving ----
    @classmethod
    def from_dir(cls, path):
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise MinifTError(f"{tok_file}: not found (a checkpoint dir needs tokenizer.json)")
        try:
            backend = Backend.from_file(str(tok_file))
        except Exception as e:  # the tokenizers library raises a plain Exception on a bad file
            raise MinifTError(f"{tok_file}: cannot be read by the tokenizers library ({e})") from None
        extra = {}
        for name in ("tokenizer_config.json", "config.json", "generation_config.json"):
            extra[name] = _read_json(path / name) if (path / name).is_file() else {}
        config = extra["tokenizer_config.json"]
        # Newer checkpoints keep the template in its own file; transformers prefers it when present.
        if (path / "chat_template.jinja").is_file():
            config["chat_template"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(backend, config, extra["config.json"], extra["generation_config.json"])

    def save(self, out_dir):
        """Write tokenizer.json and tokenizer_config.json (with the chat template) into out_dir."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(out_dir / "tokenizer.json"))
        config = dict(self.config)
        config.update(self.special_tokens)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                      encoding="utf-8")

    # ---- special tokens ----
    def _id(self, key):
        tok = self.special_tokens.get(key)
        return None if tok is None else self._tok.token_to_id(tok)

    @property
    def bos_token(self):
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self):
        return self.special_tokens.get("eos_token")

    @property
    def bos_id(self):
        return self._id("bos_token")

    @property
    def eos_id(self):
        return self._id("eos_token")

    @property
    def pad_id(self):
        pad = self._id("pad_token")
        return self.eos_id if pad is None else pad  # no pad token: pad with eos (masked out anyway)

    @property
    def vocab_size(self):
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token):
        return self._tok.token_to_id(token)

    # ---- text <-> ids ----
    def encode(self, text, add_special_tokens=False):
        """Token ids. add_special_tokens=True applies tokenizer.json's post-processor alone (e.g. Llama 3's, which
        puts <|begin_of_text|> first): transformers 5 ignores add_bos_token / add_eos_token in
        tokenizer_config.json whenever a tokenizer.json exists, and so do we."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens=False):
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- chat ----
    def apply_chat_template(self, messages, add_generation_prompt=False, **kwargs):
        """The conversation as the text the model was trained on (no tokenization)."""
        if not self.chat_template:
            raise MinifTError("tokenizer_config.json: no chat_template; cannot format a conversation")
        if not messages:
            raise MinifTError("cannot apply a chat template to an empty conversation")
        import jinja2

        if self._compiled is None:
            try:
                self._compiled = _compile_template(self.chat_template)
            except jinja2.exceptions.TemplateSyntaxError as e:
                raise MinifTError(f"chat template: line {e.lineno}: {e.message}") from None
        # transformers drops keys whose value is None (an API's content=None) before rendering.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {**self.special_tokens, **kwargs}
        try:
            return self._compiled.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as e:  # raise_exception(...) in the template, or a bad template
            raise MinifTError(f"chat template: {e}") from None

    def encode_chat(self, messages, add_generation_prompt=False, **kwargs):
        """Render, then encode without adding specials: the template writes them itself."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs))

    def __len__(self):
        return self.vocab_size

    def __repr__(self):
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r})"
