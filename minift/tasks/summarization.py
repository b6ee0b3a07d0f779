"""Clinical summarization: a short visit note -> a 1-3 sentence summary that keeps the key facts.

Stands in for the study's summarization of clinical notes (graded there by clinicians on a Likert scale).
Each note carries a diagnosis, a new medication, continued home medications, a ruled-out alternative and
a follow-up; the reference summary keeps diagnosis, new medication and follow-up. Metrics: ROUGE-L F1
(our implementation; equal to the `rouge-score` package without stemming, checked in tests) and key-fact
recall (share of the key facts whose tokens all appear in the summary).
"""
from __future__ import annotations

import random

from minift.tasks import stats
from minift.tasks.base import Case, Task, fact_tokens, pool, tokens

# diagnosis, complaint, a supporting finding, new medication, its dose, the ruled-out alternative, follow-up with
DX = (
    ("community-acquired pneumonia", "cough and fever", "right lower lobe consolidation on chest x-ray",
     "amoxicillin", "1 g three times daily", "pulmonary embolism", "primary care"),
    ("cellulitis of the left leg", "a red, warm, swollen shin", "no abscess on ultrasound",
     "cephalexin", "500 mg four times daily", "deep vein thrombosis", "primary care"),
    ("acute cystitis", "burning urination", "urinalysis positive for nitrites",
     "nitrofurantoin", "100 mg twice daily", "pyelonephritis", "primary care"),
    ("atrial fibrillation", "palpitations", "an irregularly irregular rhythm on ECG",
     "apixaban", "5 mg twice daily", "myocardial infarction", "cardiology"),
    ("asthma exacerbation", "wheezing and chest tightness", "peak flow at 60% of personal best",
     "prednisone", "40 mg daily for 5 days", "pneumonia", "pulmonology"),
    ("gout flare of the right knee", "a hot swollen knee", "urate crystals on joint aspiration",
     "colchicine", "0.6 mg twice daily", "septic arthritis", "rheumatology"),
    ("type 2 diabetes", "thirst and frequent urination", "a hemoglobin A1c of 8.9%",
     "metformin", "500 mg twice daily", "type 1 diabetes", "endocrinology"),
    ("stage 2 hypertension", "headaches", "repeated readings near 164/98",
     "amlodipine", "5 mg daily", "secondary hypertension", "primary care"),
    ("iron deficiency anemia", "fatigue", "a ferritin of 6 ng/mL",
     "ferrous sulfate", "325 mg daily", "vitamin B12 deficiency", "gastroenterology"),
    ("major depressive disorder", "low mood and poor sleep", "a PHQ-9 score of 18",
     "sertraline", "50 mg daily", "hypothyroidism", "psychiatry"),
    ("migraine without aura", "recurrent throbbing headaches", "a normal neurologic exam",
     "sumatriptan", "50 mg as needed", "subarachnoid hemorrhage", "neurology"),
    ("deep vein thrombosis of the right leg", "calf swelling", "a noncompressible femoral vein on ultrasound",
     "rivaroxaban", "15 mg twice daily", "cellulitis", "hematology"),
    ("heart failure exacerbation", "leg swelling and breathlessness", "a BNP of 1,240 pg/mL",
     "furosemide", "40 mg daily", "pneumonia", "cardiology"),
    ("hypothyroidism", "tiredness and weight gain", "a TSH of 14 mIU/L",
     "levothyroxine", "50 mcg daily", "depression", "endocrinology"),
    ("Lyme disease", "an expanding rash after a hike", "a target-shaped lesion on the thigh",
     "doxycycline", "100 mg twice daily", "cellulitis", "primary care"),
    ("kidney stone", "colicky flank pain", "a 4 mm distal ureteral stone on CT",
     "tamsulosin", "0.4 mg daily", "appendicitis", "urology"),
    ("streptococcal pharyngitis", "a sore throat and fever", "a positive rapid strep test",
     "penicillin V", "500 mg twice daily", "mononucleosis", "primary care"),
    ("peptic ulcer disease", "burning epigastric pain", "a positive urea breath test",
     "omeprazole", "20 mg twice daily", "pancreatitis", "gastroenterology"),
)
HOME_MEDS = ("lisinopril", "atorvastatin", "levothyroxine", "metformin", "omeprazole", "sertraline",
             "amlodipine", "albuterol", "losartan", "gabapentin", "montelukast", "loratadine")
