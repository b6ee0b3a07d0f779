"""Clinical triage: route a patient portal message to a provider and an urgency.

Stands in for the study's triage of patient portal messages: the provider (physician, nurse, pharmacist,
scheduling) who should answer, and whether it must be handled today (urgent) or not (routine). Each of the
eight provider x urgency cells has its own message templates (train and test pools apart) filled from
small vocabularies. Metrics: macro-F1 for provider and for urgency.
"""
from __future__ import annotations

import random
import re

from minift.tasks import stats
from minift.errors import MinifTError
from minift.tasks.base import Balance, Case, Task, find_label, pool

PROVIDERS = ("physician", "nurse", "pharmacist", "scheduling")
URGENCY = ("urgent", "routine")

VOCAB = {
    "drug": ("lisinopril", "metformin", "atorvastatin", "sertraline", "levothyroxine", "amlodipine", "omeprazole"),
    "critical": ("insulin", "levetiracetam", "apixaban", "tacrolimus", "hydrocortisone"),
    "otc": ("ibuprofen", "melatonin", "an allergy pill", "an antacid", "cold medicine"),
    "site": ("knee", "abdominal", "shoulder", "hip", "hernia"),
    "proc": ("knee replacement", "gallbladder surgery", "colonoscopy", "skin biopsy", "hernia repair"),
    "test": ("cholesterol panel", "thyroid test", "MRI", "blood count", "kidney function test"),
    "cond": ("back pain", "diabetes", "asthma", "migraines", "sleep apnea"),
    "spec": ("dermatologist", "cardiologist", "physical therapist", "sleep specialist"),
    "doc": ("Patel", "Nguyen", "Garcia", "Kim", "Okafor", "Rossi"),
    "day": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday"),
    "temp": ("101.8", "102.4", "103.1"),
    "crit": ("potassium of 6.4", "sodium of 119", "hemoglobin of 6.2", "glucose of 42"),
}

