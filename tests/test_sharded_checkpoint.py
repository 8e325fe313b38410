"""FSDP2 checkpoint folders (``gradspace.train.sharded``) in one process: safe metadata, clean-up, the global batch.

The two-process behaviour (FSDP2 ranks writing their shards; resuming with FSDP2, DDP or one process) is tested
in test_distributed.py (every preset) and test_cli_distributed.py (``gradspace pretrain`` under torchrun)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from gradspace import create_optimizer
from gradspace.components import flat_items
from gradspace.train import sharded
from gradspace.train.checkpoint import CheckpointError, remove_orphans, save_checkpoint
from gradspace.train.parallel import RankStream, resumed_batch_size


def trained(steps: int = 3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 12))
    opt = create_optimizer("galore", model, lr=1e-2, rank=4, update_proj_gap=2, target_modules="all-linear")
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 12)).square().mean().backward()
        opt.step()
    return model, opt


def test_a_checkpoint_folder_round_trips_in_one_process(tmp_path):
    model, opt = trained()
    rest = sharded.save(tmp_path / "ckpt-0000003.dcp", model, opt)
    assert not any(isinstance(v, torch.Tensor) for st in rest["state"].values() for _, v in flat_items(st))
    fresh, fresh_opt = trained(0)
    sharded.load(tmp_path / "ckpt-0000003.dcp", rest, fresh, fresh_opt, fsdp=False)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    for (i, st), (j, got) in zip(opt.state_dict()["state"].items(), fresh_opt.state_dict()["state"].items()):
        st, got = dict(flat_items(st)), dict(flat_items(got))
        assert i == j and set(st) == set(got)
        for k, v in st.items():
            assert torch.equal(got[k], v) if isinstance(v, torch.Tensor) else got[k] == v, (i, k)
    whole = sharded.full_state(tmp_path / "ckpt-0000003.pt")
    assert all(torch.equal(whole[k], v) for k, v in model.state_dict().items())


class Payload:
    def __reduce__(self):
        return (exec, ("open('ran', 'w').write('code ran')",))


def _through_a_module_attribute(module: str, name: str, arg: str) -> bytes:
    """A protocol-4 pickle calling ``module.name(arg)``, where ``name`` may be dotted (``os.mkdir``)."""

    def text(s: str) -> bytes:
        return b"\x8c" + bytes([len(s)]) + s.encode()

    return b"\x80\x04" + text(module) + text(name) + b"\x93" + text(arg) + b"\x85R."


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps(Payload()),
        _through_a_module_attribute("torch.distributed.checkpoint.filesystem", "os.mkdir", "ran"),
        _through_a_module_attribute("torch", "load", "ran"),
    ],
    ids=["exec", "a dotted name in an allowed module", "another torch function"],
)
def test_metadata_that_would_run_code_is_refused(payload, tmp_path, monkeypatch):
    model, opt = trained()
    folder = tmp_path / "ckpt-0000003.dcp"
    rest = sharded.save(folder, model, opt)
    (folder / ".metadata").write_bytes(payload)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"corrupt.*is not part of a checkpoint.s metadata"):
        sharded.load(folder, rest, *trained(0), fsdp=False)
    assert not (tmp_path / "ran").exists()


def test_a_missing_folder_and_another_model_are_clear_errors(tmp_path):
    model, opt = trained()
    with pytest.raises(CheckpointError, match="missing or incomplete"):
        sharded.load(tmp_path / "nothing.dcp", {"state": {}, "param_groups": []}, model, opt, fsdp=False)
    rest = sharded.save(tmp_path / "a.dcp", model, opt)
    other = torch.nn.Sequential(
        torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 12), torch.nn.Linear(12, 2)
    )
    other_opt = create_optimizer("galore", other, lr=1e-2, rank=4, target_modules="all-linear")
    with pytest.raises(CheckpointError, match=r"has no .3\.weight.: it was saved for a different model"):
        sharded.load(tmp_path / "a.dcp", rest, other, other_opt, fsdp=False)


def test_an_unfinished_folder_is_removed_and_old_ones_go_with_their_checkpoint(tmp_path):
    model, opt = trained()
    folder = Path(tmp_path)
    for step in (1, 2, 3):
        sharded.save(folder / f"ckpt-{step:07d}.dcp", model, opt)
        if step < 3:  # step 3's main file is never written: a save killed before its end
            save_checkpoint(folder, step, model=model, optimizer=None, model_state={}, extra={"dcp": "x"}, keep=0)
    sharded.save(folder / ".ckpt-0000003.dcp.tmp", model, opt)  # a save killed while the ranks were writing
    assert remove_orphans(folder) == [folder / "ckpt-0000003.dcp", folder / ".ckpt-0000003.dcp.tmp"]
    save_checkpoint(folder, 4, model=model, optimizer=None, keep=2)
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt-0000002.dcp", "ckpt-0000002.pt", "ckpt-0000004.pt"]


def test_rank_streams_take_their_rows_of_the_global_batch():
    class Stream:
        batch_size = 6

        def __init__(self):
            self.step = 0

        def __next__(self):
            self.step += 1
            ids = torch.arange(6) + 10 * self.step
            return {"input_ids": ids[:, None], "labels": ids}, (ids, ids)

    ranks = [RankStream(Stream(), r, 3) for r in range(3)]
    parts = [next(s) for s in ranks]
    assert [p[0]["labels"].tolist() for p in parts] == [[10, 11], [12, 13], [14, 15]]
    assert torch.equal(parts[2][0]["input_ids"][:, 0], parts[2][1][0])


def test_the_global_batch_is_kept_on_another_number_of_processes():
    assert resumed_batch_size({"batch_size": 2}, 2, 1, Path("c")) == 4
    assert resumed_batch_size({"batch_size": 4}, 1, 4, Path("c")) == 1
    with pytest.raises(CheckpointError, match=r"global batch 6\), which 4 processes cannot split.*\(1, 2, 3, 6\)"):
        resumed_batch_size({"batch_size": 3}, 2, 4, Path("c"))
