"""Generation with the KV cache: greedy, or temperature + top-p sampling; batched with left padding.

    python -m minift.generate --prompt "What is the capital of France?"   # embedded default model
    python -m minift.generate --ckpt DIR --prompt "..." --temperature 0.7 --top-p 0.9
    python -m minift.generate --device cpu --dtype float32 --prompt "..."  # default: a GPU and bf16 if any
"""
import sys
from pathlib import Path

import torch

from minift.errors import MinifTError
from minift.model.transformer import KVCache


def sample_next(logits, temperature=0.0, top_p=1.0, generator=None, uniform=None):
    """logits (B, V) -> next token ids (B,). temperature 0 = greedy.

    Sampling inverts each row's CDF at one uniform number per row: `uniform` (B,), or drawn from `generator`.
    Handing the uniforms in lets generate() draw one per original row at every step and give each live row its
    own, so a row's tokens do not depend on which other rows are still in the batch."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        # Nucleus: keep the smallest set of most likely tokens whose mass reaches top_p.
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # mass before this token already reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)  # (not sorted_p[drop] = 0: a boolean index syncs)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    if uniform is None:
        uniform = torch.rand(probs.shape[0], generator=generator, device=probs.device)
    cdf = probs.cumsum(-1)  # (B, V)
    # The first token whose CDF exceeds u * total mass; a zero-probability token never does (its CDF equals
    # its predecessor's). The clamp covers u * total rounding up to the total.
    target = (uniform.to(cdf.dtype) * cdf[:, -1])[:, None]  # (B, 1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def _keep_rows(cache, idx):
    """Keep only the cache rows `idx` (live,) : k, v (n_layers, B, n_kv, S, hd) -> (n_layers, live, ...)."""
    cache.k, cache.v = cache.k.index_select(1, idx), cache.v.index_select(1, idx)
    cache.positions = cache.positions.index_select(0, idx)  # (B, S) -> (live, S)


@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens=128, temperature=0.0, top_p=1.0, seed=None,
             stop_ids=None, on_tokens=None, check_every=None, num_samples=1, drop_finished=True):
    """prompts: list of token-id lists -> list of the new token ids per row (stop token excluded); with
    num_samples=k, B*k rows grouped per prompt (rows b*k .. b*k+k-1 answer prompt b).

    Prompts are left-padded to one length; padded keys are masked out and positions count real tokens only,
    so every row computes what it would compute alone. A prompt's prefill is computed once: its cache rows
    are then copied k times, and the k*B rows decode as k copies of the prompt would. The decode loop never
    waits for the device, except every `check_every` tokens (default: 16 on a GPU, 1 on the CPU, where there
    is no device to wait for): there it asks whether every row has stopped, calls `on_tokens(new)` with the
    tokens since the last call, new (B*k, n), and (drop_finished) takes rows that have stopped out of the
    batch, so that later steps compute only live rows. A stopped row emits pads; they are cut off at the end.

    Sampling draws, at every step, one uniform number per row of the full B*k batch (stopped rows included),
    so a row's tokens depend on the seed and its row index only: not on row dropping, on check_every, or on
    whether its prompt was given k times or once with num_samples=k."""
    device = model.embed.weight.device
    if check_every is None:
        check_every = 1 if device.type == "cpu" else 16
    stop_list = sorted(tokenizer.stop_ids if stop_ids is None else stop_ids)
    B, L, K = len(prompts), max(len(p) for p in prompts), num_samples
    # The padded batch is built on the host and copied once (not one small copy per prompt).
    ids = torch.full((B, L), tokenizer.pad_id, dtype=torch.long)
    valid = torch.zeros(B, L + max_new_tokens, dtype=torch.bool)  # which cache slots hold tokens
    for row, p in enumerate(prompts):
        ids[row, L - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[row, L - len(p):L] = True
    ids, valid = ids.to(device), valid.to(device)
    stop = torch.tensor(stop_list, dtype=torch.long, device=device)
    positions = (valid[:, :L].long().cumsum(1) - 1).clamp(min=0)  # (B, L): 0 at each row's first real token
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    # Pad queries may see themselves, so that no attention row is empty (an empty row gives NaN in SDPA).
    mask = (causal & valid[:, None, :L]) | torch.eye(L, dtype=torch.bool, device=device)  # (B, L, L)
    cache = KVCache(model.config, B, L + max_new_tokens, model.embed.weight.dtype, device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    hidden = model(ids, positions, mask, cache)
    logits = model.lm_head(hidden[:, -1])  # (B, V)
    pos = positions[:, -1:]  # (B, 1)
    if K > 1:
        # One prefill per prompt, then k copies of its rows, each group of k next to each other:
        # cache k, v (n_layers, B, n_kv, S, hd) -> (n_layers, B*k, n_kv, S, hd); positions (B, S) -> (B*k, S);
        # valid (B, L + max_new) -> (B*k, ...); logits (B, V) -> (B*k, V); pos (B, 1) -> (B*k, 1).
        cache.k, cache.v = cache.k.repeat_interleave(K, dim=1), cache.v.repeat_interleave(K, dim=1)
        cache.positions = cache.positions.repeat_interleave(K, dim=0)
        valid, logits, pos = (t.repeat_interleave(K, dim=0) for t in (valid, logits, pos))
    N = B * K
    out = torch.full((N, max_new_tokens), tokenizer.pad_id, dtype=torch.long, device=device)  # (N, max_new)
    finished = torch.zeros(N, dtype=torch.bool, device=device)  # per live row
    live = torch.arange(N, device=device)  # (n_live,): the original row of each live row
    n = reported = 0
    for step in range(max_new_tokens):
        # One uniform per original row, the live ones picked: the same draws whichever rows are live.
        uniform = None if temperature <= 0 else torch.rand(N, generator=generator, device=device)[live]
        nxt = sample_next(logits, temperature, top_p, generator, uniform)  # (n_live,), stays on the device
        nxt = nxt.masked_fill(finished, tokenizer.pad_id)  # a stopped row emits pads
        out[live, step] = nxt
        finished |= torch.isin(nxt, stop)
        n = step + 1
        if n == max_new_tokens:
            break
        if n % check_every == 0:
            # The one host-device sync of the loop: the host waits for the device here, every check_every tokens.
            if on_tokens is not None:
                on_tokens(out[:, reported:n])
                reported = n
            n_done = int(finished.sum())
            if n_done == finished.numel():
                break
            # Drop stopped rows once they are a quarter of the batch (or at the GPU's sparser checks, any): each
            # drop copies the whole cache, so on the CPU, checking every token, it waits for several to stop.
            if drop_finished and n_done and (check_every > 1 or 4 * n_done >= finished.numel()):
                keep = (~finished).nonzero().squeeze(1)  # (n_live',) indices into the current batch
                _keep_rows(cache, keep)
                valid, pos, nxt, live = (t.index_select(0, keep) for t in (valid, pos, nxt, live))
                finished = finished.index_select(0, keep)
        valid[:, L + step] = True
        pos = pos + 1
        hidden = model(nxt[:, None], pos, valid[:, None, :L + step + 1], cache)
        logits = model.lm_head(hidden[:, -1])
    if on_tokens is not None and reported < n:
        on_tokens(out[:, reported:n])
    results = []
    stop_set = set(stop_list)
    for row in out[:, :n].tolist():  # one copy to the host
        hit = next((i for i, t in enumerate(row) if t in stop_set), None)
        results.append(row[:hit] if hit is not None else row)
    return results


def load_for_generation(ckpt=None, adapter=None, device="auto", dtype="auto"):
    """(model in eval mode, tokenizer) on the picked device and dtype (defaults.pick_device / pick_dtype: a GPU
    and bf16 where there is one, else the CPU and fp32), with a LoRA adapter applied. Paths are checked first."""
    from minift.model.checkpoint import load
    from minift.defaults import pick_device, pick_dtype

    if ckpt is not None:
        if not Path(ckpt).is_dir():
            raise MinifTError(f"--ckpt {ckpt}: {'not a directory' if Path(ckpt).exists() else 'not found'} "
                              "(an HF checkpoint dir: config.json, *.safetensors, tokenizer.json)")
        if not (Path(ckpt) / "tokenizer.json").is_file():
            raise MinifTError(f"--ckpt {ckpt}: no tokenizer.json (generation needs the checkpoint's tokenizer)")
    if adapter is not None and not Path(adapter).is_dir():
        raise MinifTError(f"--adapter {adapter}: {'not a directory' if Path(adapter).exists() else 'not found'} "
                          "(a PEFT adapter dir: adapter_config.json, adapter_model.safetensors)")
    device = pick_device(device)
    model, tok = load(ckpt, dtype=pick_dtype(dtype, device), device=device)
    if adapter is not None:
        from minift.model.lora import load_adapter

        load_adapter(model, adapter)
    return model.eval(), tok


def main(argv=None):
    from minift.args import DTYPES, SEED, ArgumentParser, device, number

    ap = ArgumentParser(prog="minift-generate",
                        description="Chat with a checkpoint (its chat template applied); streams the answer.")
    ap.add_argument("--ckpt", default=None, help="HF checkpoint dir (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--adapter", default=None, help="a LoRA adapter dir (PEFT format) to apply")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--system", default=None, help="an optional system message")
    ap.add_argument("--max-new-tokens", type=number(int, ge=1, le=1_000_000), default=128)
    ap.add_argument("--temperature", type=number(float, ge=0), default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=number(float, gt=0, le=1), default=1.0)
    ap.add_argument("--seed", type=SEED, default=None)
    ap.add_argument("--device", type=device, default="auto", help="auto (a GPU if there is one), cpu, cuda[:N]")
    ap.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bf16 on a GPU, fp32 on the CPU")
    args = ap.parse_args(argv)
    model, tok = load_for_generation(args.ckpt, args.adapter, args.device, args.dtype)
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    messages.append({"role": "user", "content": args.prompt})
    prompt = tok.encode_chat(messages, add_generation_prompt=True)
    new, printed, stopped = [], "", False

    def stream(chunk):  # chunk (1, k): the tokens since the last call
        nonlocal printed, stopped
        for t in chunk[0].tolist():
            stopped = stopped or t in tok.stop_ids
            if not stopped:
                new.append(t)
        text = tok.decode(new, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait until a multi-byte character is complete
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text

    generate(model, tok, [prompt], args.max_new_tokens, args.temperature, args.top_p, args.seed, on_tokens=stream)
    sys.stdout.write("\n")