MESSAGES = {
    ("pharmacist", "routine"): pool(
        ["I have about a week of {drug} left. Can a refill be sent to my pharmacy?",
         "Is it okay to take {otc} while I'm on {drug}?",
         "Should I take my {drug} in the morning or at night?",
         "My insurance stopped covering {drug}. Is there a cheaper option?",
         "I forgot my {drug} dose yesterday. Do I double up today or just continue?"],
        ["Could my {drug} prescription be renewed? No rush, I still have two weeks of pills.",
         "Does {drug} interact with {otc}? Planning to start it next month.",
         "What's the best time of day to take {drug} so it works properly?"],
        ["Please send a new {drug} prescription when convenient, I have enough for ten days.",
         "Can {otc} be taken together with my {drug}?",
         "Is it better to take {drug} with food or on an empty stomach?"]),
    ("pharmacist", "urgent"): pool(
        ["I'm completely out of my {critical} today and the pharmacy says the refill needs approval.",
         "The pharmacy gave me a different pill than my usual {drug} and I already took one this morning.",
         "I accidentally took a double dose of my {critical} an hour ago. What should I do?",
         "My {critical} refill was rejected and I take my next dose tonight."],
        ["My last dose of {critical} is tonight and the refill was denied. I can't go without it.",
         "I think I swallowed someone else's tablets instead of my {drug} an hour ago. Is that dangerous?"],
        ["I ran out of {critical} this morning and the pharmacy cannot fill it without your approval.",
         "By mistake I took twice my usual {critical} dose a short while ago. Please advise."]),
    ("nurse", "routine"): pool(
        ["How often should I change the dressing on my {site} incision?",
         "When can I shower after my {proc}?",
         "Do I need to fast before my blood draw next week?",
         "Is a little bruising normal where I got my flu shot on {day}?",
         "My home blood pressure readings this week were around 128/80. Is that fine?"],
        ["Can I go swimming yet, or is it too soon after my {proc} last month?",
         "What should I eat the day before my {proc} next month?",
         "Mild soreness at the injection site since {day}, is that expected?"],
        ["How long should I keep the bandage on after my {proc}?",
         "Is some itching around my {site} scar normal while it heals?",
         "When is it safe to lift groceries again after my {proc}?"]),
    ("nurse", "urgent"): pool(
        ["My {site} incision is red, hot and leaking pus, and my temperature is {temp}.",
         "Since my {proc} yesterday I have bleeding that soaks through the bandage every hour.",
         "My son has had a fever of {temp} since {day} and is barely drinking.",
         "I'm having chest pain and trouble breathing right now."],
        ["The wound from my {proc} opened up today and keeps bleeding.",
         "I feel very short of breath this morning and my lips look bluish.",
         "Fever of {temp} tonight, shaking chills, two days after my {proc}."],
        ["My {site} wound is swollen and draining yellow fluid, and I measured {temp} just now.",
         "I suddenly cannot catch my breath and my chest feels tight right now.",
         "My daughter has had {temp} since {day} and will not drink anything."]),
    ("physician", "routine"): pool(
        ["I saw my {test} results in the portal. Can Dr. {doc} explain what they mean?",
         "Could Dr. {doc} write a letter for my employer about my {cond}?",
         "I'd like a referral to a {spec} for my {cond}.",
         "Do I still need a colonoscopy this year given my family history?",
         "Can we discuss other treatment options for my {cond} at some point?"],
        ["My {test} came back slightly outside the range; does Dr. {doc} think I need treatment?",
         "Would Dr. {doc} consider surgery an option for my {cond}? Happy to wait for a reply.",
         "Wondering if my {cond} plan should change before my next yearly visit."],
        ["Could Dr. {doc} go over my {test} with me at my next visit?",
         "I would like to see a {spec} about my {cond} when there is time.",
         "Is there a newer medicine Dr. {doc} would suggest for my {cond}? No hurry."]),
    ("physician", "urgent"): pool(
        ["The lab called about a {crit} and told me to contact Dr. {doc} today.",
         "My CT report says there may be a blood clot in my lung. What should I do now?",
         "The portal flagged my {test} as critical. Do I need to change anything today?",
         "My biopsy report says malignant and my surgery planning meeting is tomorrow."],
        ["Critical result just posted: {crit}. Should I stop any of my medicines today?",
         "Scan report mentions a possible bleed. Do I need to be seen right away?"],
        ["I was told my {crit} is dangerous and that Dr. {doc} must call me back today.",
         "My scan shows a possible clot in my leg and my calf is swelling. What now?"]),
    ("scheduling", "routine"): pool(
        ["Can I move my appointment on {day} to the afternoon?",
         "I need to book my annual physical sometime next month.",
         "Please cancel my {spec} appointment on {day}, I'll reschedule later.",
         "Are there any video visits with Dr. {doc} in the next few months?"],
        ["Could you find me a later slot than {day} morning for my check-up in the spring?",
         "I'd like to set up a new-patient visit for my husband whenever there is space."],
        ["Is there an opening with Dr. {doc} sometime next season for a routine visit?",
         "Please push my {spec} visit on {day} back by a couple of weeks."]),
    ("scheduling", "urgent"): pool(
        ["My pre-op appointment is tomorrow morning but my ride cancelled. Can I come in the afternoon?",
         "My surgery is on {day} and the required pre-op visit still isn't booked.",
         "Dr. {doc} said I must be seen within 48 hours for a wound check but there are no openings."],
        ["The ER told me to get a follow-up today, but the online scheduler shows nothing.",
         "My procedure is tomorrow and I just realized the pre-op visit was never scheduled."],
        ["I was discharged yesterday and must be seen within a day, but nothing is available.",
         "Surgery is set for {day} and nobody has booked the required pre-op check."]),
}
GREET = pool(["Hi,", "Hello,", "", "Good morning,", "Hi Dr. {doc}'s office,"],
             ["Dear care team,", "Hey there,", "To whom it may concern,"],
             ["Good afternoon,", "Hello team,"])
SIGN = pool(["Thanks.", "", "Thank you!", "Thanks, {name}"], ["Best regards.", "Appreciate it, {name}"],
            ["Many thanks.", "Kind regards, {name}"])
NAMES = ("Maria", "James", "Li", "Fatima", "Tom", "Grace", "Ahmed", "Rosa")

PROMPT = ("Route this patient portal message.\nProviders: physician (results, diagnoses, treatment decisions), "
          "nurse (symptoms, wound and home care), pharmacist (refills, doses, drug questions), scheduling "
          "(appointments).\nUrgency: urgent (must be handled today) or routine.\n\nMessage: \"{msg}\"\n\n"
          "Answer as: provider: X; urgency: Y")

# DPO: the provider most often confused with the gold one
CONFUSE = {"physician": ("nurse",), "nurse": ("physician", "pharmacist"), "pharmacist": ("nurse", "physician"),
           "scheduling": ("nurse", "physician")}


def answer(provider: str, urgency: str) -> str:
    return f"provider: {provider}; urgency: {urgency}"


