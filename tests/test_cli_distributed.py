"""`gradspace pretrain` under torchrun: two gloo processes with DDP and FSDP2 against one process, and resume.

Each rank reads batches of 2 from the seeded stream (rank r the r-th of every two), so the two ranks together see
what one process with batch 4 sees; every sequence has the same number of tokens, so DDP's average of the two
ranks' mean losses is the one process's mean loss, and the final weights agree to float32 tolerance.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from gradspace import cli
from gradspace.train.checkpoint import list_checkpoints, load_checkpoint
from gradspace.train.sharded import full_state

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
SRC = str(Path(cli.__file__).resolve().parent.parent)
ARGS = [
    "--preset",
    "tiny",
    "--steps",
    "6",
    "--seq-len",
    "32",
    "--log-every",
    "1",
    "--eval-every",
    "3",
    "--eval-batches",
    "1",
    "--threads",
    "1",
    "--method",
    "galore",
    "--rank",
    "8",
    "--update-gap",
    "2",
]


def torchrun(*argv, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--standalone",
        "-m",
        "gradspace",
        "pretrain",
        *map(str, argv),
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)


def final_model(run: Path, step: int = 6) -> dict[str, torch.Tensor]:
    """The model of a run's last checkpoint (an FSDP2 one read whole from its DCP folder)."""
    path = list_checkpoints(run / "checkpoints")[-1]
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == step
    return full_state(path) if ckpt.get("dcp") else ckpt["model"]


