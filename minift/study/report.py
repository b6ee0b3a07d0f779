"""The study's report: report.md (the paper's table per model, collapse flags, pair diagnostics, compute, phase
times), report.json (every number of it) and report.png (each task's primary metric with 95% intervals).

p-values come from minift.eval.compare.compare, the code of `python -m minift.evaluate compare`, on the same run
folders. Over several seeds a cell shows the mean and the spread (sample sd) of the metric, and the p-value
of each seed's own paired test (seed runs are not pooled: items repeat across seeds, they are not new cases).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from minift.tasks import stats
from minift.eval.compare import compare, read_run
from minift.study.diagnostics import DISPLACED, MIN_GAIN, arm_diagnostics

# The metric each task is judged by. Summarization: key-fact recall, because the study's clinicians graded
# whether a summary keeps what matters (diagnosis, new medication, follow-up); ROUGE-L rewards the reference's
# wording, which a correct summary need not copy. It is reported beside it.
PRIMARY = {"classification": "macro_f1", "reasoning": "accuracy", "summarization": "fact_recall",
           "triage": "provider_f1"}
SECONDARY = {"summarization": ["rouge_l"], "triage": ["urgency_f1"]}
COLLAPSE = 0.6  # flag a run when one answer is more than 60% of a task's predictions (and not of the gold)
PAPER_RATIO = "2-3x"  # Savage et al.: DPO took about 2-3 times the compute of SFT


def _items(run_dir, task):
    return [r for (t, _), r in read_run(run_dir).items() if t == task]


def label_field(task, rec, which):
    v = rec[which]
    return v.get("provider") if task == "triage" and isinstance(v, dict) else v


def collapse(run_dir, task):
    """'answer' n/N when one parsed answer makes up > COLLAPSE of the predictions and less of the gold."""
    if task == "summarization":
        return None
    items = _items(run_dir, task)
    pred = Counter(label_field(task, r, "pred") for r in items)
    gold = Counter(label_field(task, r, "gold") for r in items)
    pred.pop(None, None)  # unparseable answers are not one answer (the evaluation lists them)
    if not pred:
        return None
    top, n = pred.most_common(1)[0]
    if n / len(items) > COLLAPSE and gold.get(top, 0) / len(items) <= COLLAPSE:
        return f"'{top}' {n}/{len(items)}"
    return None


def primary_stat(task, items):
    if task == "classification":
        return stats.macro_f1_stat([i["gold"] for i in items], [i["pred"] for i in items], ("current", "past", "absent"))
    if task == "triage":
        from minift.tasks.triage import PROVIDERS

        return stats.macro_f1_stat([i["gold"]["provider"] for i in items], [i["pred"]["provider"] for i in items],
                                   PROVIDERS)
    key = {"reasoning": "correct", "summarization": "fact_recall"}[task]
    return stats.mean_stat([float(i[key]) for i in items])


def interval(run_dir, task, n_boot):
    """(value, low, high): a run's primary metric with a 95% percentile bootstrap interval."""
    items = _items(run_dir, task)
    r = stats.paired_bootstrap(lambda idx: np.zeros(len(idx)), primary_stat(task, items), len(items), n_boot, 0)
    return r["b"], r["ci_low"], r["ci_high"]


_TESTS: dict = {}


def tests(run_a, run_b, n_boot):
    """{(task, metric): result} of compare(); McNemar rows get a paired-bootstrap interval of the difference."""
    if (run_a, run_b, n_boot) in _TESTS:
        return _TESTS[(run_a, run_b, n_boot)]
    out = _TESTS[(run_a, run_b, n_boot)] = {}
    for r in compare(run_a, run_b, n_boot=n_boot):
        if "ci_low" not in r:  # McNemar gives a p-value; the interval comes from the same items, resampled
            a = [float(i["correct"]) for i in _items(run_a, r["task"])]
            b = [float(i["correct"]) for i in _items(run_b, r["task"])]
            boot = stats.paired_bootstrap(stats.mean_stat(a), stats.mean_stat(b), len(a), n_boot, 0)
            r = {**r, "ci_low": boot["ci_low"], "ci_high": boot["ci_high"]}
        out[(r["task"], r["metric"])] = r
    return out


def summary_metric(run_dir, task, metric):
    return json.loads((Path(run_dir) / "summary.json").read_text())["tasks"][task][metric]


