"""Generation with the KV cache: greedy, or temperature + top-p sampling; batched with left padding.

    python -m minift.generate --prompt "What is the capital of France?"   # embedded default model
    python -m minift.generate --ckpt DIR --prompt "..." --temperature 0.7 --top-p 0.9
"""
import argparse
import sys

import torch

from minift.model import KVCache


def sample_next(logits, temperature=0.0, top_p=1.0, generator=None):
    """logits (B, V) -> next token ids (B,). temperature 0 = greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        # Nucleus: keep the smallest set of most likely tokens whose mass reaches top_p.
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # mass before this token already reaches top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens=128, temperature=0.0, top_p=1.0, seed=None,
             stop_ids=None, on_token=None):
    """prompts: list of token-id lists -> list of the new token ids per prompt (stop token excluded).

    Prompts are left-padded to one length; padded keys are masked out and positions count real tokens only,
    so every row computes what it would compute alone. `on_token(next_ids)` is called after each step."""
    device = model.embed.weight.device
    B, L = len(prompts), max(len(p) for p in prompts)
    stop = torch.tensor(sorted(tokenizer.stop_ids if stop_ids is None else stop_ids), dtype=torch.long,
                        device=device)
    ids = torch.full((B, L), tokenizer.pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(B, L + max_new_tokens, dtype=torch.bool, device=device)  # which cache slots hold tokens
    for row, p in enumerate(prompts):
        ids[row, L - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[row, L - len(p):L] = True
    positions = (valid[:, :L].long().cumsum(1) - 1).clamp(min=0)  # (B, L): 0 at each row's first real token
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    # Pad queries may see themselves, so that no attention row is empty (an empty row gives NaN in SDPA).
    mask = (causal & valid[:, None, :L]) | torch.eye(L, dtype=torch.bool, device=device)  # (B, L, L)
    cache = KVCache(model.config, B, L + max_new_tokens, model.embed.weight.dtype, device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    hidden = model(ids, positions, mask, cache)
    logits = model.lm_head(hidden[:, -1])  # (B, V)
    out = torch.empty(B, 0, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    pos = positions[:, -1:]  # (B, 1)
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, generator)
        nxt = torch.where(finished, torch.full_like(nxt, tokenizer.pad_id), nxt)
        out = torch.cat([out, nxt[:, None]], dim=1)
        finished |= torch.isin(nxt, stop)
        if on_token is not None:
            on_token(nxt)
        if finished.all() or step == max_new_tokens - 1:
            break
        valid[:, L + step] = True
        pos = pos + 1
        hidden = model(nxt[:, None], pos, valid[:, None, :L + step + 1], cache)
        logits = model.lm_head(hidden[:, -1])
    results = []
    for row in out.tolist():
        hit = [i for i, t in enumerate(row) if t in set(stop.tolist())]
        results.append(row[:hit[0]] if hit else row)
    return results


def main(argv=None):
    from minift.checkpoint import load

    ap = argparse.ArgumentParser(description="Chat with a checkpoint (its chat template applied); streams the answer.")
    ap.add_argument("--ckpt", default=None, help="HF checkpoint dir (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--adapter", default=None, help="a LoRA adapter dir (PEFT format) to apply")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--system", default=None, help="an optional system message")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args(argv)
    model, tok = load(args.ckpt)
    if args.adapter:
        from minift.lora import load_adapter

        load_adapter(model, args.adapter)
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    messages.append({"role": "user", "content": args.prompt})
    prompt = tok.encode_chat(messages, add_generation_prompt=True)
    new, printed = [], ""

    def stream(nxt):
        nonlocal printed
        if nxt.item() in tok.stop_ids:
            return
        new.append(nxt.item())
        text = tok.decode(new, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait until a multi-byte character is complete
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text

    generate(model, tok, [prompt], args.max_new_tokens, args.temperature, args.top_p, args.seed, on_token=stream)
    sys.stdout.write("\n")


if __name__ == "__main__":
    from minift.errors import run_cli

    run_cli(main)
