"""`python -m minift.study --tune`: each arm's few settings that matter chosen on the validation set, with the
same budget for every arm.

For each arm a declared search space (SPACES, or `--tune-space FILE.json`); every tuned arm gets the same number
of trials (`--tune-trials`, default TRIALS): its current default first, then settings drawn from its space by a
seeded generator. A trial is two phases like the study's others (hashed, resumable, skipped when done): training
from the arm's start (a preference arm from SFT's *picked* trial) and generation on the validation files
(<task>/val.jsonl), scored by the mean of the tasks' primary metrics. The best mean is the arm's setting for the
study that follows; for a preference arm, the best among the trials that trained (held-out margin of at least
--tune-min-margin nats; see trained()). Control arms (sft-more) are not tuned: they train with the settings of
the arm they continue.
Nothing here reads a test file: `--tune-only` stops after tuning and runs without them (tests/test_study_tune.py).
"""
from __future__ import annotations

import itertools
import json
import random
from dataclasses import fields, replace
from pathlib import Path

from minift.errors import MinifTError
from minift.study.config import METHODS, train_config

# The search spaces: the settings the literature and our own runs say matter, at values around each default.
# SFT: the LoRA learning rate and the passes over the data. DPO: the learning rate, beta (the pull toward the
# reference), and the two published remedies for likelihood displacement: an NLL term on the chosen answers
# (RPO, sft_weight) and DPO-Positive (dpop_lambda). Each space is its arm's last round (docs/study.md): SFT's
# second, past the first round's pick lr 4e-4 at the edge of lr 1e-4 to 4e-4, 2-3 epochs; DPO's second and
# third, without the first round's lr 1e-5 and 2e-5 and beta 0.05 that did not train or scored lowest.
SPACES = {
    "sft": {"lr": [4e-4, 6e-4, 8e-4], "epochs": [3.0, 4.0]},
    "dpo": {"lr": [5e-5, 1e-4], "beta": [0.1, 0.2], "sft_weight": [0.0, 1.0], "dpop_lambda": [0.0, 10.0, 50.0]},
    "simpo": {"lr": [5e-6, 1e-5, 5e-5], "beta": [1.0, 2.0, 2.5], "gamma": [0.3, 0.5, 1.0]},
    "orpo": {"lr": [1e-4, 2e-4, 4e-4], "orpo_lambda": [0.05, 0.1, 0.2]},
    "kto": {"lr": [1e-5, 5e-5, 1e-4], "beta": [0.1, 0.2]},
}
# The per-task design trains SFT for one pass of a task's 270 rows (config.PER_TASK), so its SFT space is the
# learning rate alone; the other arms search the spaces above.
PER_TASK_SPACES = {**SPACES, "sft": {"lr": [2e-4, 4e-4, 8e-4], "epochs": [1.0]}}
TRIALS = 4  # per arm: the default and three drawn (two SFT + one DPO arm ~1 h on 2 cores, docs/study.md)


def tuned_arms(cfg) -> list:
    return [m for m in cfg.method_list() if not m.matches]


def spaces(cfg) -> dict:
    """{arm: {setting: [values]}} for the tuned arms: SPACES, replaced per arm by --tune-space, less the
    settings that a flag fixes (--dpo.lr 5e-5 --tune: lr stays 5e-5, the rest is searched)."""
    own = {}
    if cfg.tune_space:
        path = Path(cfg.tune_space)
        if not path.is_file():
            raise MinifTError(f"--tune-space {path}: file not found")
        try:
            own = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MinifTError(f"--tune-space {path}: not JSON ({e})") from None
        if not isinstance(own, dict):
            raise MinifTError(f"--tune-space {path}: must be an object {{arm: {{setting: [values]}}}}")
    arms = {m.name: m for m in tuned_arms(cfg)}
    for arm in own:
        if arm in METHODS and METHODS[arm].matches:
            raise MinifTError(f"--tune-space: {arm} is a control arm, not tuned (it takes the settings of "
                              f"{METHODS[arm].start})")
        if arm not in arms:
            raise MinifTError(f"--tune-space: the arm {arm!r} is not in --methods ({cfg.methods})")
    out = {}
    for name, m in arms.items():
        space = own.get(name, (PER_TASK_SPACES if cfg.per_task else SPACES).get(name))
        where = f"--tune-space {cfg.tune_space}: {name}" if name in own else f"the {name} space"
        if not isinstance(space, dict) or not space:
            raise MinifTError(f"{where}: empty search space (give {{setting: [values]}})")
        probe = train_config(cfg, m, 0, Path("-"), Path("-"), None)
        known = {f.name for f in fields(probe)} - {"data", "out", "ckpt", "adapter", "resume", "progress", "seed"}
        for key, values in space.items():
            if key not in known:
                raise MinifTError(f"{where}: {key!r} is not a setting of {type(probe).__name__}")
            if not isinstance(values, list) or not values:
                raise MinifTError(f"{where}.{key}: give a non-empty list of values, got {values!r}")
        free = {k: v for k, v in space.items() if k not in cfg.train.get(name, {})}
        if not free:
            raise MinifTError(f"{where}: every setting is fixed by a --{name}.* flag; nothing to tune")
        out[name] = free
    return out


