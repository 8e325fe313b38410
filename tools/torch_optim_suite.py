"""Run PyTorch's generic optimizer tests (``test/test_optim.py``, class ``TestOptimRenewed``) on gradspace.

Each preset family becomes a ``SubspaceOptimizer`` subclass (``Gradspace_galore``, ``Gradspace_subtrackPP``
...) registered as an ``OptimizerInfo`` in torch's ``optim_db`` before test_optim is imported, so every
``@optims(optim_db)`` test is generated for it; pytest then runs only those entries (``-k Gradspace``).
The subclass projects every 2-D weight of each param group at rank 2 (or the group's/constructor's ``rank``)
and puts the group's other parameters in a full-rank twin group, as galore-torch users do.

Get test_optim.py for your torch version and keep it outside this repository, e.g.::

    mkdir -p /tmp/torch_optim && curl -Lo /tmp/torch_optim/test_optim.py \\
        https://raw.githubusercontent.com/pytorch/pytorch/v2.13.0/test/test_optim.py

Its sibling imports (``optim/test_lrscheduler.py`` ...) are stubbed if absent: only TestOptimRenewed runs.
Needs ``pip install expecttest`` (torch.testing._internal imports it). Run::

    OMP_NUM_THREADS=1 .venv/bin/python tools/torch_optim_suite.py /tmp/torch_optim/test_optim.py [pytest args]

Extra pytest args narrow further, e.g. ``-x -q`` or ``-k "Gradspace_galore and state_dict"`` (a later
``-k`` replaces this script's, so keep ``Gradspace`` in it).
"""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch
from torch.testing._internal.common_optimizers import (
    ErrorOptimizerInput,
    OptimizerInfo,
    OptimizerInput,
    _get_device_type,
    get_error_inputs_for_all_optims,
    optim_db,
)

from gradspace import METHODS, SubspaceOptimizer

FAMILIES = ("adamw", "galore", "subtrack", "subtrack++", "osd", "adarank", "grasswalk", "grassjump", "fira")
DEFAULT_RANK = 2  # generic tests use 10x5, 2x3, 3x2 weights: rank 1-2 keeps them projected (rank < min(m, n))


def _split(params, rank):
    """galore-torch style groups: each group's 2-D weights get ``rank`` (the group's own, else the default),
    its other parameters go to a full-rank twin group. Named ``(name, p)`` entries pass through untouched."""
    if params is None or isinstance(params, torch.Tensor):
        return params  # not an iterable: SubspaceOptimizer / torch.optim raise their own error
    items = list(params)
    if not items:
        return items
    out = []
    for group in items if isinstance(items[0], dict) else [{"params": items}]:
        ps = group["params"]
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        opts = {k: v for k, v in group.items() if k not in ("params", "rank")}
        flat = [x for x in ps if (x[1] if isinstance(x, tuple) else x).dim() == 2]
        rest = [x for x in ps if (x[1] if isinstance(x, tuple) else x).dim() != 2]
        if flat:
            out.append({**opts, "params": flat, "rank": group.get("rank", rank)})
        if rest or not flat:
            out.append({**opts, "params": rest})
    return out


def preset_class(name: str) -> type:
    preset = METHODS[name]

    def __init__(self, params, lr=1e-3, rank=DEFAULT_RANK, **kwargs):
        groups = params if preset is None else _split(params, rank)
        SubspaceOptimizer.__init__(self, groups, lr=lr, **{**(preset or {}), **kwargs})

    cls_name = "Gradspace_" + name.replace("++", "PP").replace("-", "_")
    cls = type(cls_name, (SubspaceOptimizer,), {"__init__": __init__, "__module__": __name__})
    globals()[cls_name] = cls  # picklable by name
    return cls


def inputs_full_rank(device, dtype=None):
    return [
        OptimizerInput(params=None, kwargs={}, desc="default"),
        OptimizerInput(params=None, kwargs={"lr": 0.01}, desc="non-default lr"),
        OptimizerInput(params=None, kwargs={"weight_decay": 0.1}, desc="nonzero weight_decay"),
        OptimizerInput(params=None, kwargs={"betas": (0.8, 0.99), "eps": 1e-8}, desc="betas, eps"),
    ]


