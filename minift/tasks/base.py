"""Shared pieces of the four clinical tasks: template pools split train/test, row builders in TRL's
conversational form, text normalization, the label parser and the `Task` interface.

A task module supplies `make_case(rng, split) -> Case` plus scoring; `Task.rows` turns cases into the
bundled sft / dpo / test rows. Every prompt is unique across all three files of a task, and test cases
are drawn only from test template pools, so a model cannot pass by memorising training sentences.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from minift.errors import MinifTError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Pool:
    """Phrasings of one thing: `train` ones feed sft/dpo rows, `val` ones only validation rows (what the study
    tunes on), `test` ones only test rows. Val and test are both paraphrased away from train, and apart from each
    other, so that a setting chosen on val meets test sentences it has never seen either."""
    train: tuple
    test: tuple
    val: tuple

    def pick(self, rng: random.Random, split: str):
        return rng.choice({"train": self.train, "val": self.val, "test": self.test}[split])


def pool(train, test, val) -> Pool:
    return Pool(tuple(train), tuple(test), tuple(val))


@dataclass
class Case:
    prompt: str                 # user message
    answer: str                 # gold completion
    rejected: str               # a plausible wrong completion (a confusable label, a wrong option ...)
    fields: dict = field(default_factory=dict)  # task fields stored on test rows (label, key_facts ...)
    pair: dict = field(default_factory=dict)    # {label field: (chosen label, rejected label)} of a DPO pair


class Balance:
    """Chooses the wrong label of each preference pair so that, per label field, every label is rejected about
    as often as it is chosen. DPO raises chosen and lowers rejected log-probs; a label rejected far more
    often than it is chosen is pushed down across all cases, so a pair set with skewed rejections teaches a
    label prior instead of the cases."""

    def __init__(self):
        self.chosen: dict = {}    # {field: {label: count}}
        self.rejected: dict = {}

    def pick(self, fld: str, gold: str, candidates) -> str:
        """The candidate (wrong) label rejected least relative to how often it is chosen; ties keep the
        order of `candidates` (the task lists the most confusable first)."""
        cho, rej = self.chosen.get(fld, {}), self.rejected.get(fld, {})
        ranked = [c for c in dict.fromkeys(candidates) if c != gold]
        return min(ranked, key=lambda c: (rej.get(c, 0) + 1) / (cho.get(c, 0) + 1))

    def record(self, pair: dict) -> None:
        for fld, (good, bad) in pair.items():
            self.chosen.setdefault(fld, {})[good] = self.chosen.get(fld, {}).get(good, 0) + 1
            if bad != good:
                self.rejected.setdefault(fld, {})[bad] = self.rejected.get(fld, {}).get(bad, 0) + 1


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


_NUM_WORDS = {"one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
              "eight": "8", "nine": "9", "ten": "10", "twelve": "12"}


def tokens(text: str) -> list[str]:
    """Lowercase alphanumeric tokens (the ROUGE tokenization: anything else separates tokens)."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def fact_tokens(text: str) -> list[str]:
    """Tokens for key-fact matching: number words become digits and a plural 's' is dropped
    ("two weeks" == "2 week"), so a fact is not missed over surface form."""
    out = []
    for t in tokens(text):
        t = _NUM_WORDS.get(t, t)
        if len(t) > 3 and t.endswith("s") and not t.endswith("ss"):
            t = t[:-1]
        out.append(t)
    return out


def find_label(text: str, labels) -> str | None:
    """The one label of `labels` that occurs as a whole word (case-insensitive) in `text`; None when no
    label or several different labels occur (an answer that lists the options, "current, past or absent",
    is not an answer). Hyphenated words do not count: "non-urgent" is not "urgent"."""
    low = text.lower()
    found = [lab for lab in labels
             if re.search(r"(?<![a-z0-9-])" + re.escape(lab.lower()) + r"(?![a-z0-9-])", low)]
    return found[0] if len(found) == 1 else None


