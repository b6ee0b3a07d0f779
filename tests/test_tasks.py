"""The four clinical tasks: deterministic generators, bundled files, held-out test phrasings, parsers
and scorers (ROUGE-L against the rouge-score package)."""
import json
import random
import re
from pathlib import Path

import pytest

from minift.tasks import TASKS, build, classification, reasoning, summarization, triage
from minift.tasks.base import Pool, fact_tokens, find_label

DATA = Path(__file__).resolve().parent.parent / "minift" / "datasets"


@pytest.fixture(scope="module")
def built():
    return build.build(seed=0)


def _text(row):
    return row["prompt"][0]["content"]


# ------------------------------------------------------------------------------------- data files
def test_bundled_files_equal_a_fresh_build(built):
    for name, sets in built.items():
        for kind, rows in sets.items():
            path = DATA / name / f"{kind}.jsonl"
            assert path.read_text(encoding="utf-8") == build.dumps(rows), f"{path} differs from a fresh build"


def test_same_seed_same_bytes_other_seed_other_rows():
    for task in TASKS.values():
        a, b = task.rows(5, 5, 5, seed=3), task.rows(5, 5, 5, seed=3)
        assert build.dumps(a["test"]) == build.dumps(b["test"])
        assert build.dumps(a["sft"]) != build.dumps(task.rows(5, 5, 5, seed=4)["sft"])


def test_row_shapes_and_sizes(built):
    for name in TASKS:
        s = built[name]
        assert [len(s[k]) for k in ("sft", "dpo", "test", "val")] == [300, 300, 120, 120]
        for r in s["sft"]:
            assert r["task"] == name and r["prompt"][0]["role"] == "user"
            assert r["completion"][0]["role"] == "assistant" and r["completion"][0]["content"]
        for r in s["dpo"]:
            assert r["chosen"][0]["content"] != r["rejected"][0]["content"]
            assert r["rejected"][0]["role"] == "assistant"
        for r in s["test"] + s["val"]:
            TASKS[name].check_row(r, "test")  # every test and val row can be scored
            assert TASKS[name].score(r, r["answer"])["correct"]  # and its gold parses as right
        ids = [r["id"] for k in ("sft", "dpo", "test", "val") for r in s[k]]
        assert len(ids) == len(set(ids))
    mixed = built["clinical"]
    assert [len(mixed[k]) for k in ("sft", "dpo", "test", "val")] == [200, 200, 80, 120]
    assert {r["task"] for r in mixed["test"][:4]} == {r["task"] for r in mixed["val"][:4]} == set(TASKS)  # round-robin


def test_labels_are_balanced_enough(built):
    # no label may dominate a test set: a constant answer must not score well
    for split in ("test", "val"):
        for name, key in (("classification", "label"), ("reasoning", "label")):
            counts = {}
            for r in built[name][split]:
                counts[r[key]] = counts.get(r[key], 0) + 1
            assert max(counts.values()) / 120 < 0.5, (name, split, counts)
        provs = [r["labels"]["provider"] for r in built["triage"][split]]
        assert max(provs.count(p) for p in triage.PROVIDERS) / 120 < 0.4, split


# ------------------------------------------------------------------------------------- held-out phrasing
def _pools(module):
    for v in vars(module).values():
        if isinstance(v, Pool):
            yield v
        elif isinstance(v, dict):
            yield from (p for p in v.values() if isinstance(p, Pool))


@pytest.mark.parametrize("module", [classification, reasoning, summarization, triage])
def test_template_pools_are_disjoint(module):
    pools = list(_pools(module))
    assert pools, "no template pools found"
    for p in pools:
        assert p.train and p.test and p.val
        assert not set(p.train) & set(p.test) and not set(p.val) & (set(p.train) | set(p.test))


CASE_TEXT = {  # the case itself, without the fixed instruction shared by every prompt of a task
    "classification": r"Note: (.*?)\n\nAnswer",
    "reasoning": r"^(.*?)\nA\. ",
    "summarization": r"Note:\n(.*)$",
    "triage": r'Message: "(.*?)"\n\n',
}


def _sentences(text):
    return {s.strip().lower() for s in re.split(r"[.?!](?:\s+|$)|\n", text) if len(s.split()) >= 5}


def _leaks(rows, seen_rows, name):
    """[(row id, shared sentences)] for rows of `rows` whose case text shares a sentence of five words or more
    with (or is contained in) a row of `seen_rows`."""
    seen = [_text(r) for r in seen_rows]
    blob = "\n\x00".join(seen)
    sents = set().union(*(_sentences(re.search(CASE_TEXT[name], t, re.S).group(1)) for t in seen))
    out = []
    for r in rows:
        text = _text(r)
        shared = _sentences(re.search(CASE_TEXT[name], text, re.S).group(1)) & sents
        if shared or text in blob:
            out.append((r["id"], shared or {"the whole prompt"}))
    return out


