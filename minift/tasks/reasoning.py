"""Clinical reasoning: USMLE-style multiple-choice vignettes (options A-E, one answer letter).

Stands in for the study's MedQA-style clinical reasoning questions. A vignette is built from a condition's
presentation (minift/tasks/conditions.py) and asks for the diagnosis, the confirming test or the first-line
treatment; the wrong options come from the same organ system. Metric: accuracy.

`load_medqa(path)` reads real MedQA JSONL rows ({"question", "options": {"A": ...}, "answer_idx"}) into
the same test-row form, so a user who has the data can evaluate on it (`--task reasoning --data FILE`).
"""
from __future__ import annotations

import json
import random
import re

from minift.tasks import stats
from minift.errors import MinifTError
from minift.tasks.base import Balance, Case, Task, pool
from minift.tasks.conditions import CONDITIONS

LETTERS = "ABCDE"

FRAMES = pool(
    ["A {age}-year-old {sex} presents with {sx}. {Pron} has a history of {hx}. Examination shows {signs}.",
     "A {age}-year-old {sex} comes to the emergency department because of {sx}. Relevant history includes "
     "{hx}. On examination there is {signs}.",
     "A {age}-year-old {sex} with {hx} reports {sx}. Findings include {signs}."],
    ["You are asked to see a {sex} aged {age} whose main complaints are {sx}. The history is notable for "
     "{hx}, and the workup reveals {signs}.",
     "{Sex}, {age} years old. Complaints: {sx}. Background: {hx}. Clinical findings: {signs}."],
    ["A {sex} of {age} is evaluated for {sx}. Past history: {hx}. The physical exam is remarkable for {signs}.",
     "Case: {age}-year-old {sex}; symptoms are {sx}, the background includes {hx}, and testing shows {signs}."])

STEMS = {
    "name": pool(["Which of the following is the most likely diagnosis?", "What is the most likely diagnosis?"],
                 ["Which diagnosis best explains these findings?"],
                 ["Which condition is this patient most likely to have?"]),
    "test": pool(["Which test is most appropriate to confirm the diagnosis?",
                  "What is the best next step to establish the diagnosis?"],
                 ["Which investigation would best confirm the suspected condition?"],
                 ["Which study should be ordered to prove the diagnosis?"]),
    "tx": pool(["What is the most appropriate treatment?", "Which is the best initial management?"],
               ["Which therapy is most appropriate for this patient?"],
               ["How should this patient be treated first?"]),
}


def _join(items) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def format_question(question: str, options: dict) -> str:
    lines = [question.strip()] + [f"{k}. {v}" for k, v in sorted(options.items())]
    return "\n".join(lines) + "\n\nAnswer with one letter."


def parse_letter(output: str, options: dict) -> str | None:
    """The chosen letter in a short answer: a leading letter ("C", "C.", "(C)"), "answer is C", a letter
    with a bracket or dot anywhere, else the one option whose text appears; None if unparseable."""
    letters = "".join(sorted(options))
    text = output.strip()
    m = re.match(rf"^\W*([{letters}])(?![A-Za-z])", text)  # leading letter; not "A 45-year-old ..." below
    if m and not re.match(rf"^\W*[{letters}]\s+[a-z0-9]", text):  # "A 45-year-old", "A patient"
        return m.group(1)
    m = re.search(rf"\b(?i:answer|option|choice)\s*(?i:is|:)?\s*\(?([{letters}])\b", text)
    if m:
        return m.group(1)
    m = re.search(rf"(?:^|[\s(])([{letters}])[.):]", text)
    if m:
        return m.group(1)
    low = text.lower()
    hits = [k for k, v in options.items() if v.lower() in low]
    return hits[0] if len(hits) == 1 else None