def fmt_mean(vals):
    return f"{vals[0]:.3f}" if len(vals) == 1 else f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f}"


def fmt_p(p):
    return "<0.001" if p < 0.001 else f"{p:.3f}"


# --------------------------------------------------------------------------------------------- compute
def compute(cfg, ckpt_dir, seed_res):
    """Wall seconds and FLOPs (minift.study.flops) of each training arm of one seed."""
    from minift.model.config import ModelConfig
    from minift.train.data import drop_shared_tail, read_preferences, read_sft
    from minift.study.flops import Dims, run_flops
    from minift.train.losses import REFERENCE_FREE, UNPAIRED
    from minift.model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(ckpt_dir)
    mc = ModelConfig.from_hf(Path(ckpt_dir) / "config.json")
    out = {}
    for arm, r in seed_res.items():
        tc = json.loads((Path(r["train_dir"]) / "phase.json").read_text())["config"]
        dims = Dims.of(mc, tc["lora_r"])
        rows = [json.loads(l) for l in (Path(r["train_dir"]) / "metrics.jsonl").read_text().splitlines() if l]
        steps = list({x["step"]: x for x in rows if "seconds" in x}.values())  # one record per step
        seen = len(steps) * tc["batch_size"] * tc["grad_accum"]
        if r["kind"] == "sft":
            ex = read_sft(r["data"], tok, tc["max_length"])  # (this run's path: the folder may have moved)
            lens = [(e.target_mask.index(True), len(e.ids) - e.target_mask.index(True)) for e in ex]
            fl = run_flops(dims, sft=lens, examples_seen=seen)
        else:
            ex = read_preferences(r["data"], tok, tc["max_length"])
            ex = [drop_shared_tail(e) for e in ex] if tc.get("drop_shared_tail") else ex
            lens = [(len(e.prompt_ids), len(e.chosen_ids), len(e.rejected_ids)) for e in ex]
            # simpo / orpo: no reference pass. kto: a cached row per unpaired example (two per pair), and each
            # example's row [prompt | completion | y'] costs about what a pair's row costs
            loss = tc.get("loss", "sigmoid")
            cached = tc.get("ref") == "cached" and loss not in REFERENCE_FREE
            fl = run_flops(dims, dpo=lens, examples_seen=seen,
                           n_pairs_cached=len(ex) * (2 if loss in UNPAIRED else 1) if cached else 0)
        out[arm] = {"wall_seconds": r["train_seconds"], "step_seconds": round(sum(x["seconds"] for x in steps), 1),
                    "steps": len(steps), "examples_seen": seen, "reference_seconds": r["reference_seconds"], **fl}
    return out


# --------------------------------------------------------------------------------------------- the report
def comparisons(arms):
    """[(arm, what it is tested against)]: SFT against the base, every other arm against SFT, and DPO against the
    compute-matched control when both ran (a DPO gain that the control also shows is a gain of more training)."""
    pairs = [(a, "base" if a == "sft" else "sft") for a in arms]
    return pairs + ([("dpo", "sft-more")] if "dpo" in arms and "sft-more" in arms else [])


def build_tables(cfg, results):
    arms = [m.strip() for m in cfg.methods.split(",")]
    table, flags = [], []
    for model, mres in results["models"].items():
        for unit, ures in mres["units"].items():
            base = ures["base"]["dir"]
            seeds = list(ures["seeds"])
            for task in ures["tasks"]:
                for metric in [PRIMARY[task]] + SECONDARY.get(task, []):
                    row = {"model": model, "unit": unit, "task": task, "metric": metric,
                           "primary": metric == PRIMARY[task], "base": summary_metric(base, task, metric)}
                    for arm in arms:
                        row[arm] = [summary_metric(ures["seeds"][s][arm]["eval_dir"], task, metric) for s in seeds]
                    for arm, ref_name in comparisons(arms):
                        per_seed = []
                        for s in seeds:
                            a = base if ref_name == "base" else ures["seeds"][s][ref_name]["eval_dir"]
                            per_seed.append(tests(a, ures["seeds"][s][arm]["eval_dir"], cfg.n_boot)[(task, metric)])
                        row[f"{arm}_vs_{ref_name}"] = per_seed
                    table.append(row)
                for arm_dir in [("base", base)] + [(f"{a} s{s}", ures["seeds"][s][a]["eval_dir"])
                                                   for s in seeds for a in arms]:
                    c = collapse(arm_dir[1], task)
                    if c:
                        flags.append({"model": model, "unit": unit, "task": task, "run": arm_dir[0], "answer": c})
    return table, flags


