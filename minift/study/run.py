"""The study of Savage et al. (JMIR 2025) in one command: for each model, evaluate the base, SFT, evaluate,
build preference pairs, DPO from the SFT adapter (reference = SFT), evaluate, and write the report.

    python -m minift.study                                  # embedded SmolLM2-135M, the mixed clinical set
    python -m minift.study --per-task                       # one SFT + DPO per task (the paper's design)
    python -m minift.study --ckpt A --ckpt B --seeds 0,1,2 --pairs on-policy --out runs/study
    python -m minift.study --dpo.beta 0.2 --sft.lr 1e-4     # any train_sft.py / train_dpo.py flag, prefixed
    python -m minift.study --config study.json              # {"sft": {...}, "dpo": {...}, "study": {...}}

Each phase writes its outputs into its own folder with `phase.json`, which holds a hash of the phase's inputs
(config, data, model, starting adapter). Running the same command again skips every phase whose hash
matches and redoes the ones whose inputs changed (a new --dpo.beta reruns DPO and its evaluation only). A
training phase stopped by Ctrl-C resumes from its checkpoint. Report: OUT/report.md, report.json, report.png.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

from minift.args import ArgumentParser, number, out_of_range
from minift.errors import MinifTError
from minift.study.config import METHODS, StudyConfig, data_override, train_config, units
from minift.study.flags import check_test_rows, prefixed, read_config
from minift.study.phases import resolve_ckpt
from minift.study.steps import evaluate, export, make_pairs, matched_steps, train
from minift.study.report import tune_md
from minift.study.tune import check_tune, picked_train, tune_unit
from minift.tasks import TASKS


# --------------------------------------------------------------------------------------------- the study
def check_inputs(cfg: StudyConfig):
    """Everything that can be checked before the first (slow) phase."""
    if cfg.pairs not in ("bundled", "on-policy"):
        raise MinifTError(f"--pairs must be bundled or on-policy, got {cfg.pairs!r}")
    if not cfg.seed_list():
        raise MinifTError("--seeds names no seed")
    cfg.method_list(), cfg.task_list()
    check_values(cfg)
    for ckpt in cfg.ckpt:
        if ckpt is not None:  # (the embedded default is fetched when first used)
            resolve_ckpt(ckpt)
    if cfg.test_data and not cfg.tune_only:
        if not Path(cfg.test_data).is_file():
            raise MinifTError(f"--test-data {cfg.test_data}: file not found")
        check_test_rows(cfg.test_data)
    for name, _, files in units(cfg):
        if cfg.tune:
            check_tune(cfg, files["val"])
        for kind, path in files.items():
            if kind == "val" or (kind == "test" and cfg.tune_only):  # (val: checked by --tune, which alone reads it)
                continue
            for m in cfg.method_list():
                over = cfg.train.get(m.name, {})
                if kind == ("sft" if m.kind == "sft" else "pref") and over.get("data"):
                    path = Path(over["data"])
            for p in path if kind == "test" else [path]:
                if not Path(p).is_file():
                    raise MinifTError(f"{p}: file not found")
                if Path(p).stat().st_size == 0 or not Path(p).read_text(encoding="utf-8").strip():
                    raise MinifTError(f"{p}: no rows (empty file)")


def check_values(cfg: StudyConfig):
    """The study's own settings (from flags or --config), then each arm's training config as it will run."""
    for name, kind, bounds in (("k", int, dict(ge=1)), ("temperature", float, dict(ge=0)), ("n_boot", int, dict(ge=1)),
                               ("limit", int, dict(ge=1)), ("tune_trials", int, dict(ge=1)), ("tune_min_margin", float, dict(ge=0)),
                               ("max_new_tokens", int, dict(ge=1, le=1_000_000))):
        value = getattr(cfg, name)
        if value is None and name in ("limit", "max_new_tokens"):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise MinifTError(f"{flag} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
        problem = out_of_range(value, **bounds)
        if problem:
            raise MinifTError(f"{flag} {problem}")
    if cfg.export is not None:
        from minift.model.export import TYPES

        if cfg.export not in TYPES:
            raise MinifTError(f"--export must be one of {', '.join(TYPES)}, got {cfg.export!r}")
    cfg.tune = cfg.tune or cfg.tune_only
    for name in ("per_task", "train_first", "tune", "tune_only"):
        if not isinstance(getattr(cfg, name), bool):
            raise MinifTError(f"--{name.replace('_', '-')} must be true or false, got {getattr(cfg, name)!r}")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise MinifTError(f"--out {cfg.out}: is a file, not a folder")
    arms = [m.name for m in cfg.method_list()]
    for arm in cfg.train:
        if arm not in arms:
            raise MinifTError(f"--{arm}.*: the arm {arm} is not in --methods ({cfg.methods})")
    for m in cfg.method_list():
        try:  # built as it will run (placeholder paths: the files are checked on their own)
            tc = train_config(cfg, m, cfg.seed_list()[0] if cfg.seed_list() else 0, Path("-"), Path(cfg.out), None)
            tc.data = cfg.train.get(m.name, {}).get("data")
            tc.check()
        except MinifTError as e:
            raise MinifTError(str(e).replace("--", f"--{m.name}.", 1)) from None
        except (TypeError, ValueError) as e:
            raise MinifTError(f"--{m.name}.*: {e}") from None


def write_tune(out: Path, tune: dict):
    """OUT/tune.json and tune.md, written beside themselves and renamed (a kill leaves the old or none)."""
    for name, text in (("tune.json", json.dumps(tune, indent=2, default=str) + "\n"),
                       ("tune.md", "\n".join(["# Tuning", ""] + tune_md(tune)[2:]))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)


def slug(ckpt) -> str:
    return "default" if ckpt is None else Path(ckpt).resolve().name


def run_study(cfg: StudyConfig) -> dict:
    from minift.study.report import write_report

    check_inputs(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "study.log", "a", encoding="utf-8")

    def log(msg):
        print(msg, flush=True)
        log_file.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
        log_file.flush()

    t_start = time.perf_counter()
    results = {"config": asdict(cfg), "models": {}, "tune": {}}
    methods, study = cfg.method_list(), cfg
    for ckpt in study.ckpt:
        ckpt_dir = resolve_ckpt(ckpt)
        m_out = out / slug(ckpt)
        model_res = results["models"].setdefault(slug(ckpt), {"ckpt": str(ckpt_dir), "units": {}})
        for unit, tasks, files in units(study):
            u_out = m_out / unit
            log(f"== {slug(ckpt)} / {unit}: tasks {', '.join(tasks)}")
            cfg = study
            if study.tune:  # this unit's arms run with the settings picked on its validation files
                tuned = tune_unit(study, ckpt_dir, ckpt, u_out, tasks, files, log)
                results["tune"][f"{slug(ckpt)}/{unit}"] = tuned
                write_tune(out, results["tune"])
                cfg = replace(study, train=picked_train(study, tuned))
                if study.tune_only:
                    continue
            ures = {"tasks": tasks, "base": None, "seeds": {}}
            base = evaluate(cfg, "base eval", ckpt_dir, ckpt, files["test"], tasks, u_out / "base_eval", None, log)
            ures["base"] = {"dir": str(u_out / "base_eval"), "seconds": base["seconds"]}
            for seed in cfg.seed_list():
                s_out = u_out / f"seed{seed}"
                sres, adapters, pending = {}, {"base": None}, []

                def run_evals():
                    while pending:
                        name = pending.pop(0)
                        ev = evaluate(cfg, f"{name} eval", ckpt_dir, ckpt, files["test"], tasks,
                                      s_out / f"{name}_eval", s_out / name, log)
                        sres[name]["eval_seconds"] = ev["seconds"]
                for m in methods:
                    start = adapters[m.start]
                    data = Path(data_override(cfg, m) or files[m.kind])
                    pairs = None
                    if m.kind == "pref":
                        src = data
                        pairs = make_pairs(cfg, ckpt_dir, ckpt, src, adapters.get("sft"), s_out / "pairs", seed, log)
                        data = s_out / "pairs" / "pairs.jsonl"
                    over = {k: v for k, v in cfg.train.get(m.name, {}).items() if k != "data"}
                    if m.matches:
                        over["max_steps"] = matched_steps(cfg, m, ckpt_dir, sres, data, log)
                    cfg_m = replace(cfg, train={**cfg.train, m.name: over})
                    ph = train(cfg_m, m, seed, ckpt_dir, ckpt, data, s_out / m.name, start, log)
                    adapters[m.name] = s_out / m.name
                    gguf = cfg.export and export(cfg, m.name, ckpt_dir, ckpt, s_out / m.name,
                                                 s_out / f"{m.name}_gguf", log)
                    sres[m.name] = {"train_dir": str(s_out / m.name), "eval_dir": str(s_out / f"{m.name}_eval"),
                                    "data": str(data), "gguf": gguf and str(gguf),
                                    "train_seconds": ph.state_after["seconds"],
                                    "reference_seconds": ph.state_after.get("reference_seconds", 0.0),
                                    "start": m.start, "kind": m.kind,
                                    "pairs": pairs and {k: pairs[k] for k in ("sources", "counts", "warnings")},
                                    "pairs_seconds": pairs and pairs["seconds"]}
                    pending.append(m.name)
                    if not cfg.train_first:
                        run_evals()
                run_evals()
                ures["seeds"][seed] = sres
            model_res["units"][unit] = ures
    results["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    cfg = study
    if cfg.tune_only:
        log(f"tuning: {out / 'tune.md'}, {out / 'tune.json'} (this run: {results['wall_seconds']:.0f} s)")
        log_file.close()
        return results
    paths = write_report(cfg, results, out)
    log(f"report: {', '.join(str(p) for p in paths)} (this run: {results['wall_seconds']:.0f} s)")
    log_file.close()
    return results


# --------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None) -> StudyConfig:
    ap = ArgumentParser(prog="python -m minift.study", description=__doc__.split("\n\n")[0],
                                 epilog="Training flags: --ARM.FLAG VALUE for any flag of train_sft.py (ARM sft) "
                                        "or train_dpo.py (ARM dpo), e.g. --dpo.beta 0.2 --sft.epochs 2.")
    ap.add_argument("--ckpt", action="append", default=None,
                    help="HF checkpoint dir; repeat for several models (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--per-task", action="store_true", help="one SFT + DPO per task (the paper's design)")
    ap.add_argument("--tasks", default="all", help=f"comma-separated of {', '.join(TASKS)}, or all")
    ap.add_argument("--seeds", default="0", help="training seeds, e.g. 0,1,2 (mean and spread in the report)")
    ap.add_argument("--methods", default="sft,dpo", help=f"arms, of {', '.join(METHODS)}")
    ap.add_argument("--pairs", default="bundled", help="bundled (data/*/dpo.jsonl) or on-policy (SFT samples)")
    ap.add_argument("--k", type=number(int, ge=1), default=4, help="on-policy: samples per prompt")
    ap.add_argument("--temperature", type=number(float, ge=0), default=1.0, help="on-policy: sampling temperature")
    ap.add_argument("--limit", type=number(int, ge=1), default=None, help="first N test items per task (default: all)")
    ap.add_argument("--max-new-tokens", type=number(int, ge=1, le=1_000_000), default=None, help="evaluation budget (default: each task's)")
    ap.add_argument("--test-data", default=None, help="test JSONL (rows say their task) instead of the bundled")
    ap.add_argument("--train-first", action="store_true",
                    help="train every arm of a seed before evaluating any; with a second study process on the "
                         "same --out (phases are locked), trainings and evaluations run side by side")
    ap.add_argument("--data-dir", default=None, help="a folder laid out like data/: clinical/{sft,dpo}.jsonl "
                    "(mixed design), <task>/{sft,dpo,test}.jsonl (default: the bundled data)")
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--export", default=None, metavar="TYPE",
                    help="also write each trained arm as a GGUF file for llama.cpp / Ollama (q8_0, f16, ...)")
    ap.add_argument("--tune", action="store_true", help="first choose each arm's settings on the validation set "
                    "(minift/study/tune.py: the same number of trials for every arm), then run the study with them")
    ap.add_argument("--tune-only", action="store_true", help="--tune, then stop (OUT/tune.md); reads no test file")
    ap.add_argument("--tune-trials", type=number(int, ge=1), default=4, help="trials per tuned arm (default 4)")
    ap.add_argument("--tune-space", default=None, metavar="FILE",
                    help="JSON {arm: {setting: [values]}} replacing an arm's declared search space")
    ap.add_argument("--tune-min-margin", type=number(float, ge=0), default=2.0, metavar="NATS",
                    help="a preference trial is a candidate only if it trained: its held-out chosen-rejected "
                         "margin reached NATS (default 2; 0: every trial)")
    ap.add_argument("--config", default=None, help="JSON file: {\"study\": {...}, \"sft\": {...}, \"dpo\": {...}}")
    args, rest = ap.parse_known_args(argv)
    train: dict = {}
    if args.config:
        conf = read_config(args.config, {f.name for f in fields(StudyConfig)} - {"train", "ckpt"}, METHODS)
        for k, v in conf.get("study", {}).items():
            if getattr(args, k.replace("-", "_")) == ap.get_default(k.replace("-", "_")):  # flags win
                setattr(args, k.replace("-", "_"), v)
        train = {arm: dict(v) for arm, v in conf.items() if arm != "study"}
    for arm, over in prefixed(rest, METHODS).items():  # flags win over the config file
        train.setdefault(arm, {}).update(over)
    return StudyConfig(ckpt=args.ckpt or [None], per_task=args.per_task, tasks=args.tasks, seeds=str(args.seeds),
                       methods=args.methods, pairs=args.pairs, k=args.k, temperature=args.temperature,
                       limit=args.limit, max_new_tokens=args.max_new_tokens, test_data=args.test_data,
                       data_dir=args.data_dir, train_first=args.train_first, out=args.out, export=args.export,
                       tune=args.tune, tune_only=args.tune_only, tune_trials=args.tune_trials,
                       tune_space=args.tune_space, tune_min_margin=args.tune_min_margin, train=train)


def main(argv=None):
    run_study(parse_args(argv))
