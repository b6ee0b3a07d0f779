"""The study's arms and settings: each arm (`Method`: what it starts from, its kind of data, fixed settings), the
study's own settings (`StudyConfig`), the training config each arm runs with (`train_config`), and the data units
(the mixed set or one unit per task)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from minift.defaults import bundled
from minift.errors import MinifTError
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


# Each design's defaults over the trainers' own, {design: {arm: settings}}; where they came from: docs/study.md.
# Mixed: TUNED_MIXED, picked by `python -m minift.study --tune-only --tune-trials 6 --limit 40` on the validation
# files with the length-balanced pairs (mean primary metric), 12 trials per arm over two rounds each. SFT, second
# round (lr 4e-4 to 8e-4, 3-4 epochs): 0.647 at lr 8e-4, 3 epochs, over 0.594 for the first round's lr 4e-4.
# DPO, third round (the second round's space, from that SFT): 0.669 at lr 1e-4, beta 0.2, no NLL, dpop_lambda 10
# (held-out margin 6.4 nats), the best of the trials whose margin reached 2 nats, as in the second round.
TUNED_MIXED = {"sft": {"lr": 8e-4, "epochs": 3.0}, "dpo": {"lr": 1e-4, "beta": 0.2, "sft_weight": 0.0,
                                                               "dpop_lambda": 10.0}}
# Per task: each task's 270 rows once (3 epochs x 4 tasks would take the design past an hour), otherwise the
# mixed design's picks carried over; they are the first trial of the per-task tuning (tune.PER_TASK_SPACES).
PER_TASK = {"sft": {**TUNED_MIXED["sft"], "epochs": 1.0}, "dpo": dict(TUNED_MIXED["dpo"])}
DESIGN_DEFAULTS = {"mixed": TUNED_MIXED, "per_task": PER_TASK}


def design_defaults(cfg, method: Method) -> dict:
    """The design's settings for one arm. An arm that starts from the base in place of SFT (ORPO) takes SFT's
    epochs; a control arm (sft-more) takes the settings of the arm it continues, less the length it is matched on."""
    table = DESIGN_DEFAULTS["per_task" if cfg.per_task else "mixed"]
    if method.matches:
        return {k: v for k, v in table.get(method.start, {}).items() if k not in ("epochs", "max_steps")}
    if method.start == "base" and method.name != "sft":
        return {k: v for k, v in table.get("sft", {}).items() if k == "epochs"}
    return dict(table.get(method.name, {}))


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
    tune: bool = False        # choose each arm's settings on the validation set first (minift/study/tune.py)
    tune_only: bool = False   # stop after tuning (reads no test file)
    tune_trials: int = 4      # trials per tuned arm, the same for every arm
    tune_space: str | None = None  # JSON {arm: {setting: [values]}} replacing tune.SPACES for those arms
    tune_min_margin: float = 2.0  # a preference trial counts only if its held-out margin reached this (nats)
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
    base = dict(seed=seed, data=str(data), out=str(out), progress=False, **design_defaults(cfg, method))
    if adapter is not None:
        base["adapter"] = str(adapter)
    return cls(**{**base, **method.fixed, **over})


def data_override(cfg: StudyConfig, m: Method) -> str | None:
    """--ARM.data, else that of the arm it continues when both train on the same kind of data (sft-more: SFT's)."""
    own = cfg.train.get(m.name, {}).get("data")
    start = METHODS.get(m.start)
    return own or (data_override(cfg, start) if start is not None and start.kind == m.kind else None)


def units(cfg: StudyConfig):
    """[(unit name, tasks, {"sft", "pref", "test", "val"} files)]: the mixed set, or one unit per task."""
    tasks = cfg.task_list()

    def path(unit, split):
        return Path(cfg.data_dir) / unit / f"{split}.jsonl" if cfg.data_dir else bundled(unit, split)

    def files(unit, test_units):
        return {"sft": path(unit, "sft"), "pref": path(unit, "dpo"), "test": [path(t, "test") for t in test_units],
                "val": [path(t, "val") for t in test_units]}
    if cfg.per_task:
        return [(t, [t], files(t, [t])) for t in tasks]
    # The mixed model is tested on every task's whole test set, as the per-task models are: 20 items per task
    # (data/clinical/test.jsonl) leave the paired tests too little power to see a difference.
    mixed = files("clinical", tasks)
    if cfg.test_data:
        mixed["test"] = [Path(cfg.test_data)]
    return [("clinical", tasks, mixed)]