INTERVALS = ("3 days", "1 week", "2 weeks", "4 weeks", "6 weeks", "3 months")
SPOKEN = {"3 days": "three days", "1 week": "one week", "2 weeks": "two weeks", "4 weeks": "four weeks",
          "6 weeks": "six weeks", "3 months": "three months"}

LINES = {
    "open": pool(["{age}-year-old {sex} seen for {complaint} for {days} days.",
                  "{age}yo {sex} presenting with {complaint}, onset {days} days ago.",
                  "CC: {complaint} x {days} days in a {age}-year-old {sex}."],
                 ["The patient, a {sex} of {age}, reports {complaint} that began {days} days ago.",
                  "Reason for visit: {complaint} over the past {days} days. Age {age}, {sex}."],
                 ["Seen today: a {age}-year-old {sex} with {days} days of {complaint}.",
                  "{complaint} for the last {days} days brought this {sex}, aged {age}, in."]),
    "meds": pool(["Home meds: {m1}, {m2}.", "Current medications: {m1} and {m2}.", "Takes {m1} and {m2} at home."],
                 ["Medication list on arrival includes {m1} and {m2}.", "Regular medicines are {m1} plus {m2}."],
                 ["Already on {m1} together with {m2}.", "At home the patient uses {m1} as well as {m2}."]),
    "find": pool(["Workup showed {finding}.", "Exam and tests: {finding}.", "Notable: {finding}."],
                 ["Results today demonstrate {finding}.", "Evaluation was significant for {finding}."],
                 ["The key finding was {finding}.", "Studies this visit revealed {finding}."]),
    "alt": pool(["{alt} was ruled out.", "No evidence of {alt}.", "{alt} considered, excluded."],
                ["The team judged {alt} unlikely after testing.", "Testing argued against {alt}."],
                ["{alt} was looked for and not found.", "Workup did not support {alt}."]),
    "dx": pool(["Assessment: {dx}.", "Impression: {dx}.", "Diagnosis: {dx}."],
               ["Working diagnosis is {dx}.", "Final assessment today: {dx}."],
               ["Most likely explanation: {dx}.", "Clinical conclusion is {dx}."]),
    "plan": pool(["Plan: start {med} {dose}. Continue home meds.",
                  "Started {med} {dose}; home medications unchanged.",
                  "Begin {med} {dose}. No changes to {m1}."],
                 ["New prescription for {med} {dose}, other medicines to continue as before.",
                  "We will initiate {med} {dose} and keep {m1} the same."],
                 ["Adding {med} {dose}; the usual medicines stay as they are.",
                  "Prescribed {med} {dose} today, with {m1} left unchanged."]),
    "fu": pool(["Follow up with {who} in {interval}.", "Return to {who} in {interval}.",
                "RTC {who} {interval}."],
               ["Arranged a {who} review in {spoken}.", "Should see {who} again in {spoken}."],
               ["Next visit with {who} planned in {spoken}.", "A check with {who} is booked for {spoken} from now."]),
}
PROMPT = ("Summarize this clinical note in 1-3 sentences. Keep the diagnosis, the new medication and the "
          "follow-up.\n\nNote:\n{note}")


def summary(age, sex, dx, med, dose, who, interval) -> str:
    return f"{age}-year-old {sex} with {dx}. Started {med} {dose}. Follow up with {who} in {interval}."