def write_report(cfg, results, out: Path):
    table, flags = build_tables(cfg, results)
    results["table"], results["collapse"] = table, flags
    results["compute"], results["diagnostics"] = {}, {}
    for model, mres in results["models"].items():
        for unit, ures in mres["units"].items():
            for s, sres in ures["seeds"].items():
                results["compute"][f"{model}/{unit}/seed{s}"] = compute(cfg, mres["ckpt"], sres)
                results["diagnostics"][f"{model}/{unit}/seed{s}"] = {
                    arm: arm_diagnostics(json.loads((Path(r["train_dir"]) / "phase.json").read_text())["config"],
                                         r["train_dir"], r["eval_dir"], sres.get("sft", {}).get("eval_dir"))
                    for arm, r in sres.items() if r["kind"] == "pref"}
    arms = [m.strip() for m in cfg.methods.split(",")]
    md = render_md(cfg, results, arms)
    # Each file is written beside itself and renamed into place: a kill mid-write leaves the old report or
    # none, never half of one (the rerun then writes it whole).
    for name, text in (("report.json", json.dumps(results, indent=2, default=str) + "\n"), ("report.md", md)):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)
    plot(cfg, results, arms, out / "report.png")
    return [out / "report.md", out / "report.json", out / "report.png"]


def tune_md(tune: dict) -> list[str]:
    """The report's section: every trial with its validation score, the pick marked."""
    L = ["## Tuning (validation set)", ""]
    first = next(iter(tune.values()), None)
    if first is None:
        return []
    L.append(f"Every tuned arm had the same budget: {first['trials']} trials (its default first, then settings drawn "
             f"from its declared space; training seed {first['seed']}), each scored by generation on the validation "
             f"files with the mean of the tasks' primary metrics; the best mean (**bold**) is the setting the study "
             f"ran with. No test file was read while tuning.")
    margin = next((a["min_margin"] for r in tune.values() for a in r["arms"].values() if "min_margin" in a), None)
    if margin is not None:
        L[-1] += (f" A preference arm picks among its trials that trained (a held-out chosen-rejected margin of at "
                  f"least {margin:g} nats; the others are marked *not trained*): the best score alone favours the "
                  f"trial that moved the SFT model least.")
    for unit, res in tune.items():
        for arm, a in res["arms"].items():
            L += ["", f"### {unit}: {arm} (space: {json.dumps(a['space'])})", ""]
            tasks = list(a["trials"][0]["scores"])
            head = ["trial", "settings", "mean"] + tasks + ["collapse", "what it did"]
            L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for i, t in enumerate(a["trials"]):
                mark = (lambda s: f"**{s}**") if i == a["pick"] else (lambda s: s)
                cells = [mark(str(i) + (" (default)" if i == 0 else "")),
                         ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}"
                                   for k, v in t["settings"].items()),
                         mark(f"{t['score']:.3f}")] + [f"{t['scores'][k]:.3f}" for k in tasks]
                below = "" if t.get("trained", True) else (
                    " (*not trained*: below the margin bar; no trial reached it, so the best of all)" if i == a["pick"]
                    else " (*not trained*: below the margin bar, not a candidate)")
                what = t.get("diagnostics", "-") + below
                cells += ["; ".join(t["collapse"]) or "-", what]
                L.append("| " + " | ".join(cells) + " |")
    return L + [""]


