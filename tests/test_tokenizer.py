"""minift.model.tokenizer against transformers: chat rendering, token ids, special tokens, errors.

Each case writes a small byte-level BPE tokenizer (merges learned from a few lines of text) with one chat
template into a directory, loads it with minift and with transformers' AutoTokenizer, and compares.
"""
import json

import pytest

from minift.errors import MinifTError
from minift.model.tokenizer import Tokenizer

# Llama 3.1 style: BOS written by the template, header tokens, strftime_now, trim filter.
LLAMA3 = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + strftime_now("%d %b %Y") + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Mistral [INST] style: system folded into the first user turn, alternation enforced with raise_exception.
MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + '[/INST]' }}
        {%- endif %}
    {%- else %}
        {{- ' ' + message['content'] + eos_token }}
    {%- endif %}
{%- endfor %}
"""

# ChatML written without '-' modifiers, indented: only trim_blocks / lstrip_blocks keep the output clean.
# tojson of the role checks the JSON filter (no HTML escaping, non-ASCII kept).
CHATML = """{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
{% if false %}{{ messages[0] | tojson }}{% endif %}"""

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<s>", "</s>", "[INST]", "[/INST]", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
CORPUS = ["The patient reports chest pain radiating to the left arm since 3 hours.",
          "Température: 38.5 °C, pression 120/80 mmHg; naïve café résumé.",
          "def add(a, b):\n    return a + b  # sum\n\n\tprint(add(1, 2))",
          "You are a helpful assistant. Answer briefly and cite the guideline."] * 3
CONVO = [{"role": "system", "content": "You are a careful clinical assistant."},
         {"role": "user", "content": "What is the normal adult resting heart rate?"},
         {"role": "assistant", "content": "About 60 to 100 beats per minute."},
         {"role": "user", "content": "And for a trained athlete? Résumé in 1 line, please."}]
TEXT = "Hello  world!\n\n  indented\tTab 12345 café naïve <|im_end|> [INST] x=f(a,b)  \n"


def write_tokenizer_dir(out_dir, template, config, bos_post=None):
    """tokenizer.json (byte-level BPE trained on CORPUS) + tokenizer_config.json with the given template."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, processors, trainers

    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if bos_post:  # Llama 3: tokenizer.json's post-processor adds BOS when special tokens are requested
        tok.post_processor = processors.TemplateProcessing(single=f"{bos_post} $A", pair=f"{bos_post} $A $B:1",
                                                           special_tokens=[(bos_post, tok.token_to_id(bos_post))])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, **config}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out_dir


CASES = {
    "llama3": (LLAMA3, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, "<|begin_of_text|>"),
    # Mistral configs spell tokens as AddedToken dicts; its tokenizer.json adds <s>.
    "mistral": (MISTRAL, {"bos_token": {"content": "<s>", "__type": "AddedToken", "special": True},
                          "eos_token": {"content": "</s>", "__type": "AddedToken", "special": True},
                          "add_bos_token": True, "add_eos_token": False}, "<s>"),
    # No post-processor: add_bos_token is ignored (transformers 5 drops it when tokenizer.json exists).
    "chatml": (CHATML, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
                        "add_bos_token": True}, None),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    """(minift Tokenizer, transformers tokenizer) for one template family."""
    from transformers import AutoTokenizer

    template, config, bos_post = CASES[request.param]
    d = write_tokenizer_dir(tmp_path_factory.mktemp(request.param), template, config, bos_post)
    return request.param, Tokenizer.from_dir(d), AutoTokenizer.from_pretrained(str(d))


@pytest.mark.parametrize("gen", [False, True])
def test_chat_rendering_and_ids_match_transformers(pair, gen):
    name, ours, ref = pair
    text = ours.apply_chat_template(CONVO, add_generation_prompt=gen)
    assert text == ref.apply_chat_template(CONVO, tokenize=False, add_generation_prompt=gen)
    ids = ref.apply_chat_template(CONVO, tokenize=True, add_generation_prompt=gen, return_dict=False)
    assert ours.encode_chat(CONVO, add_generation_prompt=gen) == list(ids)
    assert ours.decode(ours.encode_chat(CONVO, add_generation_prompt=gen)) == text
    if gen:  # the generation prompt only appends: the conversation without it is a prefix
        assert text.startswith(ours.apply_chat_template(CONVO))


@pytest.mark.parametrize("specials", [False, True])
def test_encode_decode_match_transformers(pair, specials):
    name, ours, ref = pair
    ids = ours.encode(TEXT, add_special_tokens=specials)
    assert ids == ref.encode(TEXT, add_special_tokens=specials)
    # Llama 3's post-processor and Mistral's add_bos_token put BOS first; ChatML adds nothing.
    assert (ids[0] == ours.bos_id) == (specials and name != "chatml")
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids) == ref.decode(ids)


def test_special_tokens_match_transformers(pair):
    name, ours, ref = pair
    assert (ours.bos_token, ours.eos_token) == (ref.bos_token, ref.eos_token)
    assert (ours.bos_id, ours.eos_id) == (ref.bos_token_id, ref.eos_token_id)
    assert ours.pad_id == (ref.pad_token_id if ref.pad_token_id is not None else ref.eos_token_id)
    assert ours.vocab_size == len(ref)
    assert ours.eos_id in ours.stop_ids


def test_stop_ids_and_fallbacks(tmp_path):
    # No eos/pad in tokenizer_config.json: eos comes from generation_config.json (a list, as in Llama 3.1).
    d = write_tokenizer_dir(tmp_path, LLAMA3, {"bos_token": "<|begin_of_text|>"})
    backend = json.loads((d / "tokenizer.json").read_text())
    eot, eot2 = (next(t["id"] for t in backend["added_tokens"] if t["content"] == c)
                 for c in ("<|eot_id|>", "<|end_of_text|>"))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [eot2, eot]}))
    tok = Tokenizer.from_dir(d)
    assert tok.eos_token == "<|end_of_text|>" and tok.eos_id == eot2
    assert tok.pad_id == eot2  # no pad token: falls back to eos
    assert tok.stop_ids == {eot, eot2}


def test_named_template_list_and_save_roundtrip(tmp_path):
    d = write_tokenizer_dir(tmp_path / "a", [{"name": "tool_use", "template": "{{ 'tools' }}"},
                                             {"name": "default", "template": CHATML}],
                            {"eos_token": "<|im_end|>"})
    tok = Tokenizer.from_dir(d)
    assert tok.apply_chat_template(CONVO[1:2]).startswith("<|im_start|>system\nYou are a helpful")
    assert tok.token_to_id("<|im_end|>") in tok.stop_ids
    tok.save(tmp_path / "b")
    again = Tokenizer.from_dir(tmp_path / "b")
    assert again.apply_chat_template(CONVO, True) == tok.apply_chat_template(CONVO, True)
    assert again.encode(TEXT) == tok.encode(TEXT) and again.eos_id == tok.eos_id


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(MinifTError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    d = write_tokenizer_dir(tmp_path / "m", MISTRAL, {"bos_token": "<s>", "eos_token": "</s>"})
    tok = Tokenizer.from_dir(d)
    with pytest.raises(MinifTError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    (d / "tokenizer_config.json").write_text('{"chat_template": "x",\n "eos_token": }')
    with pytest.raises(MinifTError, match=r"tokenizer_config.json: line 2"):
        Tokenizer.from_dir(d)
