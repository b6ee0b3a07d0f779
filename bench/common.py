"""Shared pieces of bench_step.py and bench_peers.py: run conditions, the measured matmul peak, peak memory,
the benchmark data (clinical pairs and a balanced set), the tiny smoke checkpoint, and the FLOP model.

FLOP model (2 FLOPs per multiply-add; nanoGPT's estimate_mfu and litgpt's estimate_flops count the same way):
  per token, forward:   2 x (linear weights of the blocks touched) + 2 x (LoRA factors, when adapters are on)
  attention, forward:   4 x d_attn per (query, key) pair attended, per layer (QK^T and AV), d_attn = n_heads x head_dim
  backward:             2 per frozen weight per token (the gradient of the activations only), +2 more per
                        trainable (LoRA) weight (its own gradient); attention backward = 2 x its forward
  vocab projection:     2 x V x dim per row that goes through it, forward; +2 x V x dim for the gradient of the
                        hidden state in a training pass (the projection is frozen under LoRA: no weight gradient)
  so a training pass costs 4 per frozen weight and 6 per LoRA weight per token, a no-grad (reference) pass 2.
Not counted: embedding lookups, norms, RoPE, softmax/exp (O(rows x V) but not matmuls), the optimizer (~15 per LoRA
weight per step), and the skipped input gradient of layer 0 (nothing before it trains): all below ~2% here.
"""
import ctypes
import gc
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script from anywhere: import minift from this checkout

from minift.train.batching import dpo_batch, sft_batch  # noqa: E402
from minift.train.data import PrefExample, SFTExample, read_preferences  # noqa: E402

RESULTS = ROOT / "bench" / "results"
CLINICAL = ROOT / "minift" / "datasets" / "clinical" / "dpo.jsonl"
LORA = dict(r=16, alpha=32.0, targets="all-linear")  # r=16 on every linear layer of the blocks (not lm_head)

FLOP_MODEL = (
    "training pass per token: 4 FLOPs per frozen block weight (2 forward + 2 for the activation gradient) + 6 per "
    "LoRA weight (+2 for its own gradient); reference (no-grad, adapters off) pass: 2 per block weight; attention: "
    "4 x n_heads x head_dim per attended (query, key) pair per layer forward, x3 with its backward; vocab "
    "projection: 2 x V x dim per projected row forward, +2 x V x dim in a training pass (hidden gradient; the "
    "projection is frozen), counted only on the rows that go through it (all positions for full logits, the "
    "completion rows for minift). Not counted (< 2% here): norms, RoPE, softmax, embeddings, the optimizer.")

# glibc serves every allocation over 64 KiB with mmap (setting the threshold also turns off its dynamic
# raising), so a freed tensor leaves RSS at once and the peak counts live memory, not heap left fragmented:
# with the default allocator the same step measured 1.8 GB in one run and 3.7 GB in the next.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}

MEMORY_METHOD = (
    "CPU: measured in subprocesses of their own, apart from the timed runs (smoke: one per data shape / one "
    "process), with MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors leave RSS at once. After one warm-up "
    "training step (the first step of a process also allocates ~0.5 GB of one-time library buffers, and AdamW's "
    "state), freed heap is returned to the OS (malloc_trim), the kernel's peak-RSS mark is reset "
    "(/proc/self/clear_refs), the next step(s) run, and peak = VmHWM - VmRSS before them: what a training step "
    "takes over the loaded model, its optimizer state and its batches. CUDA: torch.cuda.max_memory_allocated "
    "over memory_allocated at the same point.")


# --- conditions ------------------------------------------------------------------------------------------------


def cpu_name():
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def versions():
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers", "peft", "trl"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "not installed"
    return out


def conditions(device, dtype, **extra):
    return {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "cpu": cpu_name(),
            "threads": torch.get_num_threads(), "dtype": str(dtype).replace("torch.", ""),
            "load_avg_1m_at_start": os.getloadavg()[0], **extra, **versions()}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, dtype, n=None, repeats=10):
    """Measured matmul throughput (FLOP/s): the fastest of `repeats` timed n x n @ n x n products after a
    warm-up. The MFU denominator: a large square matmul is the fastest thing the machine does in this dtype. The
    fastest, not the median: on a shared machine a slow repeat measures the neighbours, not the peak."""
    n = n or (8192 if device == "cuda" else 2048)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    c = a @ b
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times)


# --- peak memory -----------------------------------------------------------------------------------------------