class Task:
    """Interface of a clinical task. Subclasses set the class attributes and implement the methods."""
    name: str = ""
    max_new_tokens: int = 16
    required: tuple = ("answer",)  # test-row fields the scorer needs besides id and prompt

    # --- data -------------------------------------------------------------------------------------
    def make_case(self, rng: random.Random, split: str, balance: Balance | None = None) -> Case:
        """A case; with `balance`, its rejected answer's wrong label is chosen by the balancer (the random
        draws stay the same, so sft and test rows do not depend on how pairs are balanced)."""
        raise NotImplementedError

    def answer_labels(self, text: str) -> dict:
        """{label field: label} named by an answer (for pair diagnostics); {} for tasks without labels."""
        return {}

    def rows(self, n_sft: int, n_dpo: int, n_test: int, seed: int = 0, n_val: int = 0) -> dict[str, list[dict]]:
        """sft/dpo rows from train pools, test rows from test pools, val rows from val pools; no prompt repeats
        anywhere. Each kind draws from its own random stream, so adding val rows changes no other file."""
        seen: set[str] = set()
        out = {"sft": [], "dpo": [], "test": [], "val": []}
        for kind, n, split, salt in (("sft", n_sft, "train", 1), ("dpo", n_dpo, "train", 2),
                                     ("test", n_test, "test", 3), ("val", n_val, "val", 4)):
            rng = random.Random(f"{self.name}:{seed}:{salt}")  # str seeds hash the same in every process
            balance = Balance() if kind == "dpo" else None
            tries = 0
            while len(out[kind]) < n:
                tries += 1
                if tries > 50 * n + 100:
                    raise RuntimeError(f"{self.name}: could not draw {n} distinct {kind} cases")
                case = self.make_case(rng, split, balance)
                if case.prompt in seen or case.answer == case.rejected:
                    continue
                seen.add(case.prompt)
                if balance is not None:
                    balance.record(case.pair)
                rid = f"{self.name}-{kind}-{len(out[kind]):04d}"
                if kind == "sft":
                    row = {"id": rid, "task": self.name, "prompt": user(case.prompt),
                           "completion": assistant(case.answer)}
                elif kind == "dpo":
                    row = {"id": rid, "task": self.name, "prompt": user(case.prompt),
                           "chosen": assistant(case.answer), "rejected": assistant(case.rejected),
                           **case.fields}  # the gold's fields: on-policy pairs score samples with them
                else:  # test and val rows
                    row = {"id": rid, "task": self.name, "prompt": user(case.prompt),
                           "answer": case.answer, **case.fields}
                out[kind].append(row)
        return out

    # --- scoring ----------------------------------------------------------------------------------
    def normalize_row(self, row: dict, where: str) -> dict:
        """Hook for foreign row formats (reasoning reads MedQA rows); ours pass through."""
        return row

    def check_row(self, row: dict, where: str) -> None:
        """Raise a one-line MinifTError naming `where` (file:line) if the row cannot be scored."""
        if not isinstance(row, dict):
            raise MinifTError(f"{where}: a test row must be a JSON object")
        if "prompt" not in row:
            raise MinifTError(f"{where}: missing 'prompt'")
        p = row["prompt"]
        if not (isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(m, dict) for m in p))):
            raise MinifTError(f"{where}: 'prompt' must be a string or a list of messages")
        for f in self.required:
            if f not in row or row[f] in (None, "", [], {}):
                raise MinifTError(f"{where}: missing '{f}' needed to score task '{self.name}'")

    def score(self, row: dict, output: str) -> dict:
        """Per-item record: parsed prediction, gold, correctness and any per-item metric."""
        raise NotImplementedError

    def metrics(self, items: list[dict]) -> dict:
        raise NotImplementedError

    def paired_tests(self, items_a: list[dict], items_b: list[dict], n_boot: int, seed: int) -> list[dict]:
        """Significance of B - A on aligned items: one dict per metric (see minift.tasks.stats)."""
        raise NotImplementedError