@pytest.mark.parametrize("name", list(TASKS))
def test_train_and_test_share_no_case_text(built, name):
    train = built[name]["sft"] + built[name]["dpo"]
    assert not _leaks(built[name]["test"], train, name)


@pytest.mark.parametrize("name", list(TASKS))
def test_val_shares_no_sentence_with_train_or_test(built, name):
    """What the study tunes on is neither what it trains on nor what it is tested on."""
    val, others = built[name]["val"], built[name]["sft"] + built[name]["dpo"] + built[name]["test"]
    assert not _leaks(val, others, name)
    assert not _leaks(built[name]["test"], val, name)
    # the check can fail: a val row with a training sentence planted in its case text is caught
    planted = json.loads(json.dumps(val[0]))
    train_case = re.search(CASE_TEXT[name], _text(built[name]["sft"][0]), re.S).group(1)
    sentence = max(_sentences(train_case), key=len)
    case = re.search(CASE_TEXT[name], _text(planted), re.S).group(1)
    planted["prompt"][0]["content"] = _text(planted).replace(case, sentence + ". " + case)
    assert [i for i, _ in _leaks([planted], others, name)] == [planted["id"]]


# ------------------------------------------------------------------------------------- parsers
def test_find_label():
    labels = classification.LABELS
    assert find_label("past", labels) == "past"
    assert find_label("The answer is: Current.", labels) == "current"
    assert find_label("absent (denied)", labels) == "absent"
    assert find_label("Past. The condition resolved in the past", labels) == "past"
    assert find_label("Current, past or absent.", labels) is None  # listing the options is no answer
    assert find_label("I cannot tell", labels) is None
    assert find_label("non-urgent", ("urgent", "routine")) is None  # hyphenated is not the label


def test_parse_letter():
    opts = {"A": "Asthma", "B": "Pulmonary embolism", "C": "Gout", "D": "Migraine", "E": "Anemia"}
    cases = {"C": "C", "C. Gout": "C", "(B)": "B", "B) Pulmonary embolism": "B", "The answer is D.": "D",
             "Answer: E": "E", "answer is (a)": None, "pulmonary embolism": "B",
             "A patient with pulmonary embolism": "B", "A 40-year-old with gout": "C",
             "I am not sure": None, "Asthma or gout": None, "**E**": "E"}
    for text, want in cases.items():
        assert reasoning.parse_letter(text, opts) == want, text


def test_parse_triage():
    cases = {"provider: nurse; urgency: urgent": ("nurse", "urgent"),
             "Provider: Pharmacist\nUrgency: Routine": ("pharmacist", "routine"),
             "The pharmacist should answer; it is not urgent.": ("pharmacist", "routine"),
             "scheduling, non-urgent": ("scheduling", "routine"),
             "provider: doctor; urgency: urgent": ("physician", "urgent"),
             "Hello! How can I help?": (None, None)}
    for text, want in cases.items():
        assert triage.parse(text) == want, text


def test_medqa_rows_are_read(tmp_path):
    p = tmp_path / "medqa.jsonl"
    p.write_text(json.dumps({"question": "Which vitamin?", "options": {"A": "B12", "B": "C", "C": "D", "D": "K"},
                             "answer_idx": "D", "answer": "K"}) + "\n")
    (row,) = reasoning.load_medqa(str(p))
    assert row["label"] == "D" and row["answer"] == "D. K" and "D. K" in _text(row)
    assert TASKS["reasoning"].score(row, "D")["correct"]


# ------------------------------------------------------------------------------------- scorers
SENTENCES = [
    ("The cat sat on the mat.", "The cat lay on a mat!"),
    ("67-year-old man with pneumonia. Started amoxicillin 1 g three times daily.",
     "A 67 year old man has community-acquired pneumonia; he started amoxicillin."),
    ("Follow up with cardiology in 2 weeks.", "follow up in two weeks with cardiology, 2 weeks"),
    ("a b c d e f", "f e d c b a"),
    ("repeat repeat repeat word", "repeat word repeat"),
    ("Atrial fibrillation (AF) on apixaban 5 mg.", "Nothing relevant here."),
    ("Hemoglobin A1c of 8.9% noted.", "hemoglobin a1c 8 9 percent"),
    ("Short.", "short"),
]


