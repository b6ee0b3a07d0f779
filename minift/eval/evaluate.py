"""Evaluate a checkpoint (optionally with a LoRA adapter) on the clinical tasks: run the model, score it.

    python -m minift.evaluate --task all --limit 20                      # embedded base model
    python -m minift.evaluate --ckpt DIR --adapter runs/sft --task triage --out runs/eval/sft
    python -m minift.evaluate --task reasoning --data medqa_test.jsonl    # real MedQA rows work too
    python -m minift.evaluate compare runs/eval/base runs/eval/sft       # paired significance, B - A
    python -m minift.evaluate rescore runs/eval/base                     # re-score saved outputs

Greedy decoding with the KV cache and the chat template. Each run directory gets predictions.jsonl (one
record per item: the raw output, the parsed answer, correctness, per-item metrics) and summary.json.
Comparing two runs and re-scoring one live in minift/eval/compare.py (same command, subcommands compare/rescore).
"""
from __future__ import annotations

import codecs
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from minift.defaults import DATA_DIR
from minift.errors import MinifTError
from minift.tasks import TASKS, get_task


@dataclass
class EvalConfig:
    ckpt: str | None = None      # HF checkpoint dir; None = embedded SmolLM2-135M-Instruct
    adapter: str | None = None   # LoRA adapter dir (PEFT format)
    task: str = "all"            # one task name or "all"
    split: str = "test"          # reads data/<task>/<split>.jsonl unless --data is given
    data: str | list | None = None  # a JSONL file (or a list of them) instead of the bundled ones
    limit: int | None = None     # first N items of each task
    batch_size: int = 16         # decode reads all weights per step: bigger batches amortize it
    out: str | None = None       # default runs/eval/<model>_<task>
    max_new_tokens: int | None = None  # default: the task's own
    device: str = "auto"         # auto: a GPU if there is one (defaults.pick_device)
    dtype: str = "auto"          # auto: bf16 on a GPU, fp32 on the CPU (defaults.pick_dtype)


