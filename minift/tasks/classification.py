"""Rule-based text classification: is a condition current, past or absent in a short clinical note?

Stands in for the study's rule-based classification of clinical text: the rule is stated in the prompt,
and a note mentions the asked-about condition (now, resolved, denied, in a relative, or not at all) next
to a distractor sentence about another condition. Metric: macro-F1 over the three labels.
"""
from __future__ import annotations

import random

from minift.tasks import stats
from minift.tasks.base import Balance, Case, Task, find_label, pool

LABELS = ("current", "past", "absent")

CONDITIONS = ("asthma", "depression", "atrial fibrillation", "pneumonia", "gout", "migraines",
              "kidney stones", "shingles", "anemia", "peptic ulcer disease", "eczema", "pancreatitis",
              "deep vein thrombosis", "cystitis", "psoriasis", "bronchitis")

# {c}: the condition, {y}: a year, {r}: a relative. Sentence-initial forms are capitalized after filling.
STATUS = {
    "current": pool(
        ["Has active {c}.", "Currently treated for {c}.", "Ongoing {c}, followed in this clinic.",
         "Presents today with symptoms of {c}.", "Problem list: {c} (active).", "Still symptomatic from {c}.",
         "Being managed for {c} at present.", "Complains of worsening {c} this week."],
        ["{c} is currently active and under treatment.", "Reports ongoing symptoms of {c} this month.",
         "Active diagnosis: {c}, on therapy.", "Treatment for {c} continues; not yet controlled."],
        ["Symptoms of {c} persist and therapy is ongoing.", "Today's problem remains active {c}.",
         "Under current care for {c}, still flaring.", "{c} present at this visit, medication adjusted."]),
    "past": pool(
        ["History of {c}, resolved.", "Had {c} in {y}, none since.", "{c} treated in {y}, now resolved.",
         "Remote history of {c}.", "Problem list: {c} (resolved {y}).", "Recovered from {c} in {y}.",
         "Prior {c}, no episodes for years."],
        ["{c} was diagnosed years ago and has since cleared.", "One episode of {c} back in {y}; nothing current.",
         "Past medical history notable for {c}, no longer active.", "{c} fully resolved after treatment in {y}."],
        ["{c} in {y}, completely better since then.", "Former diagnosis of {c}, quiet for a long time.",
         "Was treated for {c} in {y} and has been well since.", "Resolved {c}; last episode in {y}."]),
    "absent": pool(
        ["Denies {c}.", "No history of {c}.", "{r} has {c}.", "Negative for {c}.", "Screened for {c}: negative.",
         "Never had {c}.", "Family history of {c} in {r_low}."],
        ["Has never been diagnosed with {c}.", "Family history: {r_low} with {c}.",
         "Patient reports no prior {c}.", "{c} was considered and excluded on workup."],
        ["{c} has never been part of the history.", "{r} was treated for {c}; the patient was not.",
         "Testing for {c} came back negative.", "Says there has never been any {c}."]),
}
RELATIVES = ("Mother", "Father", "Sister", "Brother", "Grandmother", "Son")

OPENERS = pool(
    ["{age}-year-old {sex} seen for {reason}.", "{age}yo {sex}, visit for {reason}.",
     "Clinic note: {age}-year-old {sex} here for {reason}.", "{sex_cap}, {age}, presents for {reason}."],
    ["Patient is a {sex} aged {age} who came in for {reason}.", "Visit reason: {reason}. {age}-year-old {sex}.",
     "Follow-up of a {age}-year-old {sex}; today's concern is {reason}."],
    ["Seen today: {sex}, {age} years, because of {reason}.", "This {age}-year-old {sex} came to clinic about {reason}.",
     "Encounter for {reason} in a {sex} of {age}."])
REASONS = ("knee pain", "an annual exam", "a cough", "medication review", "back pain", "fatigue", "a rash",
           "a blood pressure check", "dizziness", "a sore throat")