def lcs_len(a: list, b: list) -> int:
    """Length of the longest common subsequence (one-row dynamic programme, O(len(a) * len(b)))."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(reference: str, prediction: str) -> float:
    """ROUGE-L F1 (beta = 1) on lowercase alphanumeric tokens, no stemming (Lin 2004)."""
    r, p = tokens(reference), tokens(prediction)
    lcs = lcs_len(r, p)
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


def fact_recall(key_facts: list[str], prediction: str) -> float:
    """Share of key facts whose (normalized) tokens all occur in the prediction."""
    have = set(fact_tokens(prediction))
    return sum(all(t in have for t in fact_tokens(f)) for f in key_facts) / len(key_facts)


class Summarization(Task):
    name = "summarization"
    max_new_tokens = 64
    required = ("answer", "key_facts")

    def make_case(self, rng: random.Random, split: str, balance=None) -> Case:
        dx, complaint, finding, med, dose, alt, who = rng.choice(DX)
        m1, m2 = rng.sample([m for m in HOME_MEDS if m != med], 2)
        age, sex, interval = rng.randint(21, 86), rng.choice(("man", "woman")), rng.choice(INTERVALS)
        slots = dict(age=age, sex=sex, complaint=complaint, days=rng.randint(2, 9), m1=m1, m2=m2,
                     finding=finding, alt=alt, dx=dx, med=med, dose=dose, who=who, interval=interval,
                     spoken=SPOKEN[interval])
        order = ["open", "meds", "find", "alt", "dx", "plan", "fu"]
        if rng.random() < 0.5:  # some notes state the assessment before the evidence
            order = ["open", "dx", "meds", "find", "alt", "plan", "fu"]
        lines = [LINES[k].pick(rng, split).format(**slots) for k in order]
        note = "\n".join(s[0].upper() + s[1:] for s in lines)
        gold = summary(age, sex, dx, med, dose, who, interval)
        # Rejected: copies the note (home meds, the ruled-out diagnosis) in place of the follow-up, or
        # contradicts a key fact (the ruled-out diagnosis, a home med as the new one, a wrong interval). The
        # flaws are as often longer than the gold as shorter: when the rejected answers were the shorter ones
        # (70% of pairs), DPO learnt length, and its summaries grew by copying the note.
        flaw = rng.choice(("drop", "dx", "med", "interval"))
        if flaw == "drop":
            bad = (f"{age}-year-old {sex} with {dx}. Started {med} {dose}. "
                   f"Takes {m1} and {m2} at home; {alt} was ruled out.")
        elif flaw == "dx":
            bad = summary(age, sex, alt, med, dose, who, interval)
        elif flaw == "med":
            bad = summary(age, sex, dx, m1, dose, who, interval)
        else:
            bad = summary(age, sex, dx, med, dose, who, rng.choice([i for i in INTERVALS if i != interval]))
        facts = [dx, med, f"{who} {interval}"]
        return Case(PROMPT.format(note=note), gold, bad, {"key_facts": facts})

    def score(self, row: dict, output: str) -> dict:
        rl, fr = rouge_l(row["answer"], output), fact_recall(row["key_facts"], output)
        # "correct" (for McNemar-style counts) = every key fact kept
        return {"rouge_l": rl, "fact_recall": fr, "correct": fr == 1.0, "parsed": bool(output.strip())}

    def metrics(self, items: list[dict]) -> dict:
        n = max(1, len(items))
        return {"rouge_l": sum(i["rouge_l"] for i in items) / n,
                "fact_recall": sum(i["fact_recall"] for i in items) / n,
                "all_facts": sum(i["correct"] for i in items) / n}

    def paired_tests(self, items_a, items_b, n_boot, seed):
        out = []
        for key in ("rouge_l", "fact_recall"):
            b = stats.paired_bootstrap(stats.mean_stat([i[key] for i in items_a]),
                                       stats.mean_stat([i[key] for i in items_b]), len(items_a), n_boot, seed)
            out.append({"metric": key, "test": "paired bootstrap", **b})
        mc = stats.mcnemar_exact([i["correct"] for i in items_a], [i["correct"] for i in items_b])
        out.append({"metric": "all_facts", "test": "exact McNemar", **mc})
        return out
