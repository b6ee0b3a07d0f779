"""The study's phases, one function each (minift/study/phases.py makes each a hashed, resumable folder): train an
arm, evaluate a model on the test (or validation) files, build the preference pairs, export an arm as GGUF."""
from __future__ import annotations

import contextlib
import sys
from dataclasses import asdict, replace
from pathlib import Path

from minift.study.config import train_config
from minift.study.phases import Phase, Tee, adapter_digest, file_digest, model_digest


def train(cfg, method, seed, ckpt_dir, ckpt_arg, data, out, adapter, log) -> Phase:
    tc = train_config(cfg, method, seed, data, out, adapter)
    tc.ckpt = ckpt_arg
    tc.check()
    parts = {k: v for k, v in asdict(tc).items() if k not in ("out", "progress", "resume", "data", "adapter",
                                                                "ckpt")}
    parts.update(data=file_digest(data), model=model_digest(ckpt_dir),
                 adapter=adapter_digest(adapter) if adapter else None, kind=method.kind)
    phase = Phase(Path(out), method.name, parts, log)

    def fn(resume):
        from minift.train.recipes import run_dpo, run_sft

        tee = Tee(sys.stderr)
        with contextlib.redirect_stderr(tee):
            (run_sft if method.kind == "sft" else run_dpo)(replace(tc, resume=resume))
        ref = [line for line in "".join(tee.text).splitlines() if "reference log-probs: computed" in line]
        ref_s = float(ref[-1].split(" in ")[1].split(" s")[0]) if ref else 0.0
        return {"reference_seconds": ref_s, "config": relative_paths(asdict(tc), Path(cfg.out))}
    phase.state_after = phase.run(fn, resumable=True)
    return phase


def relative_paths(config: dict, root: Path) -> dict:
    """The config as phase.json records it: paths inside the study folder relative to it, so that a study folder
    that is moved or copied still reads as itself (nothing reads them back to run: the study passes its paths)."""
    def rel(v):
        try:
            return str(Path(v).resolve().relative_to(root.resolve()))
        except (TypeError, ValueError):
            return v
    return {k: rel(v) if k in ("data", "out", "adapter") and v else v for k, v in config.items()}


def evaluate(cfg, name, ckpt_dir, ckpt_arg, test, tasks, out, adapter, log) -> dict:
    from minift.eval.evaluate import EvalConfig
    from minift.eval.evaluate import evaluate as run_eval

    task = tasks[0] if len(tasks) == 1 else "all"
    ec = EvalConfig(ckpt=ckpt_arg, adapter=str(adapter) if adapter else None, task=task, data=[str(t) for t in test],
                    limit=cfg.limit, out=str(out), max_new_tokens=cfg.max_new_tokens)
    parts = {"task": task, "limit": cfg.limit, "test": [file_digest(t) for t in test], "model": model_digest(ckpt_dir),
             "adapter": adapter_digest(adapter) if adapter else None, "max_new_tokens": ec.max_new_tokens}
    return Phase(Path(out), name, parts, log).run(lambda resume: {"summary": run_eval(ec)["tasks"]})


def export(cfg, name, ckpt_dir, ckpt_arg, adapter: Path, out: Path, log) -> Path:
    """The arm as one GGUF file of type cfg.export, its adapter merged (minift/model/export.py), in its own phase
    OUT/<arm>_gguf/<arm>-<type>.gguf: skipped when the adapter and the type are unchanged."""
    from minift.model.export import export_gguf

    path = out / f"{name}-{cfg.export}.gguf"
    parts = {"type": cfg.export, "model": model_digest(ckpt_dir), "adapter": adapter_digest(adapter)}
    Phase(out, f"{name} gguf", parts, log).run(lambda resume: {"file": path.name, "bytes": export_gguf(
        ckpt_arg, path, cfg.export, adapter).stat().st_size})
    return path


def matched_steps(cfg, method, ckpt_dir, sres, data, log) -> int:
    """Steps for `method` to spend the FLOPs that the arm it matches spent, by the FLOP model (minift/study/flops.py),
    at the mean cost of an example of its own data; at least one."""
    from minift.study.report import compute

    probe = train_config(cfg, method, 0, data, Path("-"), None)
    target = compute(cfg, ckpt_dir, {method.matches: sres[method.matches]})[method.matches]
    mine = compute(cfg, ckpt_dir, {"sft": {**sres["sft"], "data": str(data)}})["sft"]
    per_example = mine["train"] / mine["examples_seen"]
    steps = max(1, round((target["train"] + target["reference"]) / per_example / (probe.batch_size * probe.grad_accum)))
    log(f"  {method.name}: {steps} steps for {method.matches}'s {target['train'] + target['reference']:.3g} FLOPs")
    return steps


def make_pairs(cfg, ckpt_dir, ckpt_arg, src: Path, sft_adapter: Path | None, out: Path, seed, log) -> dict:
    from minift.study.pairs import (diagnostics_lines, imbalance_warnings, label_counts, model_sampler,
                              on_policy_pairs, read_pairs, write_pairs)

    parts = {"pairs": cfg.pairs, "data": file_digest(src), "seed": seed}
    if cfg.pairs == "on-policy":
        parts.update(k=cfg.k, temperature=cfg.temperature, model=model_digest(ckpt_dir),
                     adapter=adapter_digest(sft_adapter) if sft_adapter else None)

    def fn(resume):
        rows = read_pairs(src)
        sources = {"bundled": len(rows)}
        if cfg.pairs == "on-policy":
            from minift.model.checkpoint import load

            model, tok = load(ckpt_arg)
            if sft_adapter is not None:
                from minift.model.lora import load_adapter

                load_adapter(model, str(sft_adapter))
            rows, sources = on_policy_pairs(rows, model_sampler(model.eval(), tok, cfg.temperature), cfg.k, seed,
                                            cfg.max_new_tokens)
        write_pairs(out / "pairs.jsonl", rows)
        counts = label_counts(rows)
        warnings = imbalance_warnings(counts)
        for line in diagnostics_lines(counts) + [f"warning: {w}" for w in warnings]:
            log("  pairs: " + line)
        return {"sources": sources, "counts": counts, "warnings": warnings}
    return Phase(out, "pairs", parts, log).run(fn)