def trial_settings(cfg, method, space: dict, n: int, seed: int) -> list[dict]:
    """n settings: the arm's default first, then n - 1 others that spread over the space.

    A plain random draw from the grid can spend a small budget on one value of the setting that matters most
    (three DPO trials all at lr 1e-5 in one draw), so the draw is stratified like a Latin hypercube: each setting
    takes its values other than the default's in a seeded order, one per trial, before any value repeats."""
    probe = train_config(cfg, method, seed, Path("-"), Path("-"), None)
    default = {k: getattr(probe, k) for k in space}
    keys = sorted(space)
    grid = [dict(zip(keys, v)) for v in itertools.product(*(space[k] for k in keys))]
    others = [g for g in grid if g != default]
    if len(others) < n - 1:
        raise MinifTError(f"--tune-trials {n}: the {method.name} space holds {len(others)} settings besides the "
                          f"default; every arm gets the same number of trials, so give it more values")
    rng = random.Random(f"{method.name}/{seed}")
    order = {}  # setting -> its values for trials 1, 2, ...: the non-default ones shuffled, then the default's
    for k in keys:
        rest = [v for v in space[k] if v != default[k]]
        rng.shuffle(rest)
        order[k] = rest + [v for v in space[k] if v == default[k]]
    trials = [default]
    for i in range(n - 1):
        t = {k: order[k][i % len(order[k])] for k in keys}
        if t in trials:  # the cycles met an earlier point: take a grid point not yet used
            t = rng.choice([g for g in others if g not in trials])
        trials.append(t)
    return trials


def check_tune(cfg, val_files):
    """Everything --tune needs, before anything trains."""
    for m in tuned_arms(cfg):
        space = spaces(cfg)[m.name]
        trials = trial_settings(cfg, m, space, cfg.tune_trials, cfg.seed_list()[0])
        # every value of the space (a budget smaller than the space draws only some), then the trials as drawn
        for t in [{k: v} for k, values in space.items() for v in values] + trials:
            try:
                tc = train_config(replace(cfg, train={**cfg.train, m.name: {**cfg.train.get(m.name, {}), **t}}),
                                  m, 0, Path("-"), Path(cfg.out), None)
                tc.data = None
                tc.check()
            except (MinifTError, TypeError, ValueError) as e:
                raise MinifTError(f"--tune: the {m.name} trial {t}: {e}") from None
    for p in val_files:
        if not Path(p).is_file():
            raise MinifTError(f"{p}: file not found (the validation file --tune scores its trials on)")
        if not Path(p).read_text(encoding="utf-8").strip():
            raise MinifTError(f"{p}: no rows (empty file)")


