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

import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from minift.args import ArgumentParser, number, out_of_range
from minift.defaults import bundled
from minift.errors import MinifTError
from minift.study.flags import check_test_rows, prefixed, read_config
from minift.study.phases import Phase, Tee, adapter_digest, file_digest, model_digest, resolve_ckpt
from minift.tasks import TASKS, get_task


# --------------------------------------------------------------------------------------------- the arms
@dataclass(frozen=True)
class Method:
    """One arm of the study: what it starts from, its config class, its training data, fixed settings."""
    name: str
    start: str          # "base" or the name of another arm whose adapter it continues
    kind: str           # "sft" (TrainConfig, sft.jsonl) or "pref" (DPOConfig, the study's pairs)
    fixed: dict = field(default_factory=dict)  # e.g. {"loss": "simpo"}: an arm is DPO with another loss
    matches: str = ""   # a control arm: trains for as many FLOPs as this arm spent (steps set by the FLOP model)


# A new preference method is one line: {"simpo": Method("simpo", "sft", "pref", {"loss": "simpo"})}, or a run
# from the base: {"orpo": Method("orpo", "base", "pref", {"loss": "orpo"})}. Flags: --simpo.beta ...
METHODS = {"sft": Method("sft", "base", "sft"), "dpo": Method("dpo", "sft", "pref"),
           "simpo": Method("simpo", "sft", "pref", {"loss": "simpo"}),  # no reference model
           "orpo": Method("orpo", "base", "pref", {"loss": "orpo"}),  # no reference model and no SFT stage
           "kto": Method("kto", "sft", "pref", {"loss": "kto"}),  # the pairs as desirable / undesirable rows
           # The compute-matched control: SFT continued from the SFT adapter on the SFT data for the FLOPs the DPO
           # arm spent (reference pass included), so that a DPO gain can be told from a gain of more training.
           "sft-more": Method("sft-more", "sft", "sft", matches="dpo")}


PER_TASK_DPO_SFT_WEIGHT = 1.0  # the per-task design's DPO adds the chosen answers' NLL (TRL's rpo_alpha)


@dataclass
class StudyConfig:
    ckpt: list = field(default_factory=lambda: [None])  # HF checkpoint dirs; None = the embedded default
    per_task: bool = False    # one SFT + DPO per task (the paper's design), else one model on the mixed set
    tasks: str = "all"
    seeds: str = "0"
    methods: str = "sft,dpo"
    pairs: str = "bundled"    # bundled | on-policy
    k: int = 4                # on-policy: samples per prompt
    temperature: float = 1.0  # on-policy: sampling temperature
    limit: int | None = None  # first N test items per task (all by default)
    max_new_tokens: int | None = None  # generation budget of the evaluations (default: each task's own)
    test_data: str | None = None  # a test JSONL instead of the bundled one (mixed design)
    data_dir: str | None = None   # laid out like data/: clinical/{sft,dpo}.jsonl, <task>/{sft,dpo,test}.jsonl
    train_first: bool = False     # train every arm of a seed, then evaluate (a second process can evaluate)
    out: str = "runs/study"
    export: str | None = None     # a GGUF type (q8_0, f16, ...): each trained arm is also written as a GGUF file
    n_boot: int = 10000
    train: dict = field(default_factory=dict)  # {arm name: {field: value}} overrides of the training configs

    def seed_list(self):
        try:
            return [int(s) for s in str(self.seeds).split(",") if s.strip() != ""]
        except ValueError:
            raise MinifTError(f"--seeds must be comma-separated integers, got {self.seeds!r}") from None

    def method_list(self):
        names = [m.strip() for m in self.methods.split(",") if m.strip()]
        for m in names:
            if m not in METHODS:
                raise MinifTError(f"--methods: unknown method {m!r}; known: {', '.join(METHODS)}")
        for i, m in enumerate(names):
            start, match = METHODS[m].start, METHODS[m].matches
            if start != "base" and start not in names:
                raise MinifTError(f"--methods: {m} starts from {start}; add {start} to --methods")
            if match and match not in names[:i]:
                raise MinifTError(f"--methods: {m} trains for {match}'s FLOPs; put {match} before it")
        return [METHODS[m] for m in names]

    def task_list(self):
        return list(TASKS) if self.tasks == "all" else [get_task(t.strip()).name for t in self.tasks.split(",")]