def inputs_projected(device, dtype=None):
    return [
        OptimizerInput(params=None, kwargs={"rank": 1}, desc="rank 1"),
        OptimizerInput(
            params=None,
            kwargs={"rank": 2, "lr": 0.01, "update_proj_gap": 3},
            desc="rank 2, subspace update every 3 steps",
        ),
        OptimizerInput(
            params=None,
            kwargs={"rank": 1, "weight_decay": 0.1, "update_proj_gap": 2},
            desc="nonzero weight_decay, update every 2 steps",
        ),
        OptimizerInput(
            params=None, kwargs={"rank": 2, "scale": 1.0, "proj_type": "left"}, desc="scale 1, left projection"
        ),
    ]


def error_inputs(device, dtype):
    """torch's generic error cases (invalid params, duplicates, Tensor lr size, named/unnamed mix) plus
    gradspace's own hyperparameter checks, matched on the offending key only (messages are gradspace's)."""
    errors = get_error_inputs_for_all_optims(device, dtype)
    if _get_device_type(device) != "cpu":
        return errors
    for kwargs, regex in [
        ({"lr": -1.0}, "lr"),
        ({"lr": 1e-2, "weight_decay": -1}, "weight_decay"),
        ({"lr": 1e-2, "betas": (1.0, 0.0)}, "betas"),
        ({"lr": 1e-2, "eps": -1.0}, "eps"),
    ]:
        errors.append(
            ErrorOptimizerInput(
                OptimizerInput(params=None, kwargs=kwargs, desc=regex), error_type=ValueError, error_regex=regex
            )
        )
    return errors


def optim_info(name: str) -> OptimizerInfo:
    return OptimizerInfo(
        preset_class(name),
        optim_inputs_func=inputs_full_rank if METHODS[name] is None else inputs_projected,
        optim_error_inputs_func=error_inputs,
        supported_impls=(),  # no foreach / fused / differentiable flags (unknown options raise ValueError)
        not_og_supported_flags=(),  # no flag was added after release: nothing to strip for BC loading
        supports_sparse=False,  # dense gradients only (sparse raises RuntimeError in _check_grads)
        has_capturable_arg=False,  # no CUDA-graph capturable mode
        supports_complex=False,  # real weights only: bases come from real SVD/QR of the gradient
        supports_fused_on=(),
        skips=(),  # every test generated under the flags above applies; failures are genuine
    )


def stub_sibling_modules(test_dir: str) -> None:
    """test_optim.py imports TestLRScheduler, TestDifferentiableOptimizer, TestSWAUtils from test/optim/."""
    if os.path.isdir(os.path.join(test_dir, "optim")):
        return
    package = types.ModuleType("optim")
    package.__path__ = []
    sys.modules["optim"] = package
    for mod, cls in [
        ("test_lrscheduler", "TestLRScheduler"),
        ("test_optim", "TestDifferentiableOptimizer"),
        ("test_swa_utils", "TestSWAUtils"),
    ]:
        module = types.ModuleType(f"optim.{mod}")
        setattr(module, cls, type(cls, (), {}))  # not a TestCase: collects nothing
        sys.modules[f"optim.{mod}"] = module


class _Register:
    """pytest plugin: append the entries to optim_db right before test_optim is imported by collection."""

    def pytest_configure(self, config):
        optim_db.extend(optim_info(n) for n in FAMILIES if n in METHODS)


def main(argv: list[str]) -> int:
    if not argv or not argv[0].endswith(".py"):
        print(__doc__)
        return 2
    path = os.path.abspath(argv[0])
    stub_sibling_modules(os.path.dirname(path))
    sys.path.insert(0, os.path.dirname(path))
    args = [path, "-k", "TestOptimRenewed and Gradspace", "-p", "no:cacheprovider", "-rfEs", *argv[1:]]
    return pytest.main(args, plugins=[_Register()])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