def parse(output: str) -> tuple[str | None, str | None]:
    """Provider and urgency named anywhere in a short answer; "not urgent"/"non-urgent" count as routine."""
    low = output.lower()
    m = re.search(r"provider\s*[:=-]\s*([a-z]+)", low)
    prov = m.group(1) if m and m.group(1) in PROVIDERS else find_label(low, PROVIDERS)
    if prov is None and re.search(r"\b(doctor|physicians)\b", low):
        prov = "physician"
    elif prov is None and re.search(r"\bpharmacy\b", low):
        prov = "pharmacist"
    m = re.search(r"urgency\s*[:=-]\s*([a-z-]+)", low)
    urg = m.group(1) if m and m.group(1) in URGENCY else None
    if urg is None:
        if re.search(r"\b(not|non)[\s-]urgent\b", low):
            urg = "routine"
        else:
            urg = find_label(low, URGENCY)
    return prov, urg


class Triage(Task):
    name = "triage"
    max_new_tokens = 16
    required = ("answer", "labels")

    def make_case(self, rng: random.Random, split: str, balance: Balance | None = None) -> Case:
        prov, urg = rng.choice(PROVIDERS), rng.choice(URGENCY)
        slots = {k: rng.choice(v) for k, v in VOCAB.items()}
        slots["name"] = rng.choice(NAMES)
        body = MESSAGES[(prov, urg)].pick(rng, split).format(**slots)
        msg = " ".join(s for s in (GREET.pick(rng, split).format(**slots), body,
                                   SIGN.pick(rng, split).format(**slots)) if s)
        gold = answer(prov, urg)
        r = rng.random()  # wrong provider (60%), wrong urgency (25%) or both (15%)
        bad_p = rng.choice(CONFUSE[prov]) if r < 0.6 or r >= 0.85 else prov
        bad_u = (URGENCY[1] if urg == URGENCY[0] else URGENCY[0]) if r >= 0.6 else urg
        if balance is not None and bad_p != prov:
            bad_p = balance.pick("provider", prov, CONFUSE[prov] + PROVIDERS)
        return Case(PROMPT.format(msg=msg), gold, answer(bad_p, bad_u),
                    {"labels": {"provider": prov, "urgency": urg}},
                    pair={"provider": (prov, bad_p), "urgency": (urg, bad_u)})

    def answer_labels(self, text: str) -> dict:
        prov, urg = parse(text)
        return {"provider": prov, "urgency": urg}

    def check_row(self, row: dict, where: str) -> None:
        super().check_row(row, where)
        labels = row["labels"]
        if not isinstance(labels, dict) or labels.get("provider") not in PROVIDERS or \
                labels.get("urgency") not in URGENCY:
            raise MinifTError(f"{where}: 'labels' must be {{\"provider\": one of {list(PROVIDERS)}, "
                              f"\"urgency\": one of {list(URGENCY)}}}")

    def score(self, row: dict, output: str) -> dict:
        prov, urg = parse(output)
        g = row["labels"]
        return {"gold": g, "pred": {"provider": prov, "urgency": urg},
                "correct_provider": prov == g["provider"], "correct_urgency": urg == g["urgency"],
                "correct": prov == g["provider"] and urg == g["urgency"],
                "parsed": prov is not None and urg is not None}

    def metrics(self, items: list[dict]) -> dict:
        n = max(1, len(items))
        out = {}
        for key, labels in (("provider", PROVIDERS), ("urgency", URGENCY)):
            out[f"{key}_f1"] = stats.macro_f1([i["gold"][key] for i in items], [i["pred"][key] for i in items],
                                              labels)
        out["both_correct"] = sum(i["correct"] for i in items) / n
        return out

    def paired_tests(self, items_a, items_b, n_boot, seed):
        out = []
        for key, labels in (("provider", PROVIDERS), ("urgency", URGENCY)):
            gold = [i["gold"][key] for i in items_a]
            b = stats.paired_bootstrap(stats.macro_f1_stat(gold, [i["pred"][key] for i in items_a], labels),
                                       stats.macro_f1_stat(gold, [i["pred"][key] for i in items_b], labels),
                                       len(gold), n_boot, seed)
            out.append({"metric": f"{key}_f1", "test": "paired bootstrap", **b})
        for key in ("provider", "urgency"):
            mc = stats.mcnemar_exact([i[f"correct_{key}"] for i in items_a], [i[f"correct_{key}"] for i in items_b])
            out.append({"metric": f"{key}_accuracy", "test": "exact McNemar", **mc})
        return out
