"""GGUF export, checked with the real client: llama.cpp (llama-cpp-python) against minift on the clinical test set.

For one checkpoint + adapter, exports f16 and q8_0 GGUF files (minift/model/export.py), then answers every test
prompt three ways with greedy decoding: minift (the adapter applied, as `python -m minift.evaluate` runs it) and
llama.cpp on each file, through create_chat_completion, so that the prompt is formatted by llama.cpp's handling
of the GGUF's own chat template, not by minift. Prints and writes (bench/results/bench_export.json): the share of
answers identical to minift's, each task's primary metric from each runtime, and generation speed.

Speed: generated tokens / wall seconds over the same prompts, one prompt at a time for both (llama.cpp serves
one sequence per call; minift also at batch 1 so the rows compare), on the CPU threads this machine gives;
minift's batched evaluation (its default batch 16) is reported beside it.

    python bench/bench_export.py --adapter runs/export/dpo            # all 480 items
    python bench/bench_export.py --adapter runs/export/dpo --limit 5  # a smoke run
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script from anywhere: import minift from this checkout

import torch  # noqa: E402

from minift.eval.evaluate import EvalConfig, load_items, messages  # noqa: E402
from minift.model.export import export_gguf  # noqa: E402
from minift.study.report import PRIMARY  # noqa: E402
from minift.tasks import TASKS  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def minift_answers(model, tok, items, batch_size):
    """{task: [(text, n generated tokens)]}, greedy, longest prompts first in batches (as evaluate does)."""
    from minift.eval.generate import generate

    out, tokens, start = {}, 0, time.perf_counter()
    for name, rows in items.items():
        prompts = [tok.encode_chat(messages(r), add_generation_prompt=True) for r in rows]
        order = sorted(range(len(rows)), key=lambda i: -len(prompts[i]))
        texts = [""] * len(rows)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            new = generate(model, tok, [prompts[i] for i in idx], max_new_tokens=TASKS[name].max_new_tokens,
                           temperature=0.0)
            for i, ids in zip(idx, new):
                texts[i] = tok.decode(ids, skip_special_tokens=True).strip()
                tokens += len(ids)
        out[name] = texts
    return out, tokens, time.perf_counter() - start


def no_extra_buffers():
    """Load weights into plain CPU buffers (llama_model_params.use_extra_bufts = False).

    The default puts quantized weights into 'extra' buffer types (AMX int8 tiles, repacked blocks) where the CPU
    reports them; on the machine these figures come from, a llama.cpp built with its defaults segfaults in the
    first decode of a q8_0 (or the upstream Q4_1) file that way, f16 and f32 files run either way."""
    from llama_cpp import llama_cpp as low

    if getattr(low.llama_model_default_params, "plain", False):
        return
    default = low.llama_model_default_params

    def plain():
        params = default()
        params.use_extra_bufts = False
        return params
    plain.plain = True
    low.llama_model_default_params = plain


def llama_answers(path, items, threads):
    from llama_cpp import Llama

    no_extra_buffers()
    llm = Llama(model_path=str(path), n_ctx=2048, n_threads=threads, n_batch=512, seed=0, verbose=False)
    out, tokens, start = {}, 0, time.perf_counter()
    for name, rows in items.items():
        texts = []
        for r in rows:
            res = llm.create_chat_completion(messages=messages(r), temperature=0.0, top_k=1,
                                             max_tokens=TASKS[name].max_new_tokens, repeat_penalty=1.0)
            texts.append((res["choices"][0]["message"]["content"] or "").strip())
            tokens += res["usage"]["completion_tokens"]
        out[name] = texts
    seconds = time.perf_counter() - start
    fmt = llm.chat_format
    del llm
    return out, tokens, seconds, fmt


def scores(items, answers):
    return {name: TASKS[name].metrics([TASKS[name].score(r, t) for r, t in zip(rows, answers[name])])[PRIMARY[name]]
            for name, rows in items.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default=None, help="HF checkpoint dir (default: the embedded model)")
    p.add_argument("--adapter", default=None, help="LoRA adapter dir merged into the export")
    p.add_argument("--limit", type=int, default=None, help="first N items of each task (default: all 120)")
    p.add_argument("--speed-limit", type=int, default=10, help="items per task for the batch-1 speed rows")
    p.add_argument("--types", default="f16,q8_0")
    p.add_argument("--out", default=str(RESULTS / "bench_export.json"))
    args = p.parse_args(argv)

    from minift.eval.generate import load_for_generation

    threads = torch.get_num_threads()
    items = load_items(EvalConfig(limit=args.limit))
    speed_items = {k: v[:args.speed_limit] for k, v in items.items()}
    model, tok = load_for_generation(args.ckpt, args.adapter, "cpu", "float32")
    ref, ref_tokens, ref_s = minift_answers(model, tok, items, 16)
    _, one_tokens, one_s = minift_answers(model, tok, speed_items, 1)
    del model
    result = {"date": date.today().isoformat(), "ckpt": args.ckpt or "embedded SmolLM2-135M-Instruct",
              "adapter": args.adapter, "items": sum(map(len, items.values())),
              "conditions": {"cpu": platform.processor() or platform.machine(), "threads": threads,
                             "torch": torch.__version__, "llama_cpp_python": _version("llama_cpp_python"),
                             "gguf": _version("gguf"), "llama_cpp_extra_buffers": False},
              "minift": {"primary": scores(items, ref), "tokens": ref_tokens, "seconds": round(ref_s, 1),
                         "tokens_per_s_batch16": round(ref_tokens / ref_s, 1),
                         "tokens_per_s_batch1": round(one_tokens / one_s, 1)},
              "gguf": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for t in args.types.split(","):
            path = export_gguf(args.ckpt, Path(tmp) / f"export-{t}.gguf", t, args.adapter)
            size = path.stat().st_size
            ans, n, s, fmt = llama_answers(path, items, threads)
            _, n1, s1, _ = llama_answers(path, speed_items, threads)
            same = {k: sum(a == b for a, b in zip(ans[k], ref[k])) / len(ref[k]) for k in ref}
            total_same = sum(a == b for k in ref for a, b in zip(ans[k], ref[k])) / result["items"]
            prim = scores(items, ans)
            result["gguf"][t] = {"file_mib": round(size / 2**20, 1), "chat_format": fmt,
                                 "identical": round(total_same, 4), "identical_by_task": same,
                                 "primary": prim,
                                 "primary_diff": {k: round(prim[k] - result["minift"]["primary"][k], 4) for k in prim},
                                 "tokens": n, "seconds": round(s, 1), "tokens_per_s": round(n1 / s1, 1),
                                 "tokens_per_s_all": round(n / s, 1),
                                 "speed_vs_minift_batch1": round((n1 / s1) / (one_tokens / one_s), 2),
                                 "differing": [{"task": k, "id": r["id"], "minift": a, "llama.cpp": b}
                                               for k, rows in items.items()
                                               for r, a, b in zip(rows, ref[k], ans[k]) if a != b][:20]}
    text = json.dumps(result, indent=2)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


def _version(name):
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
