"""What the study reads besides its own flags: the arms' prefixed training flags (`--dpo.beta 0.2 --sft.no-merge`
-> {"dpo": {"beta": 0.2}, "sft": {...}}, each typed by the field of the arm's config it sets), the --config file,
and the rows of a --test-data file, each checked before anything runs."""
import json
from dataclasses import fields
from pathlib import Path

from minift.errors import MinifTError
from minift.tasks import TASKS
from minift.train.train_config import DPOConfig, TrainConfig


def prefixed(rest: list[str], methods: dict) -> dict:
    """--dpo.beta 0.2 --sft.no-merge ... -> {"dpo": {"beta": 0.2}, ...}, typed by the config's fields."""
    out: dict = {}
    i = 0
    while i < len(rest):
        flag = rest[i]
        if not flag.startswith("--") or "." not in flag:
            raise MinifTError(f"unknown argument {flag!r} (training flags are --sft.FLAG / --dpo.FLAG)")
        arm, name = flag[2:].split(".", 1)
        if "=" in name:
            name, value = name.split("=", 1)
            i += 1
        elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            value, i = rest[i + 1], i + 2
        else:
            value, i = None, i + 1
        if arm not in methods:
            raise MinifTError(f"{flag}: unknown arm {arm!r}; known: {', '.join(methods)}")
        cls = TrainConfig if methods[arm].kind == "sft" else DPOConfig
        key = name.replace("-", "_")
        neg = key.startswith("no_") and key[3:] in {f.name for f in fields(cls)}
        key = key[3:] if neg else key
        f = {f.name: f for f in fields(cls)}.get(key)
        if f is None:
            raise MinifTError(f"{flag}: {cls.__name__} has no setting {key!r}")
        out.setdefault(arm, {})[key] = typed(flag, f, value, neg)
    return out


def typed(flag, f, value, neg):
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    if kind == "bool":
        return not neg if value is None else value.lower() in ("1", "true", "yes")
    if value is None:
        raise MinifTError(f"{flag} needs a value")
    try:
        return {"int": int, "float": float}.get(kind, str)(value)
    except ValueError:
        raise MinifTError(f"{flag}: expected {kind}, got {value!r}") from None


def read_config(path, study_keys, methods) -> dict:
    """--config FILE: {"study": {flag: value}, ARM: {setting: value}}, each key checked by name here and each
    value by check_inputs, as a flag's would be."""
    try:
        conf = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MinifTError(f"--config {path}: not a readable JSON file ({e})") from None
    if not isinstance(conf, dict) or not all(isinstance(v, dict) for v in conf.values()):
        raise MinifTError(f"--config {path}: must be an object of objects, {{\"study\": {{...}}, \"dpo\": {{...}}}}")
    for k in conf.get("study", {}):
        if k.replace("-", "_") not in study_keys:
            raise MinifTError(f"--config {path}: the study has no setting {k!r}")
    for arm in conf:
        if arm != "study" and arm not in methods:
            raise MinifTError(f"--config {path}: unknown arm {arm!r}; known: study, {', '.join(methods)}")
    return conf


def check_test_rows(path):
    """A --test-data file: every line a JSON object of a known task (one line naming the file and row)."""
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise MinifTError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or row.get("task") not in TASKS:
                raise MinifTError(f"{path}:{n}: a test row needs \"task\", one of {', '.join(TASKS)}")