def render_md(cfg, results, arms):
    L = ["# Study report", ""]
    seeds = cfg.seed_list()
    L.append(f"Models: {', '.join(results['models'])}; design: {'one SFT + DPO per task' if cfg.per_task else 'one model for all tasks (mixed set)'}; "
             f"seeds: {', '.join(map(str, seeds))}; pairs: {cfg.pairs}; wall time of this invocation: "
             f"{results['wall_seconds']:.0f} s.")
    L.append("")
    L.append("Differences are B - A on the same test items, with a 95% interval and the p-value of the paired test "
             "of `python -m minift.evaluate compare` (exact McNemar for accuracy, interval by paired bootstrap; "
             "paired bootstrap, 10,000 resamples, for F1, ROUGE-L and key-fact recall). "
             + ("Over several seeds: mean ± sd of the metric and of the difference; p-values listed per seed."
                if len(seeds) > 1 else ""))
    L.append("Primary metrics (**bold**): classification macro-F1, reasoning accuracy, summarization key-fact "
             "recall (completeness of diagnosis, new medication and follow-up, what the study's clinicians graded; "
             "ROUGE-L measures wording overlap with one reference), triage provider macro-F1.")
    for model in results["models"]:
        L += ["", f"## {model}", ""]
        head = ["task", "metric", "base"] + [a.upper() if a in ("sft", "dpo") else a for a in arms]
        head += [f"{a.upper() if a in ('sft', 'dpo') else a} - {r if r in ('base', 'sft-more') else r.upper()} [95% CI], p"
                 for a, r in comparisons(arms)]
        L.append("| " + " | ".join(head) + " |")
        L.append("|" + "---|" * len(head))
        for row in (r for r in results["table"] if r["model"] == model):
            metric = f"**{row['metric']}**" if row["primary"] else row["metric"]
            task = row["task"] if cfg.per_task or row["unit"] == "clinical" else f"{row['unit']}/{row['task']}"
            cells = [task, metric, f"{row['base']:.3f}"] + [fmt_mean(row[a]) for a in arms]
            for a, r in comparisons(arms):
                res = row[f"{a}_vs_{r}"]
                d = [r["diff"] for r in res]
                ps = ", ".join(fmt_p(r["p_value"]) for r in res)
                ci = f" [{res[0]['ci_low']:+.3f}, {res[0]['ci_high']:+.3f}]" if len(res) == 1 else ""
                sd = f" ± {np.std(d, ddof=1):.3f}" if len(d) > 1 else ""
                cells.append(f"{np.mean(d):+.3f}{sd}{ci}, p{'' if ps.startswith('<') else '='}{ps}")
            L.append("| " + " | ".join(cells) + " |")
    if results.get("tune"):
        L += [""] + tune_md(results["tune"])
    L += ["", "## What each preference arm did", "",
          "On the arm's held-out pairs (the eval split its trainer keeps out): the margin between the chosen and the "
          "rejected answers' log-ratios to the reference (TRL's rewards/margins / beta, nats) at step 0 and at the "
          "end, the reward accuracy, and the chosen and rejected answers' log-prob change from the reference at the "
          "end (both falling is likelihood displacement); then the share of test answers that differ from SFT's. "
          f"Verdict: trained when the margin grew by >= {MIN_GAIN:g} nat, displacement when the chosen answers also "
          f"lost more than {DISPLACED:g} nat (minift/study/diagnostics.py).", ""]
    L += [f"- {run} {arm}: {d['verdict']}" + (f" (reward accuracy {d['accuracy_start']:.2f} -> {d['accuracy_end']:.2f})"
                                               if d.get("accuracy_end") is not None else "")
          for run, arms_d in results["diagnostics"].items() for arm, d in arms_d.items()] or ["- no preference arm."]
    L += ["", "## Collapse check", ""]
    L.append(f"A run is flagged when one answer is more than {COLLAPSE:.0%} of a task's predictions "
             "(and not of the gold labels).")
    L.append("")
    L += [f"- **collapse**: {f['model']} {f['unit']} {f['task']} {f['run']}: {f['answer']}" for f in results["collapse"]] \
        or ["- no run is flagged."]
    L += ["", "## Preference pairs", ""]
    for model, mres in results["models"].items():
        for unit, ures in mres["units"].items():
            for s, sres in ures["seeds"].items():
                for arm, r in sres.items():
                    if r.get("pairs"):
                        p = r["pairs"]
                        L.append(f"- {model} {unit} seed {s} ({arm}): sources {p['sources']}")
                        for task, flds in p["counts"].items():
                            for fld, labs in flds.items():
                                cells = ", ".join(f"{k} {c}/{rj}" for k, (c, rj) in sorted(labs.items()))
                                L.append(f"  - {task} {fld} (chosen/rejected): {cells}")
                        L += [f"  - **warning**: {w}" for w in p["warnings"]] or ["  - no label imbalance warning"]
    L += ["", "## Compute", "", "FLOPs by the FLOP model of `minift/study/flops.py` (bench/README.md); wall seconds as run "
          "on this machine (the training phase: model load, reference pass, steps, the trainer's periodic eval). "
          "Naive DPO: the same DPO steps in the concat layout with full logits and the reference recomputed "
          f"in every step. The paper reports DPO at about {PAPER_RATIO} the compute of SFT. The arms may train for "
          "other numbers of epochs (SFT 3, DPO 1 by default): 'per example' divides each arm's FLOPs by the "
          "examples (pairs) it trained on, the like-for-like ratio.", ""]
    L.append("| run | arm | wall s | steps (s) | reference pass s | train FLOPs | reference FLOPs | vs SFT (wall / FLOPs) | "
             "naive layout FLOPs (vs SFT) | per example vs SFT: minift / naive |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for run, comp in results["compute"].items():
        sft = comp.get("sft")
        for arm, c in comp.items():
            tot = c["train"] + c["reference"]
            ratio = (f"{c['wall_seconds'] / sft['wall_seconds']:.2f}x / {tot / sft['train']:.2f}x" if sft else "-")
            naive = f"{c['naive']:.3g} ({c['naive'] / sft['train']:.2f}x)" if sft and c["reference"] else "-"
            per = "-"
            if sft and c.get("examples_seen") and sft.get("examples_seen"):
                unit = sft["train"] / sft["examples_seen"]  # SFT FLOPs per example
                per = f"{tot / c['examples_seen'] / unit:.2f}x"
                per += f" / {c['naive'] / c['examples_seen'] / unit:.2f}x" if c["reference"] else ""
            L.append(f"| {run} | {arm} | {c['wall_seconds']:.0f} | {c['steps']} ({c['step_seconds']:.0f}) | "
                     f"{c['reference_seconds']:.0f} | {c['train']:.3g} | {c['reference']:.3g} | {ratio} | {naive} | {per} |")
    L += ["", "## Phase times", "", "| run | phase | seconds |", "|---|---|---|"]
    for model, mres in results["models"].items():
        for unit, ures in mres["units"].items():
            L.append(f"| {model}/{unit} | base eval | {ures['base']['seconds']:.0f} |")
            for s, sres in ures["seeds"].items():
                for arm, r in sres.items():
                    if r.get("pairs_seconds") is not None:
                        L.append(f"| {model}/{unit}/seed{s} | {arm} pairs | {r['pairs_seconds']:.0f} |")
                    L.append(f"| {model}/{unit}/seed{s} | {arm} train | {r['train_seconds']:.0f} |")
                    L.append(f"| {model}/{unit}/seed{s} | {arm} eval | {r['eval_seconds']:.0f} |")
    L += ["", "Phase times are those of the run that produced each phase (a skipped phase keeps its time).", ""]
    return "\n".join(L)


def plot(cfg, results, arms, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, u, t) for m, mres in results["models"].items() for u, ures in mres["units"].items()
              for t in ures["tasks"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (model, unit, task) in zip(axes[0], panels):
        ures = results["models"][model]["units"][unit]
        s0 = next(iter(ures["seeds"]))
        runs = [("base", ures["base"]["dir"])] + [(a, ures["seeds"][s0][a]["eval_dir"]) for a in arms]
        vals = [interval(d, task, min(cfg.n_boot, 2000)) for _, d in runs]
        x = np.arange(len(runs))
        ax.bar(x, [v for v, _, _ in vals], color=["#999999", "#4c72b0", "#dd8452", "#55a868", "#c44e52"][:len(runs)])
        ax.errorbar(x, [v for v, _, _ in vals], yerr=[[v - lo for v, lo, _ in vals], [hi - v for v, _, hi in vals]],
                    fmt="none", ecolor="black", capsize=3)
        ax.set_xticks(x, [n for n, _ in runs])
        ax.set_ylim(0, 1)
        ax.set_title(f"{task}\n{PRIMARY[task]}" + (f" ({model})" if len(results["models"]) > 1 else ""), fontsize=9)
    fig.suptitle("primary metric per task, 95% bootstrap interval" + (f", seed {s0}" if len(cfg.seed_list()) > 1 else ""),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
