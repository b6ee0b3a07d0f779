"""Shared fixtures: tiny random Hugging Face checkpoints (model + tokenizer) written to disk like real ones."""
import copy
import json
from pathlib import Path

import pytest
import torch

# The peers the tests compare against change under us (pip takes their newest releases): say which ran.
PEERS = ("torch", "triton", "transformers", "peft", "trl", "kernels", "gguf", "tokenizers", "llama_cpp_python")


def pytest_terminal_summary(terminalreporter):  # printed under -q too, where the report header is not
    from importlib import metadata

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "absent"
    terminalreporter.write_line("tested against: " + ", ".join(f"{name} {version(name)}" for name in PEERS))


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def write_byte_tokenizer(out_dir, chat_template=CHATML, bos="<s>", eos="<|im_end|>", pad="</s>"):
    """A byte-level BPE tokenizer with 256 byte tokens, a few merges and the chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    merges = [("t", "h"), ("th", "e"), ("Ġ", "t"), ("i", "n"), ("e", "r"), ("a", "n")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
              "pad_token": pad, "chat_template": chat_template, "model_max_length": 4096}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tok.get_vocab_size()


def make_hf_model(kind="llama", vocab_size=300, **overrides):
    """A tiny random transformers model (fp32, eval mode) of the given family."""
    import transformers

    base = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                bos_token_id=260, eos_token_id=263, pad_token_id=261)
    base.update(overrides)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[kind]
    torch.manual_seed(0)
    config = cls[0](**base)
    config._attn_implementation = "eager"  # the plainest reference path
    model = cls[1](config).eval()
    with torch.no_grad():  # norms start at 1; randomise so that a swapped norm weight would be caught
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_checkpoint(model, out_dir, shard=True, **tok_kwargs):
    """save_pretrained (sharded when asked, so the index path is exercised) + tokenizer files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, max_shard_size="100KB" if shard else "10GB")
    write_byte_tokenizer(out_dir, **tok_kwargs)
    return out_dir


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """(dir, transformers model): tiny Llama with GQA and tied embeddings, sharded."""
    model = make_hf_model("llama", tie_word_embeddings=True)
    return save_checkpoint(model, tmp_path_factory.mktemp("tiny_llama")), model


def make_pairs(n=3, seed=0):
    """n preference pairs of random byte tokens with prompts and completions of different lengths."""
    from minift.train.data import PrefExample
    g = torch.Generator().manual_seed(seed)
    rand = lambda k: torch.randint(0, 256, (k,), generator=g).tolist()  # noqa: E731
    pairs = []
    for i in range(n):
        prompt, chosen, rejected = rand(4 + 2 * i), rand(3 + i), rand(6 - i)
        rejected[0] = chosen[0]  # a shared first completion token, as in real pairs
        pairs.append(PrefExample(prompt, chosen, rejected))
    return pairs


@pytest.fixture(scope="module")
def adapted(tiny_llama):
    """(minift model with a nonzero LoRA adapter, fp64 transformers copy with the adapter merged, fp64 base):
    the policy and reference of the loss tests. A nonzero adapter, so that policy and reference differ."""
    from minift.model import lora
    from minift.model.checkpoint import load_model, to_hf_name
    ckpt, hf = tiny_llama
    model = load_model(ckpt)  # fp32
    torch.manual_seed(0)  # LoRA's A init draws from the global generator: fix it, whatever ran before
    lora.apply_lora(model, "all-linear", r=4, alpha=8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in lora.lora_modules(model):
            w = m.lora_B["default"].weight
            w.copy_(0.1 * torch.randn(w.shape, generator=g))
    hf_policy, hf_ref = copy.deepcopy(hf).double(), copy.deepcopy(hf).double()
    with torch.no_grad():
        for path, m in lora.lora_modules(model):
            hf_policy.get_parameter(to_hf_name(path) + ".weight").add_(m.delta("default").double())
    return model, hf_policy, hf_ref


CLINICAL = Path(__file__).resolve().parent.parent / "minift" / "datasets" / "clinical"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A few bundled rows of each kind with their prompts cut short (the tiny model's byte tokenizer makes long
    sequences; the scorer reads the rows' gold fields, not the prompt)."""
    out = tmp_path_factory.mktemp("tiny_data")
    for kind, n in (("sft", 8), ("dpo", 8), ("test", 8)):
        rows = [json.loads(x) for x in (CLINICAL / f"{kind}.jsonl").read_text().splitlines()][:n]
        for r in rows:
            r["prompt"][0]["content"] = r["prompt"][0]["content"][:40]
        (out / f"{kind}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out