def assert_close(a: dict, b: dict, exact: bool = False) -> None:
    assert sorted(a) == sorted(b)
    for k, value in a.items():
        if exact:
            assert torch.equal(value, b[k]), k
        else:
            torch.testing.assert_close(value, b[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One single-process run with batch 4 (in this process) and the torchrun runs the tests read."""
    root = tmp_path_factory.mktemp("torchrun")
    assert cli.main(["pretrain", *ARGS, "--batch-size", "4", "--out", str(root / "single")]) == 0
    out = {"root": root}
    out["ddp"] = torchrun(*ARGS, "--batch-size", 2, "--save-every", 3, "--out", root / "ddp")
    ddp_cut = root / "ddp" / "checkpoints" / "ckpt-0000003.pt"
    out["ddp_resumed"] = torchrun("--resume", ddp_cut, "--threads", 1, "--out", root / "ddp_resumed")
    out["ddp_to_fsdp"] = torchrun("--resume", ddp_cut, "--fsdp", "--threads", 1, "--out", root / "ddp_fsdp")
    noclip = [*ARGS, "--grad-clip", "0"]
    assert cli.main(["pretrain", *noclip, "--batch-size", "4", "--out", str(root / "single_noclip")]) == 0
    out["layerwise"] = torchrun(*noclip, "--batch-size", 2, "--layerwise", "--out", root / "layerwise")
    out["layerwise_fsdp"] = torchrun(*noclip, "--batch-size", 2, "--layerwise", "--fsdp", "--out", root / "lf")
    out["fsdp"] = torchrun(*ARGS, "--batch-size", 2, "--fsdp", "--out", root / "fsdp", "--stop-after", 3)
    out["fsdp_resumed"] = torchrun("--resume", root / "fsdp", "--fsdp", "--threads", 1)
    cut = root / "fsdp" / "checkpoints" / "ckpt-0000003.pt"  # the 2-process FSDP2 checkpoint, resumed elsewhere:
    out["fsdp_to_ddp"] = torchrun("--resume", cut, "--threads", 1, "--out", root / "fsdp_ddp")  # by 2 DDP ranks
    out["fsdp_to_one"] = cli.main(["pretrain", "--resume", str(cut), "--threads", "1", "--out", str(root / "fsdp_one")])
    return out


def test_ddp_run_matches_one_process_with_the_global_batch(runs):
    root = runs["root"]
    assert runs["ddp"].returncode == 0, runs["ddp"].stderr[-3000:]
    assert "2 processes, ddp" in runs["ddp"].stderr and runs["ddp"].stdout.count("done: 6 steps") == 1  # rank 0 only
    assert (root / "ddp" / "summary.json").is_file() and (root / "ddp" / "metrics.jsonl").is_file()
    assert sorted(p.name for p in (root / "ddp" / "checkpoints").iterdir()) == ["ckpt-0000003.pt", "ckpt-0000006.pt"]
    assert_close(final_model(root / "ddp"), final_model(root / "single"))


def test_torchrun_layerwise_under_ddp_and_fsdp2_matches_one_process(runs):
    root = runs["root"]
    assert runs["layerwise"].returncode == 0, runs["layerwise"].stderr[-3000:]
    assert "2 processes, ddp" in runs["layerwise"].stderr
    assert_close(final_model(root / "layerwise"), final_model(root / "single_noclip"))
    fsdp = runs["layerwise_fsdp"]  # layer-wise under FSDP2: each layer steps after its reduce-scatter
    assert fsdp.returncode == 0 and "2 processes, fsdp2" in fsdp.stderr, fsdp.stderr[-3000:]
    assert_close(final_model(root / "lf"), final_model(root / "single_noclip"))


def test_ddp_resume_is_bit_identical(runs):
    root = runs["root"]
    assert runs["ddp_resumed"].returncode == 0, runs["ddp_resumed"].stderr[-3000:]
    assert "resuming at step 3" in runs["ddp_resumed"].stderr
    assert_close(final_model(root / "ddp_resumed"), final_model(root / "ddp"), exact=True)


def test_fsdp2_interrupt_resume_matches_one_process(runs):
    root = runs["root"]
    cut = runs["fsdp"]
    assert cut.returncode != 0 and cut.stderr.count("interrupted at step 3 of 6") == 1, cut.stderr[-3000:]
    assert "2 processes, fsdp2" in cut.stderr and "exitcode  : 130" in cut.stderr  # the ranks' code
    names = sorted(p.name for p in (root / "fsdp" / "checkpoints").iterdir())
    assert names == ["ckpt-0000003.dcp", "ckpt-0000003.pt", "ckpt-0000006.dcp", "ckpt-0000006.pt"]
    assert sorted(p.name for p in (root / "fsdp" / "checkpoints" / "ckpt-0000006.dcp").iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]  # each rank wrote its own shards
    assert runs["fsdp_resumed"].returncode == 0, runs["fsdp_resumed"].stderr[-3000:]
    assert "resuming at step 3" in runs["fsdp_resumed"].stderr
    ckpt = load_checkpoint(root / "fsdp" / "checkpoints" / "ckpt-0000006.pt")
    assert (ckpt["world_size"], ckpt["strategy"]) == (2, "fsdp2")
    assert_close(final_model(root / "fsdp"), final_model(root / "single"))
    from transformers import AutoModelForCausalLM  # the run's model folder holds the gathered, unsharded weights

    exported = AutoModelForCausalLM.from_pretrained(root / "fsdp" / "model")
    trained = final_model(root / "fsdp")
    embed = "model.embed_tokens.weight"
    used = trained[embed].shape[0]  # the compact vocabulary's rows, scattered back into GPT-2's
    assert exported.config.vocab_size == 50257 and used < 50257
    for key, value in exported.state_dict().items():
        if key in trained and key != embed and "lm_head" not in key:
            assert torch.equal(value, trained[key]), key


def test_fsdp2_checkpoint_resumes_with_ddp_and_in_one_process(runs):
    """Two FSDP2 ranks' checkpoint at step 3, finished by two DDP ranks and by one process (with the global batch,
    4, that it derives from the checkpoint), and a DDP checkpoint finished by two FSDP2 ranks: all match the
    uninterrupted one-process run."""
    root = runs["root"]
    assert runs["ddp_to_fsdp"].returncode == 0, runs["ddp_to_fsdp"].stderr[-3000:]
    assert "resuming at step 3; 2 processes, fsdp2" in runs["ddp_to_fsdp"].stderr
    assert_close(final_model(root / "ddp_fsdp"), final_model(root / "single"))
    assert runs["fsdp_to_ddp"].returncode == 0, runs["fsdp_to_ddp"].stderr[-3000:]
    assert "resuming at step 3; 2 processes, ddp" in runs["fsdp_to_ddp"].stderr
    assert runs["fsdp_to_one"] == 0
    assert load_checkpoint(list_checkpoints(root / "fsdp_one" / "checkpoints")[-1])["config"]["batch_size"] == 4
    for run in ("fsdp_ddp", "fsdp_one"):
        assert_close(final_model(root / run), final_model(root / "single"))


@pytest.mark.parametrize(
    ("world", "flags", "says"),
    [
        ("3", ["--fsdp"], "which 3 processes cannot split evenly: resume it with a number of processes that "
         "divides 4 (1, 2, 4)"),
        ("1", ["--batch-size", "2"], "on 1 processes that is batch size 4, but this run asks for 2 (drop "
         "--batch-size to have it derived)"),
    ],
    ids=["3 processes", "1 process with the per-rank batch"],
)  # fmt: skip
def test_a_batch_that_changes_the_global_batch_is_a_clear_error(runs, world, flags, says, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", world)  # as torchrun --nproc_per_node N would set it; checked before any
    try:  # rank starts a process group
        code = cli.main(["pretrain", "--resume", str(runs["root"] / "fsdp"), *flags, "--threads", "1"])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("gradspace: error:")]
    assert "2 process(es) with batch size 2 each (global batch 4)" in line and says in line, line


@pytest.mark.parametrize("flag", ["--fsdp", "--shard-updates"])
def test_parallel_flags_need_torchrun(flag, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    try:
        code = cli.main(["pretrain", *ARGS, flag, "--out", str(tmp_path / "x")])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and "needs several processes" in err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("how", ["SIGTERM to torchrun", "Ctrl-C to the process group", "SIGTERM to torchrun, FSDP2"])
def test_a_signal_to_torchrun_saves_one_checkpoint_and_the_run_resumes(how, tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "gradspace"]
    fsdp = ["--fsdp"] if how.endswith("FSDP2") else []
    argv = [*ARGS, "--batch-size", "2", "--steps", "40", "--eval-every", "0", *fsdp, "--out", str(out)]
    proc = subprocess.Popen(
        [*cmd, "pretrain", *argv], env={**env, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    if how.startswith("SIGTERM"):
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: every process of the group gets it
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0 and err.count("interrupted at step") == 1, err[-3000:]
    (ckpt,) = list_checkpoints(out / "checkpoints")  # exactly one, written by rank 0 for both ranks
    step = load_checkpoint(ckpt)["step"]
    assert 2 <= step < 40
    if fsdp:  # and its shards, complete: the main file is written last
        assert (ckpt.with_suffix(".dcp") / ".metadata").is_file()
    resumed = torchrun("--resume", out, "--threads", 1, *fsdp)
    assert resumed.returncode == 0 and f"resuming at step {step}" in resumed.stderr, resumed.stderr[-3000:]
    assert load_checkpoint(list_checkpoints(out / "checkpoints")[-1])["step"] == 40
