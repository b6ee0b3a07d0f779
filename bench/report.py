"""Rich tables and matplotlib charts for bench_step.py and bench_peers.py."""
from rich.console import Console
from rich.table import Table

console = Console(width=170)
MIB = 2 ** 20


def print_conditions(title, cond):
    info = Table(title=title, show_header=False)
    for k, v in cond.items():
        if k in ("memory_method", "flop_model"):
            continue
        if isinstance(v, float):
            v = f"{v:.1f}"
        info.add_row(k, str(v))
    console.print(info)


def _mib(x):
    return "-" if x is None else f"{x / MIB:.0f}"


def _ratio(r, base):
    m, p = r.get(f"ratio_vs_{base}"), r.get(f"pred_vs_{base}")
    return "-" if m is None else f"{m:.2f} / {p:.2f}"


def print_step(cond, results):
    print_conditions("bench_step: conditions", cond)
    for shape, res in results.items():
        d = res["data"]
        title = (f"{shape}: {d['pairs']} pairs, prompt {d['prompt_mean']:.0f} / chosen {d['chosen_mean']:.0f} / "
                 f"rejected {d['rejected_mean']:.0f} tokens (mean); rows x T: SFT {d['sft_rows_x_T']}, concat "
                 f"{d['concat_rows_x_T']}, shared {d['shared_rows_x_T']}")
        tab = Table(title=title)
        cols = ["variant", "step s", "tokens/s", "peak MiB", "GFLOP", "vocab GFLOP", "MFU",
                "vs SFT naive meas / pred", "vs SFT meas / pred", "loss", "|Δloss| vs naive"]
        for c in cols:
            tab.add_column(c, justify="left" if c == "variant" else "right")
        for r in res["rows"]:
            tab.add_row(f"{r['variant']}: {r['what']}", f"{r['step_s']:.3f}", f"{r['tokens_per_s']:.0f}",
                        _mib(r["peak_bytes"]), f"{r['gflop']:.1f}", f"{r['flops']['vocab'] / 1e9:.1f}",
                        f"{100 * r['mfu']:.0f}%", _ratio(r, "sft_naive"), _ratio(r, "sft"),
                        "-" if r["variant"] == "ref_pass" else f"{r['loss']:.6f}",
                        "-" if r["dloss_vs_naive"] is None else f"{r['dloss_vs_naive']:.1e}")
        console.print(tab)
        amort = next((r["ratio_vs_sft_with_cache_build"] for r in res["rows"] if "ratio_vs_sft_with_cache_build" in r),
                     None)
        if amort:
            console.print(f"{shape}: dpo_cached / sft with the one-time reference pass spread over the run: "
                          + ", ".join(f"{float(v):.2f} over {e} epoch(s)" for e, v in amort.items()))
    console.print("step = forward + backward + clip + AdamW (median of the timed steps); tokens/s counts the data's "
                  "tokens (SFT: prompt + chosen; DPO: prompt once + chosen + rejected). MFU = model FLOPs / step time "
                  f"/ measured matmul peak ({cond['matmul_peak_gflops']:.0f} GFLOP/s). meas = measured step-time "
                  "ratio, pred = FLOP-model ratio, both from this run.")
    console.print("FLOP model: " + cond["flop_model"].replace("\n", " "))
    console.print("Peak memory: " + cond["memory_method"])