def test_rouge_l_equals_rouge_score():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(0)
    words = "the patient with fever and cough started on drug follow up in weeks".split()
    pairs = SENTENCES + [(" ".join(rng.choices(words, k=rng.randint(3, 15))),
                          " ".join(rng.choices(words, k=rng.randint(1, 15)))) for _ in range(40)]
    for ref, pred in pairs:
        want = scorer.score(ref, pred)["rougeL"].fmeasure
        assert summarization.rouge_l(ref, pred) == pytest.approx(want, abs=1e-12), (ref, pred)
    assert summarization.rouge_l("text", "") == 0.0


def test_fact_recall():
    facts = ["community-acquired pneumonia", "amoxicillin", "primary care 2 weeks"]
    assert summarization.fact_recall(facts, "Community acquired pneumonia on amoxicillin; "
                                            "see primary care in two weeks.") == 1.0
    assert summarization.fact_recall(facts, "Pneumonia, started amoxicillin.") == pytest.approx(1 / 3)
    assert fact_tokens("Three Days") == ["3", "day"]


def test_scoring_gold_is_perfect_and_rejected_is_not(built):
    for name, task in TASKS.items():
        test = built[name]["test"][:30]
        gold = [dict(task.score(r, r["answer"]), id=r["id"]) for r in test]
        assert all(i["correct"] for i in gold), name
        m = task.metrics(gold)
        assert min(m.values()) == pytest.approx(1.0), (name, m)
        # a DPO rejected answer scores below its chosen answer
        for r in built[name]["dpo"][:30]:
            chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
            if name == "summarization":
                assert summarization.rouge_l(chosen, rejected) < 1.0
            elif name == "triage":
                assert triage.parse(chosen) != triage.parse(rejected)
            elif name == "reasoning":
                assert chosen[0] != rejected[0]
            else:
                assert find_label(chosen, classification.LABELS) != find_label(rejected, classification.LABELS)


def test_prompts_are_short(built):
    # ~4 characters per token for this English text: stay well under ~150 tokens (summaries: notes ~250)
    limits = {"classification": 600, "reasoning": 650, "triage": 600, "summarization": 1000}
    for name, lim in limits.items():
        for k in ("sft", "test"):
            assert max(len(_text(r)) for r in built[name][k]) < lim, (name, k)


# ------------------------------------------------------------------------------------- preference pairs
@pytest.mark.parametrize("name,field", [("classification", "label"), ("reasoning", "letter"),
                                        ("triage", "provider")])
def test_bundled_pairs_reject_each_label_about_as_often_as_it_is_chosen(built, name, field):
    # A label rejected more often than chosen teaches DPO a prior against it (the triage provider collapse).
    # Per label: share of the rejections vs share of the choices, within 10% of each other (the greedy
    # balancer keeps them within a count or two of each other).
    from minift.study.pairs import label_counts

    labels = label_counts(built[name]["dpo"])[name][field]
    n_c = sum(c for c, _ in labels.values())
    n_r = sum(r for _, r in labels.values())
    for lab, (c, r) in labels.items():
        assert abs(r / n_r - c / n_c) <= 0.1 * c / n_c, (lab, labels)


def test_pairs_keep_prompts_and_only_change_rejected():
    # the balancer changes which wrong label a pair rejects, never the random draws: sft and test rows are the
    # same with and without it, and every dpo row carries its gold fields (to score on-policy samples)
    from minift.tasks.base import Balance

    task = TASKS["triage"]
    plain = [task.make_case(random.Random(7), "train") for _ in range(1)][0]
    balanced = task.make_case(random.Random(7), "train", Balance())
    assert plain.prompt == balanced.prompt and plain.answer == balanced.answer
    for row in build.build(seed=0)["triage"]["dpo"][:5]:
        assert row["labels"]["provider"] in row["chosen"][0]["content"]


@pytest.mark.parametrize("name", ["summarization", "reasoning"])
def test_bundled_pairs_do_not_teach_length(built, name):
    # A rejected answer that is shorter in most pairs teaches DPO that longer wins: with 210 of 300 rejected
    # summaries the shorter ones (none longer), DPO's test summaries grew by copying the note. Per task: the
    # rejected answers' mean length within 10% of the chosen's, and neither side the shorter in more than
    # 60% of the pairs whose lengths differ.
    rows = built[name]["dpo"]
    chosen = [len(r["chosen"][0]["content"].split()) for r in rows]
    rejected = [len(r["rejected"][0]["content"].split()) for r in rows]
    assert abs(sum(rejected) - sum(chosen)) <= 0.1 * sum(chosen)
    shorter = sum(r < c for c, r in zip(chosen, rejected))
    longer = sum(r > c for c, r in zip(chosen, rejected))
    assert max(shorter, longer) <= 0.6 * (shorter + longer), (shorter, longer)