FILLERS = pool(
    ["Vitals stable.", "Lives alone, walks daily.", "Takes lisinopril.", "Allergic to penicillin.",
     "Nonsmoker.", "BP 132/84."],
    ["Vital signs within normal limits.", "Works as a teacher.", "Medications reviewed, no changes.",
     "No known drug allergies."],
    ["Blood pressure and pulse unremarkable today.", "Drinks alcohol only socially.", "Up to date on vaccines.",
     "Exercises three times a week."])

PROMPT = ("Classify {c} in this note. Rule: current = the patient has it now; past = had it before but it "
          "resolved; absent = denied, never had it, only a relative has it, or not mentioned.\n\n"
          "Note: {note}\n\nAnswer with one word: current, past or absent.")

# A confusable wrong label for DPO: current and past are the closest pair (the unbalanced draw; the bundled
# pairs take the balanced choice, listed most confusable first).
CONFUSE = {"current": ("past", "past", "absent"), "past": ("current", "current", "absent"),
           "absent": ("current", "past")}


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


class Classification(Task):
    name = "classification"
    max_new_tokens = 8
    required = ("answer", "label")
    labels = LABELS

    def _sentence(self, rng: random.Random, split: str, status: str, cond: str) -> str:
        rel = rng.choice(RELATIVES)
        s = STATUS[status].pick(rng, split).format(c=cond, y=rng.randint(2005, 2022), r=rel, r_low=rel.lower())
        return _cap(s)

    def make_case(self, rng: random.Random, split: str, balance: Balance | None = None) -> Case:
        label = rng.choice(LABELS)
        cond, other = rng.sample(CONDITIONS, 2)
        sex = rng.choice(("man", "woman"))
        opener = OPENERS.pick(rng, split).format(age=rng.randint(19, 88), sex=sex, sex_cap=_cap(sex),
                                                 reason=rng.choice(REASONS))
        body = [self._sentence(rng, split, rng.choice(LABELS[:2]), other)]  # the distractor condition
        # "absent" by omission in a third of absent cases: only the other condition is mentioned
        if label != "absent" or rng.random() < 0.67:
            body.append(self._sentence(rng, split, label, cond))
        if rng.random() < 0.6:
            body.append(FILLERS.pick(rng, split))
        rng.shuffle(body)
        note = " ".join([_cap(opener)] + body)
        prompt = PROMPT.format(c=cond, note=note)
        bad = rng.choice(CONFUSE[label])
        if balance is not None:
            bad = balance.pick("label", label, CONFUSE[label] + LABELS)
        return Case(prompt, label, bad, {"label": label}, pair={"label": (label, bad)})

    def answer_labels(self, text: str) -> dict:
        return {"label": find_label(text, LABELS)}

    def score(self, row: dict, output: str) -> dict:
        pred = find_label(output, LABELS)
        return {"gold": row["label"], "pred": pred, "correct": pred == row["label"], "parsed": pred is not None}

    def metrics(self, items: list[dict]) -> dict:
        gold, pred = [i["gold"] for i in items], [i["pred"] for i in items]
        return {"macro_f1": stats.macro_f1(gold, pred, LABELS),
                "accuracy": sum(i["correct"] for i in items) / max(1, len(items))}

    def paired_tests(self, items_a, items_b, n_boot, seed):
        gold = [i["gold"] for i in items_a]
        boot = stats.paired_bootstrap(stats.macro_f1_stat(gold, [i["pred"] for i in items_a], LABELS),
                                      stats.macro_f1_stat(gold, [i["pred"] for i in items_b], LABELS),
                                      len(gold), n_boot, seed)
        mc = stats.mcnemar_exact([i["correct"] for i in items_a], [i["correct"] for i in items_b])
        return [{"metric": "macro_f1", "test": "paired bootstrap", **boot},
                {"metric": "accuracy", "test": "exact McNemar", **mc}]
