"""Phases of the study: a folder whose phase.json holds a hash of the phase's inputs, so that running the
same study again skips what is done and up to date, redoes what changed, and resumes an interrupted training.

    phase = Phase(out_dir, "sft", {"config": ..., "data": file_digest(path)}, log)
    state = phase.run(lambda resume: {...extra info...}, resumable=True)
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from pathlib import Path

from minift.errors import MinifTError


def file_digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_digest(ckpt_dir: Path) -> str:
    """config.json and tokenizer contents plus weight file names and sizes (hashing GBs of weights on every
    run would cost more than some phases)."""
    parts = []
    for p in sorted(ckpt_dir.iterdir()):
        if p.suffix in (".json", ".jinja", ".model"):
            parts.append((p.name, file_digest(p)))
        elif p.suffix in (".safetensors", ".bin"):
            parts.append((p.name, p.stat().st_size))
    return digest(parts)


def adapter_digest(adapter_dir) -> str:
    return digest([file_digest(Path(adapter_dir) / n) for n in ("adapter_model.safetensors", "adapter_config.json")])


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_ckpt(ckpt) -> Path:
    """The checkpoint dir (the embedded default is fetched/converted on first use); one error if unusable."""
    if ckpt is None:
        try:
            from minift.model.fetch import default_checkpoint
        except ImportError:
            from minift.model.gguf import default_checkpoint
        return Path(default_checkpoint())
    p = Path(ckpt)
    if not p.is_dir():
        raise MinifTError(f"--ckpt {ckpt}: checkpoint directory not found")
    if not (p / "config.json").is_file():
        raise MinifTError(f"--ckpt {ckpt}: no config.json (not a Hugging Face checkpoint dir)")
    from minift.model.config import ModelConfig

    ModelConfig.from_hf(p / "config.json")  # an unsupported architecture fails here, before any phase
    return p


# --------------------------------------------------------------------------------------------- phases
class Phase:
    """A folder with phase.json {"key", "done", "seconds", ...}; `run` skips it when done with the same key."""

    def __init__(self, out: Path, name: str, key_parts: dict, log):
        self.dir, self.name, self.key, self.log = out, name, digest(key_parts), log
        self.parts = key_parts

    def state(self) -> dict:
        f = self.dir / "phase.json"
        return json.loads(f.read_text()) if f.is_file() else {}

    def done(self) -> bool:
        s = self.state()
        return s.get("key") == self.key and s.get("done", False)

    def run(self, fn, resumable=False) -> dict:
        """fn(resume: bool) -> extra info for phase.json. Returns the phase's state. Two study processes on one
        output folder may run different phases at once: a phase that another live process is running is waited
        for (its lock file names that process), then skipped if it finished."""
        lock = self.dir.parent / f".{self.dir.name}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        waited = False
        while True:
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                if not _alive(lock):
                    lock.unlink(missing_ok=True)  # left by a process that died
                    continue
                if not waited:
                    self.log(f"[wait] {self.name}: another process is running it ({lock})")
                    waited = True
                time.sleep(5)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        try:
            return self._run(fn, resumable)
        finally:
            lock.unlink(missing_ok=True)

    def _run(self, fn, resumable):
        if self.done():
            self.log(f"[skip] {self.name}: up to date ({self.dir})")
            return self.state()
        s = self.state()
        resume = resumable and s.get("key") == self.key and (self.dir / "checkpoint.pt").is_file()
        if not resume and self.dir.exists():
            shutil.rmtree(self.dir)  # stale outputs of other inputs
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write({"key": self.key, "done": False, "inputs": self.parts})
        self.log(f"[run] {self.name}" + (" (resuming)" if resume else "") + f" -> {self.dir}")
        t0 = time.perf_counter()
        before = s.get("seconds_before", 0.0) if resume else 0.0
        try:
            extra = fn(resume) or {}
        except BaseException:  # Ctrl-C, a bad row ...: keep the time spent, for the resumed run's total
            self._write({"key": self.key, "done": False, "inputs": self.parts,
                         "seconds_before": round(before + time.perf_counter() - t0, 1)})
            raise
        seconds = time.perf_counter() - t0 + before
        state = {"key": self.key, "done": True, "seconds": round(seconds, 1), "inputs": self.parts, **extra}
        self._write(state)
        self.log(f"[done] {self.name} in {seconds:.0f} s")
        return state

    def _write(self, state):
        tmp = self.dir / "phase.json.tmp"
        tmp.write_text(json.dumps(state, indent=2, default=str) + "\n")
        tmp.replace(self.dir / "phase.json")


class Tee(io.TextIOBase):
    """Write to the terminal and keep a copy (the reference pass reports its time on stderr)."""

    def __init__(self, stream):
        self.stream, self.text = stream, []

    def write(self, s):
        self.text.append(s)
        return self.stream.write(s)

    def flush(self):
        self.stream.flush()


def _alive(lock: Path) -> bool:
    """Whether the process named in a lock file is still running."""
    try:
        text = lock.read_text()
        if not text:
            return True  # just created: its process is writing its pid
        os.kill(int(text), 0)
        return True
    except (ValueError, ProcessLookupError, FileNotFoundError):
        return False
    except PermissionError:
        return True
