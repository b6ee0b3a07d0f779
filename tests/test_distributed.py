"""torchrun on the CPU (gloo): 2 processes x 1 thread train exactly what one process trains with the same
global batch, under DDP and FSDP2, for SFT and DPO; exact resume; SIGTERM; a dying rank; two "nodes" on
loopback. Every launch runs in its own process group with a timeout and is killed as a group on the way out,
so no test leaves a process behind.

Tolerance, 1e-5 relative on losses and adapters: both runs compute the same fp32 sums over the same examples,
but in another order (two half-batches whose gradients are all-reduced instead of one accumulation, other
padding widths, so other matmul shapes). fp32 has a 6e-8 unit roundoff; a few hundred terms per sum and five
AdamW steps (whose update is normalised by the gradient's own size, so a relative error stays relative) leave
~1e-6 at most. Measured here: losses, metrics and adapters bit-identical (each rank's micro-batch has the same
shape as one of the single process's, and the gradient average (2 g_0 + 2 g_1) / 2 is exact in binary), the
gradient norm under FSDP within 1e-7 (summed from per-shard norms). A wrong split (a missing half-batch, a
count divided twice, a reference with the adapters left on) moves the loss or the norm by percents.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import make_hf_model, save_checkpoint

from minift.train import distributed as D

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-5
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env1():
    # One thread per process (what torchrun sets for several processes), and for the one-process references too.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class Launch:
    """A command in its own session (process group): `wait` with a timeout, `kill` the whole group."""

    def __init__(self, cmd):
        self.proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env1(), start_new_session=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait(self, timeout=150):
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            out, _ = self.proc.communicate()
            raise AssertionError(f"timed out after {timeout} s (a hang):\n{out[-3000:]}")
        finally:
            self.kill()
        return self.proc.returncode, out

    def kill(self, sig=signal.SIGKILL):
        try:
            os.killpg(self.proc.pid, sig)  # every process the launch started: torchrun and its ranks
        except ProcessLookupError:
            pass


def torchrun(script, *args, nproc=2, node=None):
    """torchrun on loopback only. node=(n_nodes, node_rank, port) for a multi-node launch."""
    if node is None:
        launcher = ["--standalone", "--nproc-per-node", nproc]
    else:
        n, r, port = node
        launcher = ["--nnodes", n, "--node-rank", r, "--nproc-per-node", nproc, "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"minift-test-{port}"]
    return Launch([sys.executable, "-m", "torch.distributed.run", *launcher, script, *args])


def python(script, *args):
    return Launch([sys.executable, script, *args])


def ok(launch, timeout=150):
    rc, out = launch.wait(timeout)
    assert rc == 0, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    return out


def metrics(out_dir):
    return [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines() if l]


def train_losses(out_dir):
    return {r["step"]: r["loss"] for r in metrics(out_dir) if "loss" in r}


def adapter(out_dir):
    from safetensors.torch import load_file

    return load_file(str(out_dir / "adapter_model.safetensors"))


def assert_same_run(got_dir, want_dir, keys=("loss", "grad_norm", "tokens")):
    """Every logged loss and metric, the gradient norm before clipping (AdamW's update hardly changes when every
    gradient is scaled alike, the norm does: a count divided twice shows here) and the adapter."""
    got, want = metrics(got_dir), metrics(want_dir)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        for k in w:
            if k.startswith(("eval/", "rewards/", "logps/")) or k in keys:
                assert g[k] == pytest.approx(w[k], rel=RTOL, abs=1e-7), (g["step"], k)
    a, b = adapter(got_dir), adapter(want_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=1e-7)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    save_checkpoint(make_hf_model("llama", tie_word_embeddings=True), d / "ckpt", shard=True)
    with open(d / "sft.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": f"add {i} and {i % 7}", "completion": f"it is {i + i % 7}" + "!" * (i % 5)})
                    + "\n")
    with open(d / "dpo.jsonl", "w") as f:
        for i in range(40):
            yes, no = ("yes", "no") if i % 2 == 0 else ("no", "yes")
            f.write(json.dumps({"prompt": f"is {i} even?" + " really" * (i % 3), "chosen": yes + "." * (i % 4),
                                "rejected": no}) + "\n")
    return d


def common(tiny, kind, out, *extra):
    data = tiny / ("sft.jsonl" if kind == "sft" else "dpo.jsonl")
    # dropout 0: W ranks draw other dropout masks than one process (equal in distribution, not in bits).
    # A large lr so that five steps move the adapter far from its start (a wrong reference would show).
    return ["--ckpt", tiny / "ckpt", "--data", data, "--out", out, "--max-steps", 5, "--batch-size", 2,
            "--lora-r", 4, "--lora-alpha", 8, "--lora-dropout", 0, "--lr", 1e-2, "--warmup-steps", 0,
            "--eval-every", 5, "--eval-fraction", 0.2, "--save-every", 0, "--no-progress", *extra]


SCRIPT = {"sft": "train_sft.py", "dpo": "train_dpo.py"}


@pytest.fixture(scope="module")
def single(tiny):
    """One process, global batch 4 (2 x grad-accum 2): the reference runs. DPO starts from the SFT adapter."""
    ok(python("train_sft.py", *common(tiny, "sft", tiny / "one_sft", "--grad-accum", 2)))
    ok(python("train_dpo.py", *common(tiny, "dpo", tiny / "one_dpo", "--grad-accum", 2,
                                      "--adapter", tiny / "one_sft")))
    ok(python("train_dpo.py", *common(tiny, "dpo", tiny / "one_dpo_off", "--grad-accum", 2, "--ref", "adapters-off")))
    return {"sft": tiny / "one_sft", "dpo": tiny / "one_dpo", "dpo_off": tiny / "one_dpo_off"}


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one_with_the_global_batch(tiny, single, parallel):
    """2 ranks x batch 2 == 1 process x batch 2 x grad-accum 2: losses, eval metrics and adapters, SFT and DPO.
    DPO from the SFT adapter with the cached reference (its pass split over the ranks, gathered; the source is
    the frozen SFT adapter) and, under FSDP, from the base with the live adapters-off reference."""
    out = tiny / parallel
    ok(torchrun("train_sft.py", *common(tiny, "sft", out / "sft", "--parallel", parallel)))
    assert_same_run(out / "sft", single["sft"])
    ok(torchrun("train_dpo.py", *common(tiny, "dpo", out / "dpo", "--parallel", parallel,
                                        "--adapter", single["sft"])))
    assert_same_run(out / "dpo", single["dpo"])
    if parallel == "fsdp":  # adapters switched off inside FSDP's wrapped blocks (DDP's reference runs the bare model)
        ok(torchrun("train_dpo.py", *common(tiny, "dpo", out / "dpo_off", "--parallel", parallel,
                                            "--ref", "adapters-off")))
        assert_same_run(out / "dpo_off", single["dpo_off"])
        # The reference kept the loss away from log 2 (a reference equal to the policy would keep it there).
        assert abs(train_losses(out / "dpo_off")[5] - 0.6931) > 1e-3
    # Rank 0 alone wrote: one log line per step and eval, and the adapter PEFT reads.
    assert [r["step"] for r in metrics(out / "sft")] == [0, 1, 2, 3, 4, 5]
    peft_loads(tiny, out / "sft")


def peft_loads(tiny, adapter_dir):
    import transformers
    from peft import PeftModel

    base = transformers.AutoModelForCausalLM.from_pretrained(tiny / "ckpt")
    model = PeftModel.from_pretrained(base, adapter_dir)
    want = adapter(adapter_dir)
    got = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(got) == len(want)
    key = next(k for k in want if k.endswith("lora_B.weight"))
    torch.testing.assert_close(got[key.replace("lora_B.weight", "lora_B.default.weight")], want[key])


@pytest.mark.slow
def test_sigterm_then_resume_equals_the_uninterrupted_run(tiny):
    """FSDP (sharded parameters and optimizer state, the harder case): SIGTERM to torchrun mid-run, every rank
    saves and stops at the same step; --resume then finishes with exactly the uninterrupted run's losses. LoRA
    dropout is on: each rank draws its own masks, so each rank's RNG state must come back from the checkpoint."""
    args = ["--max-steps", 20, "--save-every", 3, "--parallel", "fsdp", "--eval-every", 0, "--lora-dropout", 0.1]
    straight, cut = tiny / "straight", tiny / "cut"
    ok(torchrun("train_sft.py", *common(tiny, "sft", straight), *args))
    run = torchrun("train_sft.py", *common(tiny, "sft", cut), *args)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((cut / "metrics.jsonl").exists() and train_losses(cut)):
            time.sleep(0.05)
        os.kill(run.proc.pid, signal.SIGTERM)  # torchrun passes it on to every rank
        rc, out = run.wait(120)
    finally:
        run.kill()
    assert rc != 0 and "SIGTERM" in out, out[-3000:]
    step = torch.load(cut / "checkpoint.pt", weights_only=True)["step"]
    assert 1 <= step < 20, f"the signal must stop the run part-way (checkpoint at step {step} of 20)"
    ok(torchrun("train_sft.py", *common(tiny, "sft", cut), *args, "--resume"))
    assert train_losses(cut) == train_losses(straight)  # bit for bit
    a, b = adapter(cut), adapter(straight)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_dying_rank_brings_the_job_down(tiny):
    """kill -9 of one rank: torchrun stops the other and exits non-zero; nothing waits forever."""
    out = tiny / "dying"
    run = torchrun("train_sft.py", *common(tiny, "sft", out, "--parallel", "ddp", "--max-steps", 100000,
                                           "--eval-every", 0))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((out / "metrics.jsonl").exists() and train_losses(out)):
            time.sleep(0.05)
        ranks = [int(p) for p in subprocess.run(["pgrep", "-P", str(run.proc.pid)], capture_output=True,
                                                text=True).stdout.split()]
        assert len(ranks) == 2
        os.kill(ranks[1], signal.SIGKILL)
        t0 = time.time()
        rc, log = run.wait(90)
    finally:
        run.kill()
    assert rc != 0 and time.time() - t0 < 90, log[-3000:]


