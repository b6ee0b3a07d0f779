"""Bad input through the real command-line entry points of evaluation and generation (`minift-eval`, which is
`python -m minift.evaluate` with its `compare` and `rescore` subcommands, and `minift-generate`): every flag and
every file they read. Each case must end in exactly one `error: ...` line naming the flag or file, exit code 2,
and no traceback. The entry points run in this process (minift.cli.evaluate / generate, what the console
scripts call); one case also runs as a subprocess to prove the console path prints the same."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minift import cli

ROOT = Path(__file__).resolve().parent.parent
TRIAGE = [json.loads(x) for x in (ROOT / "minift/datasets/triage/test.jsonl").read_text().splitlines()[:3]]
CLASSIF = [json.loads(x) for x in (ROOT / "minift/datasets/classification/test.jsonl").read_text().splitlines()[:3]]


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _record(task, i, gold="current", **kw):  # a predictions.jsonl record as minift.eval.evaluate writes one
    return {"task": task, "id": str(i), "output": gold, "gold": gold, "pred": gold, "correct": True,
            "parsed": True, **kw}


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_llama):
    """Every bad file the cases name, built once: {name: path}."""
    d = tmp_path_factory.mktemp("bad")
    f = {"tiny": tiny_llama[0], "dir": d, "file": d / "plain.txt"}
    f["file"].write_text("not a directory\n")
    # checkpoints
    for name, files_in in (("no_tok", {"config.json": "{}"}), ("bad_config", {"config.json": "{oops"}),
                           ("bad_type", {"config.json": json.dumps({"model_type": "gpt2"})})):
        (d / name).mkdir()
        for fn, text in files_in.items():
            (d / name / fn).write_text(text)
    for name in ("bad_config", "bad_type"):
        (d / name / "tokenizer.json").write_text((tiny_llama[0] / "tokenizer.json").read_text())
    shutil.copytree(tiny_llama[0], d / "bad_tokjson")  # a whole checkpoint but for its tokenizer.json
    (d / "bad_tokjson" / "tokenizer.json").write_text("not json")
    # adapters
    (d / "empty_adapter").mkdir()
    (d / "bad_adapter_json").mkdir()
    (d / "bad_adapter_json" / "adapter_config.json").write_text("{")
    (d / "bad_adapter_json" / "adapter_model.safetensors").write_bytes(b"")
    import minift
    from minift.model.lora import apply_lora, save_adapter

    model, _ = minift.load(str(tiny_llama[0]))
    apply_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    save_adapter(model, d / "wrong_r")
    cfg = json.loads((d / "wrong_r" / "adapter_config.json").read_text())
    (d / "wrong_r" / "adapter_config.json").write_text(json.dumps(dict(cfg, r=8)))
    # evaluation data
    f["empty"] = _jsonl(d / "empty.jsonl", [""])
    f["notjson"] = _jsonl(d / "notjson.jsonl", [CLASSIF[0], "{\"prompt\": "])
    f["latin1"] = d / "latin1.jsonl"
    f["latin1"].write_bytes(json.dumps(CLASSIF[0]).encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')
    f["list_row"] = _jsonl(d / "list_row.jsonl", [CLASSIF[0], [1, 2]])
    f["no_prompt"] = _jsonl(d / "no_prompt.jsonl", [{k: v for k, v in CLASSIF[0].items() if k != "prompt"}])
    f["no_label"] = _jsonl(d / "no_label.jsonl", [{k: v for k, v in CLASSIF[0].items() if k != "label"}])
    f["bad_task"] = _jsonl(d / "bad_task.jsonl", [dict(CLASSIF[0], task="cardiology")])
    f["list_task"] = _jsonl(d / "list_task.jsonl", [dict(CLASSIF[0], task=["triage"])])
    f["no_task"] = _jsonl(d / "no_task.jsonl", [{k: v for k, v in CLASSIF[0].items() if k != "task"}])
    f["dup_id"] = _jsonl(d / "dup_id.jsonl", [CLASSIF[0], dict(CLASSIF[1], id=CLASSIF[0]["id"])])
    f["bad_prompt"] = _jsonl(d / "bad_prompt.jsonl", [dict(CLASSIF[0], prompt=42)])
    f["bad_messages"] = _jsonl(d / "bad_messages.jsonl", [dict(CLASSIF[0], prompt=[{"text": "hi"}])])
    f["bad_label"] = _jsonl(d / "bad_label.jsonl", [dict(CLASSIF[0], label="maybe")])
    reason = json.loads((ROOT / "minift/datasets/reasoning/test.jsonl").read_text().splitlines()[0])
    f["letter_not_option"] = _jsonl(d / "letter.jsonl", [dict(reason, label="F")])
    f["options_list"] = _jsonl(d / "options_list.jsonl", [dict(reason, options=list(reason["options"].values()))])
    f["bad_triage"] = _jsonl(d / "bad_triage.jsonl", [dict(TRIAGE[0], labels="urgent")])
    # runs for compare / rescore
    good = [_record("classification", i) for i in range(3)]
    for name, rows in (("run_ok", good), ("run_short", good[:2]), ("run_list", [good[0], [1]]),
                       ("run_no_id", [{k: v for k, v in good[0].items() if k != "id"}]),
                       ("run_bad_task", [dict(good[0], task="cardiology")]), ("run_dup", [good[0], good[0]]),
                       ("run_gold", [good[0], good[1], dict(good[2], gold="past")]),
                       ("run_no_correct", [{k: v for k, v in r.items() if k != "correct"} for r in good])):
        (d / name).mkdir()
        _jsonl(d / name / "predictions.jsonl", rows)
    (d / "run_empty").mkdir()
    (d / "run_latin1").mkdir()
    (d / "run_latin1" / "predictions.jsonl").write_bytes(b'{"task": "caf\xe9"}\n')
    summary = {"config": {"task": "classification", "split": "test", "data": None, "limit": 3}, "tasks": {}}
    for name, text in (("sum_notjson", "{"), ("sum_list", "[]"),
                       ("sum_unknown_key", json.dumps(dict(summary, config=dict(summary["config"], lr=1)))),
                       ("sum_bad_limit", json.dumps(dict(summary, config=dict(summary["config"], limit="x")))),
                       ("sum_bad_task", json.dumps(dict(summary, config=dict(summary["config"], task="x")))),
                       ("sum_missing_item", json.dumps(summary))):
        (d / name).mkdir()
        (d / name / "summary.json").write_text(text)
        _jsonl(d / name / "predictions.jsonl", good[:1])
    return {k: str(v) for k, v in f.items()}


G, E = "generate", "evaluate"
NO_CUDA = not torch.cuda.is_available()
# (command, argv with {placeholders} from `files`, words the error line must contain)
CASES = [
    # --- minift-generate: numbers
    (G, "--prompt hi --max-new-tokens 0", "--max-new-tokens: must be at least 1"),
    (G, "--prompt hi --max-new-tokens -5", "--max-new-tokens: must be at least 1"),
    (G, "--prompt hi --max-new-tokens abc", "an integer is needed"),
    (G, "--prompt hi --max-new-tokens 1e9", "an integer is needed"),
    (G, "--prompt hi --max-new-tokens 99999999", "--max-new-tokens: must be at most"),
    (G, "--prompt hi --temperature nan", "--temperature: must be a finite number"),
    (G, "--prompt hi --temperature inf", "--temperature: must be a finite number"),
    (G, "--prompt hi --temperature -1", "--temperature: must be at least 0"),
    (G, "--prompt hi --top-p 0", "--top-p: must be greater than 0"),
    (G, "--prompt hi --top-p 1.5", "--top-p: must be at most 1"),
    (G, "--prompt hi --top-p nan", "--top-p: must be a finite number"),
    (G, "--prompt hi --seed -1", "--seed: must be at least 0"),
    (G, "--prompt hi --seed 99999999999999999999", "--seed: must be less than"),
    (G, "--prompt hi --seed 1.5", "--seed: an integer is needed"),
    # --- minift-generate: device, dtype, flags
    (G, "--prompt hi --device tpu", "--device: unknown device 'tpu'"),
    pytest.param(G, "--prompt hi --device cuda", "no CUDA device", marks=pytest.mark.skipif(not NO_CUDA, reason="GPU")),
    (G, "--prompt hi --device cuda:99", "--device: cuda:99"),
    (G, "--prompt hi --dtype float64", "--dtype: invalid choice"),
    (G, "--max-new-tokens 3", "the following arguments are required: --prompt"),
    (G, "--prompt hi --frobnicate", "unrecognized arguments: --frobnicate"),
    (G, "--prompt", "--prompt: expected one argument"),
    # --- minift-generate: checkpoint and adapter paths
    (G, "--prompt hi --ckpt {dir}/nowhere", "--ckpt {dir}/nowhere: not found"),
    (G, "--prompt hi --ckpt {file}", "--ckpt {file}: not a directory"),
    (G, "--prompt hi --ckpt {dir}/no_tok", "no tokenizer.json"),
    (G, "--prompt hi --ckpt {dir}/bad_config", "config.json: not valid JSON"),
    (G, "--prompt hi --ckpt {dir}/bad_type", "unsupported model_type 'gpt2'"),
    (G, "--prompt hi --ckpt {dir}/bad_tokjson", "cannot be read by the tokenizers library"),
    (G, "--prompt hi --adapter {dir}/nowhere", "--adapter {dir}/nowhere: not found"),
    (G, "--prompt hi --adapter {file}", "--adapter {file}: not a directory"),
    (G, "--prompt hi --ckpt {tiny} --adapter {dir}/empty_adapter", "adapter_config.json: not found"),
    (G, "--prompt hi --ckpt {tiny} --adapter {dir}/bad_adapter_json", "adapter_config.json: not valid JSON"),
    (G, "--prompt hi --ckpt {tiny} --adapter {dir}/wrong_r", "has shape"),
    # --- minift-eval (run): numbers and names
    (E, "--task cardiology", "unknown task 'cardiology'"),
    (E, "--limit 0", "--limit: must be at least 1"),
    (E, "--limit x", "--limit: an integer is needed"),
    (E, "--batch-size 0", "--batch-size: must be at least 1"),
    (E, "--batch-size nan", "--batch-size: an integer is needed"),
    (E, "--max-new-tokens -1", "--max-new-tokens: must be at least 1"),
    (E, "--device cpu0", "--device: unknown device"),
    (E, "--dtype fp8", "--dtype: invalid choice"),
    (E, "--split ../../etc", "--split '../../etc': a split name"),
    (E, "--task triage --split nosuch", "nosuch.jsonl: file not found"),
    (E, "--unknown 3", "unrecognized arguments: --unknown"),
    # --- minift-eval (run): data files
    (E, "--data {dir}/nowhere.jsonl", "nowhere.jsonl: file not found"),
    (E, "--data {dir}", "a directory, not a JSONL file"),
    (E, "--task classification --data {empty}", "no rows (empty file)"),
    (E, "--task classification --data {notjson}", "notjson.jsonl:2: not valid JSON"),
    (E, "--task classification --data {latin1}", "latin1.jsonl:2: not UTF-8 text"),
    (E, "--task classification --data {list_row}", "list_row.jsonl:2: a test row must be a JSON object"),
    (E, "--task classification --data {no_prompt}", "no_prompt.jsonl:1: missing 'prompt'"),
    (E, "--task classification --data {no_label}", "no_label.jsonl:1: missing 'label'"),
    (E, "--data {bad_task}", "bad_task.jsonl:1: unknown task 'cardiology'"),
    (E, "--data {list_task}", "list_task.jsonl:1: unknown task ['triage']"),
    (E, "--data {no_task}", "no_task.jsonl:1: row has no 'task' field"),
    (E, "--task classification --data {dup_id}", "dup_id.jsonl:2: duplicate id"),
    (E, "--task classification --data {bad_prompt}", "bad_prompt.jsonl:1: 'prompt' must be"),
    (E, "--task classification --data {bad_messages}", "bad_messages.jsonl:1: each prompt message needs"),
    (E, "--task triage --data {bad_triage}", "bad_triage.jsonl:1:"),
    (E, "--task classification --data {bad_label}", "bad_label.jsonl:1: label 'maybe' is not one of"),
    (E, "--task reasoning --data {letter_not_option}", "letter.jsonl:1: label 'F' is not one of the options"),
    (E, "--task reasoning --data {options_list}", "options_list.jsonl:1: task 'reasoning' cannot score"),
    # --- minift-eval (run): checkpoint, adapter and output paths
    (E, "--task triage --limit 1 --ckpt {dir}/nowhere", "--ckpt {dir}/nowhere: not found"),
    (E, "--task triage --limit 1 --ckpt {dir}/no_tok", "no tokenizer.json"),
    (E, "--task triage --limit 1 --adapter {file}", "--adapter {file}: not a directory"),
    (E, "--task triage --limit 1 --out {file}", "--out {file}: a file, not a directory"),
    (E, "--task triage --limit 1 --out {file}/sub", "--out {file}/sub: cannot create the directory"),
    # --- compare
    (E, "compare {dir}/run_ok", "the following arguments are required: run_b"),
    (E, "compare {dir}/nowhere {dir}/run_ok", "{dir}/nowhere: not found"),
    (E, "compare {dir}/run_empty {dir}/run_ok", "run_empty: no predictions.jsonl"),
    (E, "compare {dir}/run_ok {dir}/run_short", "were evaluated on different items"),
    (E, "compare {dir}/run_ok {dir}/run_gold", "different gold answers"),
    (E, "compare {dir}/run_ok {dir}/run_list", "predictions.jsonl:2: not an evaluation record"),
    (E, "compare {dir}/run_ok {dir}/run_no_id", "predictions.jsonl:1: not an evaluation record"),
    (E, "compare {dir}/run_ok {dir}/run_bad_task", "predictions.jsonl:1: unknown task 'cardiology'"),
    (E, "compare {dir}/run_ok {dir}/run_dup", "predictions.jsonl:2: classification item '0' appears twice"),
    (E, "compare {dir}/run_ok {dir}/run_no_correct", "lack what the paired tests read"),
    (E, "compare {dir}/run_ok {dir}/run_latin1", "predictions.jsonl:1: not UTF-8 text"),
    (E, "compare {dir}/run_ok {dir}/run_ok --n-boot 0", "--n-boot: must be at least 100"),
    (E, "compare {dir}/run_ok {dir}/run_ok --n-boot inf", "--n-boot: an integer is needed"),
    (E, "compare {dir}/run_ok {dir}/run_ok --seed -3", "--seed: must be at least 0"),
    (E, "compare {dir}/run_ok {dir}/run_ok --out {dir}", "--out {dir}: a directory"),
    (E, "compare {dir}/run_ok {dir}/run_ok --out {dir}/no/such.json", "its directory does not exist"),
    # --- rescore
    (E, "rescore", "the following arguments are required: run"),
    (E, "rescore {dir}/nowhere", "nowhere: no summary.json"),
    (E, "rescore {dir}/run_ok", "run_ok: no summary.json"),
    (E, "rescore {dir}/sum_notjson", "summary.json: not valid JSON"),
    (E, "rescore {dir}/sum_list", "summary.json: not an evaluation summary"),
    (E, "rescore {dir}/sum_unknown_key", "summary.json: not an evaluation summary"),
    (E, "rescore {dir}/sum_bad_limit", "summary.json: config 'limit'"),
    (E, "rescore {dir}/sum_bad_task", "unknown task 'x'"),
    (E, "rescore {dir}/sum_missing_item", "no saved output for classification item"),
]


@pytest.mark.parametrize("command,argv,words", CASES)
def test_bad_input_is_one_error_line(files, capsys, tmp_path, monkeypatch, command, argv, words):
    monkeypatch.chdir(tmp_path)  # default output dirs (runs/eval/...) must not land in the repository
    argv = argv.format(**files).split()
    with pytest.raises(SystemExit) as exit_:
        getattr(cli, command)(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert words.format(**files) in lines[0], lines[0]


def test_console_path_prints_the_same_line(files):
    # The installed console command and `python -m` go through the same run_cli: one line, exit 2.
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "minift.evaluate", "--task", "classification", "--data",
                           files["latin1"]], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {files['latin1']}:2: not UTF-8 text (save the file as UTF-8)"]


def test_a_byte_order_mark_is_accepted(files, tmp_path):
    # A JSONL saved with a UTF-8 BOM (Windows editors, spreadsheet exports) is valid data: evaluated, not refused.
    data = tmp_path / "bom.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in TRIAGE[:2]).encode())
    out = tmp_path / "run"
    cli.evaluate(["--ckpt", files["tiny"], "--task", "triage", "--data", str(data), "--out", str(out),
                  "--max-new-tokens", "2", "--device", "cpu"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks"]["triage"]["n"] == 2
    ids = [json.loads(x)["id"] for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert ids == [TRIAGE[0]["id"], TRIAGE[1]["id"]]  # the first row's id read through the BOM