def train_config(cfg: StudyConfig, method: Method, seed: int, data: Path, out: Path, adapter: Path | None):
    from minift.train.train_config import DPOConfig, TrainConfig

    cls = TrainConfig if method.kind == "sft" else DPOConfig
    over = dict(cfg.train.get(method.name, {}))
    known = {f.name for f in fields(cls)}
    for k in over:
        if k not in known:
            raise MinifTError(f"--{method.name}.{k.replace('_', '-')}: not a setting of {cls.__name__}")
    base = dict(seed=seed, data=str(data), out=str(out), progress=False)
    if method.start == "base":  # SFT, or an arm that replaces it (ORPO): SFT's epochs
        # per task: each task's 270 rows once; 3 epochs x 4 tasks would take the design past an hour
        base["epochs"] = 1.0 if cfg.per_task else TrainConfig.epochs
    if method.name == "dpo" and cfg.per_task:
        # DPO on 270 pairs of one task, from that one-epoch SFT, displaced the chosen answers without an NLL term
        # (eval split: classification's answers moved to one label); README, "how the defaults were chosen"
        base["sft_weight"] = PER_TASK_DPO_SFT_WEIGHT
    if adapter is not None:
        base["adapter"] = str(adapter)
    return cls(**{**base, **method.fixed, **over})


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


# --------------------------------------------------------------------------------------------- the study
def units(cfg: StudyConfig):
    """[(unit name, tasks, {"sft", "pref", "test"} files)]: the mixed set, or one unit per task."""
    tasks = cfg.task_list()

    def path(unit, split):
        return Path(cfg.data_dir) / unit / f"{split}.jsonl" if cfg.data_dir else bundled(unit, split)

    def files(unit, test_units):
        return {"sft": path(unit, "sft"), "pref": path(unit, "dpo"), "test": [path(t, "test") for t in test_units]}
    if cfg.per_task:
        return [(t, [t], files(t, [t])) for t in tasks]
    # The mixed model is tested on every task's whole test set, as the per-task models are: 20 items per task
    # (data/clinical/test.jsonl) leave the paired tests too little power to see a difference.
    mixed = files("clinical", tasks)
    if cfg.test_data:
        mixed["test"] = [Path(cfg.test_data)]
    return [("clinical", tasks, mixed)]


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
    if cfg.test_data:
        if not Path(cfg.test_data).is_file():
            raise MinifTError(f"--test-data {cfg.test_data}: file not found")
        check_test_rows(cfg.test_data)
    for name, _, files in units(cfg):
        for kind, path in files.items():
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
                               ("limit", int, dict(ge=1)), ("max_new_tokens", int, dict(ge=1, le=1_000_000))):
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
    for name in ("per_task", "train_first"):
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


def data_override(cfg: StudyConfig, m: Method) -> str | None:
    """--ARM.data, else that of the arm it continues when both train on the same kind of data (sft-more: SFT's)."""
    own = cfg.train.get(m.name, {}).get("data")
    start = METHODS.get(m.start)
    return own or (data_override(cfg, start) if start is not None and start.kind == m.kind else None)


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
    results = {"config": asdict(cfg), "models": {}}
    methods = cfg.method_list()
    for ckpt in cfg.ckpt:
        ckpt_dir = resolve_ckpt(ckpt)
        m_out = out / slug(ckpt)
        model_res = results["models"].setdefault(slug(ckpt), {"ckpt": str(ckpt_dir), "units": {}})
        for unit, tasks, files in units(cfg):
            u_out = m_out / unit
            log(f"== {slug(ckpt)} / {unit}: tasks {', '.join(tasks)}")
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
                       train=train)


def main(argv=None):
    run_study(parse_args(argv))