def _status_kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak bytes over the memory held at start(): `with PeakMemory(device) as m: ...` then m.peak, or
    m.start() ... m.stop() from callbacks (see MEMORY_METHOD)."""

    def __init__(self, device):
        self.device, self.peak, self.base = device, None, None

    def start(self):
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            self.base = _status_kb("VmRSS") * 1024
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        return self

    def stop(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = _status_kb("VmHWM") * 1024 - self.base
        return self.peak

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


# --- data --------------------------------------------------------------------------------------------------------


def clinical_pairs(tok, n_pairs, seed=0, smoke=False):
    """n_pairs preference pairs of the clinical set, the tasks taken in turn (one of each task per 4 pairs)
    so that the batch has the set's mix of lengths. Smoke: prompts cut to their last 24 tokens and
    completions to 8 (the byte-level smoke tokenizer makes ~5x more tokens)."""
    pairs = read_preferences(CLINICAL, tok)
    rng = random.Random(seed)
    rng.shuffle(pairs)
    tasks = sorted({p.meta.get("task", "") for p in pairs})
    by_task = {t: [p for p in pairs if p.meta.get("task", "") == t] for t in tasks}
    out = [by_task[tasks[i % len(tasks)]][i // len(tasks)] for i in range(n_pairs)]
    if smoke:
        out = [PrefExample(p.prompt_ids[-24:], p.chosen_ids[:8], p.rejected_ids[:8], p.meta) for p in out]
        out = [p if p.chosen_ids != p.rejected_ids else PrefExample(p.prompt_ids, p.chosen_ids, p.rejected_ids[:-1],
                                                                      p.meta) for p in out]
    return out


def balanced_pairs(tok, n_pairs, length):
    """Prompt as long as the answer: `length` tokens each of prompt, chosen and rejected, cut in turn from the
    token stream of the clinical prompts (real text; the pairs' meaning does not matter to a step's cost)."""
    stream = [t for p in read_preferences(CLINICAL, tok) for t in p.prompt_ids]
    out = []
    for i in range(n_pairs):
        s = stream[3 * i * length:3 * (i + 1) * length]
        out.append(PrefExample(s[:length], s[length:2 * length], s[2 * length:], {"task": "balanced"}))
    return out


def sft_from_pairs(pairs):
    """The SFT side of equal work: prompt + chosen of the same pairs, the chosen completion as target."""
    return [SFTExample(p.prompt_ids + p.chosen_ids, [False] * len(p.prompt_ids) + [True] * len(p.chosen_ids))
            for p in pairs]


def load_shape(name, tok, n_pairs, smoke):
    if name == "clinical":
        return clinical_pairs(tok, n_pairs, smoke=smoke)
    if name == "balanced":
        return balanced_pairs(tok, n_pairs, 8 if smoke else 64)
    raise ValueError(f"unknown data shape {name!r} (clinical, balanced)")


def shape_stats(pairs):
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"pairs": len(pairs), "prompt_mean": mean([len(p.prompt_ids) for p in pairs]),
            "chosen_mean": mean([len(p.chosen_ids) for p in pairs]),
            "rejected_mean": mean([len(p.rejected_ids) for p in pairs])}


# --- the smoke checkpoint ----------------------------------------------------------------------------------------


def tiny_checkpoint(out_dir):
    """A tiny random Llama (2 layers, dim 64, GQA, tied embeddings) + a byte-level BPE tokenizer with a ChatML
    template, written by minift.save_hf as an HF checkpoint dir that minift and transformers both load."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from minift.model.checkpoint import save_hf
    from minift.model.config import ModelConfig
    from minift.model.transformer import Transformer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}  # 256 byte tokens
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<|im_start|>", "<|im_end|>"])  # ids 256..259
    tok.save(str(out_dir / "tokenizer.json"))
    template = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|im_end|>",
         "pad_token": "</s>", "chat_template": template, "model_max_length": 4096}, indent=2))
    cfg = ModelConfig(vocab_size=260, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160, max_seq_len=512,
                      tie_embeddings=True, extra={"bos_token_id": 256, "eos_token_id": 259, "pad_token_id": 257})
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.02)  # the usual init scale: logits start near uniform
    save_hf(model, None, out_dir)
    return out_dir


# --- the FLOP model ----------------------------------------------------------------------------------------------


# Dims and pass_flops live in minift/study/flops.py (the study reports a run's compute with them).
from minift.study.flops import Dims, pass_flops  # noqa: E402,F401


def attn_pairs(batch):
    """(query, key) pairs attended in one layer: the explicit mask's True count, else causal over the padded rows."""
    B, T = batch.ids.shape
    return int(batch.mask.sum()) if batch.mask is not None else B * T * (T + 1) // 2


def make_batches(pairs, pad_id):
    return {"sft": sft_batch(sft_from_pairs(pairs), pad_id), "concat": dpo_batch(pairs, "concat", pad_id),
            "shared-prompt": dpo_batch(pairs, "shared-prompt", pad_id)}


def data_tokens(pairs, kind):
    """Tokens of data a step consumes, for tokens/s: SFT prompt + chosen; DPO prompt + chosen + rejected (the
    prompt once, whatever the layout computes)."""
    return sum(len(p.prompt_ids) + len(p.chosen_ids) + (len(p.rejected_ids) if kind == "dpo" else 0) for p in pairs)


def write_json(name, smoke, payload, path=None):
    out = Path(path) if path else RESULTS / (f"{name}_smoke.json" if smoke else f"{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    return out