class Reasoning(Task):
    name = "reasoning"
    max_new_tokens = 24
    required = ("answer", "label", "options")

    def make_case(self, rng: random.Random, split: str, balance: Balance | None = None) -> Case:
        kind = rng.choice(("name", "name", "test", "tx"))
        pick = [c for c in CONDITIONS if getattr(c, kind) is not None]
        cond = rng.choice(pick)
        gold = getattr(cond, kind)
        same = [getattr(c, kind) for c in pick if c.group == cond.group and getattr(c, kind) != gold]
        rest = [getattr(c, kind) for c in pick if c.group != cond.group and getattr(c, kind) != gold]
        rng.shuffle(same)
        rng.shuffle(rest)
        wrong = list(dict.fromkeys(same + rest))[:4]  # same-system options first; unique texts
        texts = wrong + [gold]
        rng.shuffle(texts)
        options = dict(zip(LETTERS, texts))
        letter = LETTERS[texts.index(gold)]

        sex = cond.sex or rng.choice(("man", "woman"))
        sx = rng.sample(cond.sx, min(2, len(cond.sx)))
        signs = rng.sample(cond.signs, min(rng.choice((1, 2)), len(cond.signs)))
        vignette = FRAMES.pick(rng, split).format(
            age=rng.randint(18 if cond.sex != "woman" else 19, 79), sex=sex, Sex=sex.capitalize(),
            Pron="He" if sex == "man" else "She", sx=_join(sx), hx=rng.choice(cond.hx), signs=_join(signs))
        prompt = format_question(vignette + " " + STEMS[kind].pick(rng, split), options)
        # Rejected: a same-system wrong option when there is one (the confusable choice); balanced over
        # letters, so that no option letter is pushed down more often than it is the answer.
        bad = next(k for k in LETTERS if options[k] == wrong[0])
        if balance is not None:
            confusable = [k for k in LETTERS if options[k] in same] or [k for k in LETTERS if k != letter]
            bad = balance.pick("letter", letter, [bad] + confusable)
        return Case(prompt, f"{letter}. {gold}", f"{bad}. {options[bad]}",
                    {"label": letter, "options": options, "kind": kind}, pair={"letter": (letter, bad)})

    def answer_labels(self, text: str) -> dict:
        m = re.match(r"^\W*([A-E])(?![A-Za-z])", text.strip())
        return {"letter": m.group(1) if m else None}

    def score(self, row: dict, output: str) -> dict:
        pred = parse_letter(output, row["options"])
        return {"gold": row["label"], "pred": pred, "correct": pred == row["label"], "parsed": pred is not None}

    def metrics(self, items: list[dict]) -> dict:
        return {"accuracy": sum(i["correct"] for i in items) / max(1, len(items))}

    def paired_tests(self, items_a, items_b, n_boot, seed):
        mc = stats.mcnemar_exact([i["correct"] for i in items_a], [i["correct"] for i in items_b])
        return [{"metric": "accuracy", "test": "exact McNemar", **mc}]

    def normalize_row(self, row: dict, where: str) -> dict:
        """Accept MedQA rows as they are published; ours pass through."""
        if isinstance(row, dict) and "question" in row and "answer_idx" in row and "prompt" not in row:
            return medqa_row(row, where)
        return row


def medqa_row(row: dict, where: str) -> dict:
    opts = row.get("options")
    if not isinstance(opts, dict) or not opts:
        raise MinifTError(f"{where}: MedQA row needs 'options' as an object {{\"A\": ...}}")
    letter = str(row["answer_idx"]).strip().upper()
    if letter not in opts:
        raise MinifTError(f"{where}: answer_idx {row['answer_idx']!r} is not one of the options {sorted(opts)}")
    options = {str(k).upper(): str(v) for k, v in opts.items()}
    return {"id": row.get("id", where), "task": "reasoning",
            "prompt": [{"role": "user", "content": format_question(row["question"], options)}],
            "answer": f"{letter}. {options[letter]}", "label": letter, "options": options}


def load_medqa(path: str) -> list[dict]:
    """MedQA JSONL -> our reasoning test rows (line-numbered errors)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise MinifTError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                out.append(medqa_row(row, f"{path}:{n}"))
    return out