def tune_unit(cfg, ckpt_dir, ckpt, unit_out: Path, tasks, files, log) -> dict:
    """Run every tuned arm's trials for one unit; {"seed", "trials", "arms": {arm: {"trials": [...], "pick": i}},
    "train": {arm: picked settings}}. Arms are tuned in --methods order, each from its start's picked trial."""
    from minift.study.config import data_override
    from minift.study.diagnostics import arm_diagnostics
    from minift.study.report import PRIMARY, collapse
    from minift.study.steps import evaluate, make_pairs, train

    seed = cfg.seed_list()[0]
    res = {"seed": seed, "trials": cfg.tune_trials, "arms": {}, "train": {}}
    picked = {"base": None}  # arm -> the adapter of its picked trial
    t_out = unit_out / "tune"
    for m in tuned_arms(cfg):
        data = Path(data_override(cfg, m) or files[m.kind])
        if m.kind == "pref":
            make_pairs(cfg, ckpt_dir, ckpt, data, picked.get("sft"), t_out / "pairs", seed, log)
            data = t_out / "pairs" / "pairs.jsonl"
        trials = []
        for i, setting in enumerate(trial_settings(cfg, m, spaces(cfg)[m.name], cfg.tune_trials, seed)):
            over = {**{k: v for k, v in cfg.train.get(m.name, {}).items() if k != "data"}, **setting}
            cfg_t = replace(cfg, train={**cfg.train, m.name: over})
            name, d = f"{m.name} trial {i}", t_out / m.name / f"trial{i}"
            log(f"[tune] {name}: {setting}")
            train(cfg_t, m, seed, ckpt_dir, ckpt, data, d, picked[m.start], log)
            ev = evaluate(cfg, f"{name} val", ckpt_dir, ckpt, files["val"], tasks, d.with_name(f"trial{i}_val"), d, log)
            scores = {t: ev["summary"][t][PRIMARY[t]] for t in tasks}
            row = {"settings": setting, "scores": scores, "score": sum(scores.values()) / len(scores),
                   "dir": str(d), "collapse": [f"{t}: {c}" for t in tasks if (c := collapse(d.with_name(f"trial{i}_val"), t))]}
            if m.kind == "pref":
                conf = json.loads((d / "phase.json").read_text())["config"]
                diag = arm_diagnostics(conf, d)
                row["diagnostics"], row["margin"] = diag["verdict"], diag.get("margin_end")
                row["trained"] = trained(conf, row["margin"], cfg.tune_min_margin)
            log(f"[tune] {name}: validation mean {row['score']:.3f}")
            trials.append(row)
        pick = best(trials)
        picked[m.name] = Path(trials[pick]["dir"])
        res["arms"][m.name] = {"space": spaces(cfg)[m.name], "trials": trials, "pick": pick}
        if m.kind == "pref":
            res["arms"][m.name]["min_margin"] = cfg.tune_min_margin
        res["train"][m.name] = trials[pick]["settings"]
        untrained = "" if trials[pick].get("trained", True) else "; no trial reached the margin bar: the best of all"
        log(f"[tune] {m.name}: picked trial {pick} {trials[pick]['settings']} (validation {trials[pick]['score']:.3f}"
            f"{untrained})")
    for m in cfg.method_list():  # control arms: the settings of the arm they continue (its steps are matched)
        if m.matches and m.start in res["train"]:
            res["train"][m.name] = {k: v for k, v in res["train"][m.start].items() if k not in ("epochs", "max_steps")}
    return res


def trained(config: dict, margin, min_margin: float) -> bool:
    """A preference trial is a candidate only if it did what the method is for: moved its held-out chosen and
    rejected answers at least `min_margin` nats apart. The mean validation score alone favours the trial that
    moved the SFT model least (it starts from the best SFT trial), and a DPO arm that hardly trained says
    nothing about DPO. Reference-free losses (SimPO, ORPO) log their margin in other units: not gated."""
    from minift.train.losses import REFERENCE_FREE

    if config.get("loss", "sigmoid") in REFERENCE_FREE or margin is None:
        return True
    return margin >= min_margin


def best(trials: list) -> int:
    """The best mean validation score among the candidates (every trial when none trained); ties: the earlier."""
    pool = [j for j, t in enumerate(trials) if t.get("trained", True)] or range(len(trials))
    return max(pool, key=lambda j: (trials[j]["score"], -j))


def picked_train(cfg, tuned: dict) -> dict:
    """cfg.train with the picked settings under the flags (a flag, which the space left out, still wins)."""
    train = {arm: dict(v) for arm, v in cfg.train.items()}
    for arm, setting in tuned["train"].items():
        train[arm] = {**setting, **train.get(arm, {})}
    return train
