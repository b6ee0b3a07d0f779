"""minift as an installed package: beside Hugging Face's `kernels` package, and as a wheel in a fresh venv.

(a) Our kernels/ folder installs as `minift.kernels`, so Hugging Face's `kernels` (the hub-kernels library that
    transformers uses on GPUs) can be installed beside it: both import, and a tiny SFT run trains, from inside
    the repository and from outside it.
(b) The wheel carries the package, the kernels and the bundled data; installed into a fresh venv (the venv sees
    the system's torch and other dependencies, but its minift is the wheel's, which the test proves), the console
    commands run with their defaults from another directory and find the data through importlib.resources.
"""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("minift-sft", "minift-dpo", "minift-eval", "minift-generate")


def _hf_kernels_installed():
    try:
        metadata.distribution("kernels")  # by its distribution: `import kernels` here may find our folder
        return True
    except metadata.PackageNotFoundError:
        return False


def _small_sft(path, n=6):
    lines = (ROOT / "minift" / "datasets" / "clinical" / "sft.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# A script run from a file; the test below also runs it with the repository root first on sys.path (as
# `python -m pytest` and `python train_sft.py` put it), where no folder of ours may hide Hugging Face's package.
BOTH = """
import importlib, json, sys
from pathlib import Path
import minift.kernels as ours
hf = importlib.import_module("kernels")  # Hugging Face's; by name, so no line here reads as importing ours
from minift.cli import sft
ckpt, data, out = sys.argv[1:4]
assert callable(getattr(hf, "get_kernel", None)), hf.__file__  # Hugging Face's package, not our folder
assert hasattr(ours, "linear_token_logprobs") and Path(ours.__file__).parent.name == "kernels", ours.__file__
sft(["--ckpt", ckpt, "--data", data, "--out", out, "--max-steps", "2", "--batch-size", "2", "--max-length",
     "1024", "--eval-every", "0", "--eval-fraction", "0", "--no-progress"])
print(json.dumps({"hf": hf.__file__, "ours": ours.__file__}))
"""


@pytest.mark.skipif(not _hf_kernels_installed(), reason="Hugging Face's kernels is not installed (pip install "
                                                        "-e '.[test]' installs it)")
@pytest.mark.slow  # two interpreter starts, each a tiny training run (~10 s of CPU each)
@pytest.mark.parametrize("where", ["inside", "outside"])
def test_hf_kernels_beside_ours(tiny_llama, tmp_path, where):
    script = tmp_path / "both.py"
    script.write_text(BOTH)
    out = tmp_path / "run"
    cwd = ROOT if where == "inside" else tmp_path
    env = dict(os.environ, PYTHONPATH=str(ROOT)) if where == "inside" else os.environ  # the root first on sys.path
    proc = subprocess.run([sys.executable, str(script), str(tiny_llama[0]), str(_small_sft(tmp_path / "d.jsonl")),
                           str(out)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "site-packages" in files["hf"] and not files["hf"].startswith(str(ROOT))
    assert files["ours"] == str(ROOT / "minift" / "kernels" / "__init__.py")
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in x]
    assert [s["step"] for s in steps] == [1, 2] and all(0 < s["loss"] < 20 for s in steps)
    assert (out / "adapter_model.safetensors").is_file()


def test_no_top_level_folder_shadows_an_installed_package():
    """`python -m pytest`, `python -c` and `python train_sft.py` put the repository root first on sys.path: a
    folder there named like an installed module (kernels/ beside Hugging Face's `kernels` broke transformers'
    import) would be imported instead of it."""
    installed = set(metadata.packages_distributions())
    ours = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    ours |= {p.stem for p in ROOT.glob("*.py")}
    assert ours - {"minift"} <= {"setup", "train_sft", "train_dpo"}, ours  # scripts, not packages
    assert not (ours - {"minift"}) & installed, (ours - {"minift"}) & installed


def test_transformers_imports_from_the_repository_root():
    # transformers imports Hugging Face's `kernels` when that is installed: with the root on sys.path (python -c
    # puts the working directory there), it must still find the installed package.
    proc = subprocess.run([sys.executable, "-c", "from transformers import LlamaConfig, LlamaForCausalLM"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _source_copy(dst):
    """The working tree without build outputs, so that building the wheel writes nothing into the repository."""
    skip = shutil.ignore_patterns(".git", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                  "results", "out")
    shutil.copytree(ROOT, dst, ignore=skip)
    return dst


@pytest.mark.slow  # a wheel build, a venv, and four console commands on the embedded model (~1-2 min)
def test_wheel_in_a_fresh_venv(tmp_path):
    src = _source_copy(tmp_path / "src")
    dist = tmp_path / "dist"
    # Without build isolation the build runs with the source dir first on sys.path, where a top-level kernels/
    # folder would hide Hugging Face's `kernels` (setuptools loads the egg_info writer it registers,
    # kernels.locking): everything of ours lies under minift/, so this build must pass beside it.
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(dist), str(src)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = dist.glob("minift-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "minift/kernels/__init__.py" in names and "minift/kernels/triton_logprobs.py" in names
    for task in ("clinical", "classification", "reasoning", "summarization", "triage"):
        for split in ("sft", "dpo", "val", "test"):
            assert f"minift/datasets/{task}/{split}.jsonl" in names, (task, split)
    assert not [n for n in names if n.split("/")[0] in ("kernels", "data", "tests", "bench")]  # nothing else top-level
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert all(c in zipfile.ZipFile(wheel).read(entry).decode() for c in COMMANDS)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    py, bindir = venv / "bin" / "python", venv / "bin"
    # --ignore-installed: the system's editable minift is visible to the venv; the wheel goes into the venv anyway
    inst = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--ignore-installed", "--no-index",
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr[-3000:]

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"

    def run(*cmd, timeout=300):
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=work, env=env,
                              timeout=timeout)
        assert proc.returncode == 0, (cmd, proc.stderr[-3000:])
        return proc.stdout

    # The venv's minift is the wheel's: its files, its kernels and its data lie in the venv, and pip recorded the
    # wheel file (an editable install records a directory with "editable": true).
    probe = run(py, "-c", "import json, minift, minift.kernels, minift.defaults as d; from importlib import "
                          "metadata, resources; dist = metadata.distribution('minift'); "
                          "f = resources.files('minift.datasets') / 'clinical' / 'sft.jsonl'; "
                          "print(json.dumps({'minift': minift.__file__, 'kernels': minift.kernels.__file__, "
                          "'data_dir': str(d.DATA_DIR), 'sft': str(f), 'sft_is_file': f.is_file(), "
                          "'direct_url': dist.read_text('direct_url.json')}))")
    info = json.loads(probe.strip().splitlines()[-1])
    for key in ("minift", "kernels", "data_dir", "sft"):
        assert info[key].startswith(str(venv)) and not info[key].startswith(str(ROOT)), (key, info[key])
    assert info["sft_is_file"]
    url = json.loads(info["direct_url"])
    assert url["url"].endswith(wheel.name) and "dir_info" not in url

    for cmd in COMMANDS:
        assert (bindir / cmd).is_file(), cmd
    # The defaults: the embedded model and the bundled data, found from another directory. Kept short.
    short = ("--max-steps", "1", "--batch-size", "1", "--eval-every", "0", "--eval-fraction", "0", "--no-progress")
    run(bindir / "minift-sft", *short)
    metrics = [json.loads(x) for x in (work / "runs" / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("step") == 1 and m["loss"] > 0 for m in metrics)
    # the cached reference would take one pass over all 200 pairs; the live reference keeps this to one step
    run(bindir / "minift-dpo", *short, "--ref", "adapters-off", "--adapter", work / "runs" / "sft")
    assert (work / "runs" / "dpo" / "adapter_model.safetensors").is_file()
    run(bindir / "minift-eval", "--task", "triage", "--limit", "2", "--max-new-tokens", "4")
    summary = json.loads((work / "runs" / "eval" / "base_triage" / "summary.json").read_text())
    assert summary["tasks"]["triage"]["n"] == 2
    out = run(bindir / "minift-generate", "--prompt", "What is the capital of France?", "--max-new-tokens", "8")
    assert out.strip()