def chart_step(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(results)
    fig, axes = plt.subplots(2, len(shapes), figsize=(6.5 * len(shapes), 8), squeeze=False)
    for j, shape in enumerate(shapes):
        rows = results[shape]["rows"]
        names = [r["variant"] for r in rows]
        y = range(len(rows))
        base = "sft" if "ratio_vs_sft" in rows[0] else "sft_naive"
        ax = axes[0][j]
        ax.barh(y, [r[f"ratio_vs_{base}"] for r in rows], color="tab:blue", label="measured")
        ax.scatter([r[f"pred_vs_{base}"] for r in rows], y, color="tab:red", zorder=3, label="FLOP model")
        ax.axvspan(2, 3, color="tab:orange", alpha=0.15, label="study: DPO 2-3x SFT")
        ax.set_yticks(list(y), names)
        ax.invert_yaxis()
        ax.set_xlabel(f"step time / {base} step time")
        ax.set_title(f"{shape}: step cost vs {base}")
        ax.legend(fontsize=8)
        ax = axes[1][j]
        ax.barh(y, [(r["peak_bytes"] or 0) / MIB for r in rows], color="tab:green")
        ax.set_yticks(list(y), names)
        ax.invert_yaxis()
        ax.set_xlabel("peak memory over the loaded model (MiB)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_peers(cond, rows):
    print_conditions("bench_peers: conditions", cond)
    tab = Table(title="same model, data, LoRA, batch and lengths: TRL + PEFT + transformers vs minift")
    for c in ["run", "steps/s", "tokens/s", "peak MiB", "step-0 loss", "|Δloss| vs TRL", "tokens/s vs TRL",
              "memory vs TRL"]:
        tab.add_column(c, justify="left" if c == "run" else "right")
    for r in rows:
        if r.get("skipped"):
            tab.add_row(r["run"], *["-"] * 7)
            continue
        tab.add_row(r["run"], f"{r['steps_per_s']:.3f}", f"{r['tokens_per_s']:.0f}", _mib(r["peak_bytes"]),
                    f"{r['loss0']:.6f}", "-" if r.get("dloss_vs_trl") is None else f"{r['dloss_vs_trl']:.1e}",
                    "-" if r.get("speed_vs_trl") is None else f"{r['speed_vs_trl']:.2f}x",
                    "-" if r.get("memory_vs_trl") is None else f"{r['memory_vs_trl']:.2f}x")
    console.print(tab)
    for r in rows:
        if r.get("skipped"):
            console.print(f"{r['run']}: skipped: {r['skipped']}")
    console.print("tokens/s counts the data's tokens (SFT: prompt + completion; DPO: prompt once + chosen + "
                  "rejected); steps/s from the median timed step. Peak memory: " + cond["memory_method"])


def chart_peers(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if not r.get("skipped")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.35 * len(rows) + 1.5))
    names = [r["run"] for r in rows]
    colors = ["tab:gray" if r["run"].startswith("TRL") else "tab:blue" for r in rows]
    axes[0].barh(names, [r["tokens_per_s"] for r in rows], color=colors)
    axes[0].set_xlabel("tokens/s (higher is better)")
    axes[1].barh(names, [(r["peak_bytes"] or 0) / MIB for r in rows], color=colors)
    axes[1].set_xlabel("peak MiB over the loaded model\n(lower is better)")
    for ax in axes:
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- markdown for bench/README.md: python bench/report.py bench/results/bench_step.json ----------------------


def markdown_step(data):
    c = data["conditions"]
    out = [f"Conditions: {c['device']} ({c['cpu']}), {c['threads']} threads, {c['dtype']}, {c['model']}, "
           f"{c['pairs_per_step']} pairs per step, median of {c['repeats']} steps after a warm-up, measured matmul "
           f"peak {c['matmul_peak_gflops']:.0f} GFLOP/s, torch {c['torch']}, triton {c['triton']}; load average "
           f"{c['load_avg_1m_at_start']:.1f} at start, {c.get('load_avg_1m_at_end', float('nan')):.1f} at end.", ""]
    for shape, res in data["results"].items():
        d = res["data"]
        out += [f"**{shape}** (prompt {d['prompt_mean']:.0f}, chosen {d['chosen_mean']:.0f}, rejected "
                f"{d['rejected_mean']:.0f} tokens on average; rows x T: SFT {d['sft_rows_x_T']}, concat "
                f"{d['concat_rows_x_T']}, shared {d['shared_rows_x_T']})", "",
                "| variant | step s | tokens/s | peak MiB | GFLOP | of which vocab | MFU | vs SFT naive: measured / FLOP model "
                "| vs SFT: measured / FLOP model | loss |", "|---|" + "---:|" * 9]
        for r in res["rows"]:
            out.append(f"| `{r['variant']}` | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {_mib(r['peak_bytes'])} | "
                       f"{r['gflop']:.0f} | {r['flops']['vocab'] / 1e9:.0f} | {100 * r['mfu']:.0f}% | "
                       f"{_ratio(r, 'sft_naive')} | {_ratio(r, 'sft')} | {r['loss']:.6f} |")
        out.append("")
    return "\n".join(out)


def markdown_peers(data):
    c = data["conditions"]
    out = [f"Conditions: {c['device']} ({c['cpu']}), {c['threads']} threads, {c['dtype']}, {c['model']}, "
           f"{c['pairs_per_step']} clinical pairs per step, median of {c['repeats']} steps after a warm-up, torch "
           f"{c['torch']}, transformers {c['transformers']}, peft {c['peft']}, trl {c['trl']}; load average "
           f"{c['load_avg_1m_at_start']:.1f} at start.", "",
           "| run | steps/s | tokens/s | peak MiB | step-0 loss | tokens/s vs TRL | memory vs TRL |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for r in data["results"]:
        if r.get("skipped"):
            out.append(f"| {r['run']} | skipped: {r['skipped']} | | | | | |")
            continue
        out.append(f"| {r['run']} | {r['steps_per_s']:.3f} | {r['tokens_per_s']:.0f} | {_mib(r['peak_bytes'])} | "
                   f"{r['loss0']:.6f} | {r.get('speed_vs_trl', 0):.2f}x | {r.get('memory_vs_trl') or 0:.2f}x |")
    return "\n".join(out)


if __name__ == "__main__":
    import json
    import sys

    payload = json.loads(open(sys.argv[1]).read())
    print(markdown_step(payload) if "matmul_peak_gflops" in payload["conditions"] else markdown_peers(payload))