@pytest.mark.slow
def test_two_nodes_on_loopback(tiny):
    """--nnodes 2, one process each, rendezvous at 127.0.0.1: the same run as 2 processes on one node."""
    port = free_port()
    out = tiny / "nodes"
    nodes = [torchrun("train_sft.py", *common(tiny, "sft", out, "--parallel", "ddp"), nproc=1, node=(2, r, port))
             for r in (0, 1)]
    try:
        for n in nodes:
            ok(n)
    finally:
        for n in nodes:
            n.kill()
    two = tiny / "ddp" / "sft"
    if not two.exists():
        ok(torchrun("train_sft.py", *common(tiny, "sft", two, "--parallel", "ddp")))
    assert train_losses(out) == pytest.approx(train_losses(two), rel=RTOL)


def test_bad_row_fails_every_rank_with_one_message(tiny):
    bad = tiny / "bad.jsonl"
    bad.write_text((tiny / "sft.jsonl").read_text() + '{"prompt": 3}\n')
    rc, out = torchrun("train_sft.py", *common(tiny, "sft", tiny / "bad", "--data", bad, "--parallel", "ddp")).wait()
    assert rc != 0
    errors = [l for l in out.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and "bad.jsonl:41" in errors[0], out[-3000:]


# --- in-process helpers (no launch) -----------------------------------------------------------------------


def test_balanced_chunks_give_every_rank_the_same_number_of_forwards():
    items = list(range(11))
    seen = []
    for rank in range(3):
        d = D.Dist(rank=rank, world=3, parallel="fsdp")
        chunks = D.balanced_chunks(items, 2, d)
        assert len(chunks) == 2  # ceil(ceil(11 / 3) / 2)
        seen += [x for c, real in chunks if real for x in c]
    assert seen == items  # every item exactly once among the real chunks
    d = D.Dist(rank=3, world=4, parallel="fsdp")
    assert D.balanced_chunks([0, 1, 2], 1, d) == [([0], False)]  # nothing left for rank 3: a dropped repeat


def test_rank_share_and_single_process_identities():
    assert D.rank_share(list(range(8)), D.Dist(rank=1, world=2, parallel="ddp")) == [4, 5, 6, 7]
    with pytest.raises(Exception, match="evenly"):
        D.rank_share(list(range(7)), D.Dist(rank=0, world=2, parallel="ddp"))
    one = D.Dist()
    assert not one.on and one.main
    assert D.all_reduce_sum({"a": 1.5}, one) == {"a": 1.5} and D.any_rank(True, one)


def test_fsdp_shards_hold_half_of_the_frozen_weights(tiny, tmp_path):
    """Each of 2 FSDP ranks holds half of every frozen weight (the tied embedding once), and the full tensors
    gathered from the shards are exactly the checkpoint's."""
    script = tmp_path / "shards.py"
    script.write_text(f"""
import json, os, torch
from minift.train import distributed as D
from minift.model import lora
from minift.model.checkpoint import load
d = D.init("fsdp")
torch.manual_seed(0)
model, _ = load({str(tiny / "ckpt")!r}, shell=True)
lora.apply_lora(model, "all-linear", 4, 8)
model = D.wrap(model, {str(tiny / "ckpt")!r})
ref, _ = load({str(tiny / "ckpt")!r})
same = all(torch.equal(D.full(p), ref.get_parameter(n)) for n, p in model.named_parameters() if "lora_" not in n)
out = dict(bytes=D.local_bytes(model), tied=model.lm_head.weight is model.embed.weight, same=same,
           single=D.local_bytes(ref, frozen_only=False))
open(os.path.join({str(tmp_path)!r}, f"rank{{d.rank}}.json"), "w").write(json.dumps(out))
del model
D.close()
""")
    ok(torchrun(script))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["tied"] and r["same"]
        # half, up to the rows of odd-sized tensors (torch.chunk gives rank 0 the extra row)
        assert r["bytes"] == pytest.approx(r["single"] / 2, rel=0.02)


def test_shell_load_holds_no_weights(tiny):
    from minift.model.checkpoint import load

    model, _ = load(tiny / "ckpt", shell=True)
    assert all(D.is_placeholder(p) for n, p in model.named_parameters() if p.dim() == 2)
    assert sum(p.untyped_storage().nbytes() for p in model.parameters()) <= 4 * len(list(model.parameters()))


def test_parallel_flag_is_checked():
    from minift.errors import MinifTError
    from minift.train.train_config import TrainConfig, parse_config

    assert parse_config(TrainConfig, []).parallel == "ddp"
    with pytest.raises(MinifTError, match="--merge does not work with --parallel fsdp"):
        parse_config(TrainConfig, ["--merge", "--parallel", "fsdp"])
    with pytest.raises(SystemExit):  # argparse: invalid choice
        parse_config(TrainConfig, ["--parallel", "tp"])