# ---------------------------------------------------------------------------------------------- data
def read_jsonl(path: Path) -> list[tuple[int, object]]:
    """[(line number, parsed row)]; blank lines skipped; a UTF-8 byte-order mark at the start is accepted."""
    path = Path(path)
    if not path.is_file():
        raise MinifTError(f"{path}: {'a directory, not a JSONL file' if path.is_dir() else 'file not found'}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MinifTError(f"{path}: cannot read ({e.strerror})") from None
    data = data.removeprefix(codecs.BOM_UTF8)  # Windows editors and spreadsheet exports write a BOM
    rows = []
    for n, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MinifTError(f"{path}:{n}: not UTF-8 text (save the file as UTF-8)") from None
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise MinifTError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    if not rows:
        raise MinifTError(f"{path}: no rows (empty file)")
    return rows


def answer_text(chosen) -> str:
    """A preference row's chosen completion as text (a string, or the content of its last message)."""
    if isinstance(chosen, str):
        return chosen
    return str(chosen[-1].get("content", "")) if chosen and isinstance(chosen[-1], dict) else ""


def load_items(cfg: EvalConfig) -> dict[str, list[dict]]:
    """{task name: validated test rows}, each row with an id. Errors name the file and line."""
    names = list(TASKS) if cfg.task == "all" else [get_task(cfg.task).name]
    sources = [(n, DATA_DIR / n / f"{cfg.split}.jsonl") for n in names]
    if cfg.data:  # files whose rows say their task (or all belong to the one asked for)
        sources = [("*", Path(p)) for p in ([cfg.data] if isinstance(cfg.data, (str, Path)) else cfg.data)]
    out: dict[str, list[dict]] = {}
    seen: dict[str, set] = {}
    for key, path in sources:
        for n, row in read_jsonl(path):
            where = f"{path}:{n}"
            name = row.get("task") if isinstance(row, dict) else None
            if key != "*":
                name = key
            elif name is None:
                if cfg.task == "all":
                    raise MinifTError(f"{where}: row has no 'task' field; pass --task NAME for this file")
                name = cfg.task
            elif not isinstance(name, str) or name not in TASKS:
                raise MinifTError(f"{where}: unknown task {name!r}; choose one of {', '.join(TASKS)}")
            if cfg.task != "all" and name != cfg.task:
                continue  # a mixed file: keep the asked-for task only
            task = TASKS[name]
            if isinstance(row, dict) and "answer" not in row and isinstance(row.get("chosen"), (str, list)):
                row = dict(row, answer=answer_text(row["chosen"]))  # a preference row: its chosen is the gold
            row = task.normalize_row(row, where)
            task.check_row(row, where)
            check_row(task, row, where)
            row = dict(row, id=str(row.get("id", where)))
            if row["id"] in seen.setdefault(name, set()):
                raise MinifTError(f"{where}: duplicate id {row['id']!r} (items are paired across runs by id)")
            seen[name].add(row["id"])
            if cfg.limit is None or len(out.get(name, [])) < cfg.limit:
                out.setdefault(name, []).append(row)
    if not out:
        raise MinifTError(f"{cfg.data}: no rows for task {cfg.task!r}")
    return out


def check_row(task, row: dict, where: str) -> None:
    """What the task's own check leaves open, found before the model runs rather than after: prompt messages
    a chat template can read, a gold label the task knows, and fields its scorer can read (scored once on an
    empty answer)."""
    if isinstance(row["prompt"], list):
        for m in row["prompt"]:
            if not (isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise MinifTError(f"{where}: each prompt message needs 'role' and 'content' strings, got {m}")
    labels = getattr(task, "labels", None)
    if labels and "label" in row and row["label"] not in labels:
        raise MinifTError(f"{where}: label {row['label']!r} is not one of {', '.join(labels)}")
    if isinstance(row.get("options"), dict) and "label" in row and row["label"] not in row["options"]:
        raise MinifTError(f"{where}: label {row['label']!r} is not one of the options {', '.join(row['options'])}")
    try:
        task.score(row, "")
    except Exception as e:  # noqa: BLE001  the scorer is pure Python on this row: any failure is the row's
        raise MinifTError(f"{where}: task {task.name!r} cannot score this row ({type(e).__name__}: {e})") from None


def messages(row: dict) -> list[dict]:
    return [{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str) else row["prompt"]


# ---------------------------------------------------------------------------------------------- model
def load_model(cfg: EvalConfig):
    """(model, tokenizer) on cfg.device in cfg.dtype, with cfg.adapter applied."""
    from minift.eval.generate import load_for_generation

    return load_for_generation(cfg.ckpt, cfg.adapter, cfg.device, cfg.dtype)


def generate_all(model, tok, rows: list[dict], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers for all rows; batches of similar length, so little padding is computed."""
    from minift.eval.generate import generate

    prompts = [tok.encode_chat(messages(r), add_generation_prompt=True) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: -len(prompts[i]))
    outs: list[str] = [""] * len(rows)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        new = generate(model, tok, [prompts[i] for i in idx], max_new_tokens=max_new_tokens, temperature=0.0)
        for i, ids in zip(idx, new):
            outs[i] = tok.decode(ids, skip_special_tokens=True).strip()
    return outs


def run_name(cfg: EvalConfig) -> str:
    model = Path(cfg.adapter or cfg.ckpt).name if (cfg.adapter or cfg.ckpt) else "base"
    return f"{model}_{cfg.task}"


def evaluate(cfg: EvalConfig, model=None, tok=None) -> dict:
    """Run the evaluation; write predictions.jsonl and summary.json; return the summary."""
    items = load_items(cfg)  # validate data and --out before the (slow) model load
    out_dir(cfg.out or Path("runs") / "eval" / run_name(cfg), create=False)
    if model is None:
        model, tok = load_model(cfg)
    outputs, seconds = {}, {}
    for name, rows in items.items():
        t0 = time.perf_counter()
        outputs[name] = generate_all(model, tok, rows, cfg.max_new_tokens or TASKS[name].max_new_tokens,
                                     cfg.batch_size)
        seconds[name] = round(time.perf_counter() - t0, 1)
    return write_run(cfg, items, outputs, seconds)


def out_dir(path, create=True) -> Path:
    """Create the output directory (or, create=False, check that it can be); a file there or above it is one
    clear error."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MinifTError(f"--out {path}: a file, not a directory")
    above = next(p for p in path.absolute().parents if p.exists())
    if not above.is_dir():
        raise MinifTError(f"--out {path}: cannot create the directory ({above} is a file)")
    if not create:
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where a parent directory should be, no permission ...
        raise MinifTError(f"--out {path}: cannot create the directory ({e.strerror})") from None
    return path


def write_run(cfg: EvalConfig, items: dict, outputs: dict, seconds: dict) -> dict:
    """Score the outputs; write predictions.jsonl (one record per item) and summary.json."""
    out = out_dir(cfg.out or Path("runs") / "eval" / run_name(cfg))
    summary = {"config": asdict(cfg), "tasks": {}}
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for name, rows in items.items():
            task = TASKS[name]
            records = [{"task": name, "id": row["id"], "output": text, **task.score(row, text)}
                       for row, text in zip(rows, outputs[name])]
            f.writelines(json.dumps(rec) + "\n" for rec in records)
            summary["tasks"][name] = {"n": len(records), **task.metrics(records), "seconds": seconds.get(name),
                                      "unparsed": [r["id"] for r in records if not r["parsed"]]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    summary["out"] = str(out)
    return summary


# ---------------------------------------------------------------------------------------------- CLI
def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"evaluation -> {summary.get('out', '')}")
    for col in ("task", "n", "metrics", "unparsed", "seconds"):
        table.add_column(col)
    for name, s in summary["tasks"].items():
        mets = "  ".join(f"{k}={v:.3f}" for k, v in s.items() if k not in ("n", "seconds", "unparsed"))
        secs = "-" if s.get("seconds") is None else f"{s['seconds']:.1f}"
        table.add_row(name, str(s["n"]), mets, str(len(s["unparsed"])), secs)
    Console().print(table)


def main(argv=None) -> None:
    from minift.args import DTYPES, ArgumentParser, device, number

    ap = ArgumentParser(prog="python -m minift.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default=None, help="HF checkpoint dir (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--adapter", default=None, help="LoRA adapter dir (PEFT format)")
    ap.add_argument("--task", default="all", help=f"one of {', '.join(TASKS)}, or all")
    ap.add_argument("--split", default="test", help="test, val (what the study tunes on), sft or dpo")
    ap.add_argument("--data", default=None, help="JSONL file instead of data/<task>/<split>.jsonl")
    ap.add_argument("--limit", type=number(int, ge=1), default=None, help="first N items of each task")
    ap.add_argument("--batch-size", type=number(int, ge=1), default=16)
    ap.add_argument("--max-new-tokens", type=number(int, ge=1, le=1_000_000), default=None)
    ap.add_argument("--out", default=None, help="output dir (default: runs/eval/<model>_<task>)")
    ap.add_argument("--device", type=device, default="auto", help="auto (a GPU if there is one), cpu, cuda[:N]")
    ap.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bf16 on a GPU, fp32 on the CPU")
    args = ap.parse_args(argv)
    if args.task != "all":
        get_task(args.task)  # unknown task: a clear error before anything else
    if "/" in args.split or "\\" in args.split or args.split.startswith("."):
        raise MinifTError(f"--split {args.split!r}: a split name (test, val, sft, dpo); use --data for a file")
    cfg = EvalConfig(args.ckpt, args.adapter, args.task, args.split, args.data, args.limit, args.batch_size,
                     args.out, args.max_new_tokens, args.device, args.dtype)
    summary = evaluate(cfg)
    print_summary(summary)
    for name, s in summary["tasks"].items():
        if s["unparsed"]:
            print(f"{name}: {len(s['unparsed'])} unparseable answers (counted wrong): "
                  f"{', '.join(s['unparsed'][:10])}{' ...' if len(s['unparsed']) > 10 else ''}")

