"""A full-parameter run exported as a LoRA adapter (AdaRankGrad's recipe): each adapted weight's change from the
starting model, ``W - W0``, truncated to its top singular directions, written as a peft adapter folder that
``PeftModel.from_pretrained(base, RUN/adapter)`` loads onto the starting model.

The rank is fixed (``--lora-rank 16``) or chosen per weight (``--lora-rank auto``): the smallest rank that keeps
``--lora-energy`` (default 0.9) of the change's energy ``||W - W0||_F^2``. ``B = U_r S_r`` and ``A = V_r^T`` with
``lora_alpha = r`` (peft's scaling ``alpha / r = 1``), so ``W0 + B A`` is the best rank-r approximation of ``W``.
Every other parameter that changed (embeddings, norms, a classifier head) goes in whole, as peft's
``modules_to_save``, and the adapted modules' biases as peft's ``bias="lora_only"``.
``RUN/adapter/gradspace.json`` records each weight's rank and the energy it keeps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..params import is_conv1d


def low_rank_change(delta: torch.Tensor, rank: int | None, energy: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B, A, kept)``: the rank-``rank`` truncated SVD of ``delta`` (out x in), or with ``rank=None`` the smallest
    rank keeping ``energy`` of ``||delta||_F^2``; ``kept`` is the share of the energy ``B A`` holds."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    total = float((s**2).sum())
    if rank is None:
        if total == 0.0:
            rank = 1
        else:
            cumulative = torch.cumsum(s**2, 0) / total
            rank = int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=cumulative.dtype)).item()) + 1
    rank = max(1, min(rank, s.numel()))
    kept = float((s[:rank] ** 2).sum()) / total if total else 1.0
    return (u[:, :rank] * s[:rank]).float(), vh[:rank].float(), kept


def _weight(module: nn.Module) -> torch.Tensor:
    """A linear module's weight as (out, in) (transformers' Conv1D stores (in, out))."""
    return module.weight.detach().t() if is_conv1d(module) else module.weight.detach()


def _bias_changed(trained: nn.Module, start: nn.Module) -> bool:
    return trained.bias is not None and not torch.equal(trained.bias.detach(), start.bias.detach())


def write_adapter(folder: Path, start: nn.Module, trained: nn.Module, names: list[str], rank, energy: float) -> dict:
    """Write the adapter of ``trained``'s change from ``start`` into ``folder`` (``start`` becomes the peft
    model: pass a copy you may lose); returns the per-weight report that is also saved as gradspace.json."""
    from peft import LoraConfig, get_peft_model

    modules = dict(trained.named_modules())
    factors, report = {}, {}
    for name in names:
        delta = _weight(modules[name]).float() - _weight(start.get_submodule(name)).float()
        b, a, kept = low_rank_change(delta, None if rank == "auto" else int(rank), energy)
        factors[name] = (b, a)
        report[name] = {"rank": a.shape[0], "energy_kept": kept, "shape": list(delta.shape)}
    adapted = {f"{n}.{k}" for n in names for k in ("weight", "bias")}
    start_state = start.state_dict()
    changed = sorted(
        {
            key.rsplit(".", 1)[0]
            for key, value in trained.state_dict().items()
            if key not in adapted and key in start_state and not torch.equal(value, start_state[key])
        }
    )
    biases = [n for n in names if _bias_changed(modules[n], start.get_submodule(n))]
    ranks = {n: r["rank"] for n, r in report.items()}
    top = max(ranks.values())
    config = LoraConfig(
        r=top,
        lora_alpha=top,
        target_modules=names,
        rank_pattern={f"^{n}$": r for n, r in ranks.items()},
        alpha_pattern={f"^{n}$": r for n, r in ranks.items()},
        modules_to_save=changed or None,
        lora_dropout=0.0,
        bias="lora_only" if biases else "none",  # the adapted modules' own biases, in the adapter
        init_lora_weights=False,
        fan_in_fan_out=any(is_conv1d(modules[n]) for n in names),
    )
    peft_model = get_peft_model(start, config)
    with torch.no_grad():
        for name, (b, a) in factors.items():
            layer = peft_model.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
            if name in biases:
                layer.get_base_layer().bias.copy_(modules[name].bias)
        trained_state = trained.state_dict()
        for module in changed:
            saved = peft_model.base_model.model.get_submodule(module).modules_to_save["default"]
            for key, value in saved.state_dict().items():
                value.copy_(trained_state[f"{module}.{key}"])
    peft_model.save_pretrained(folder)
    size = sum(f.stat().st_size for f in Path(folder).iterdir() if f.suffix == ".safetensors")
    summary = {"weights": report, "full_modules": changed, "adapter_bytes": size, "energy_target": energy}
    (Path(folder) / "gradspace.json").write_text(json.dumps(summary, indent=1))
    return summary


def describe(summary: dict[str, Any], model_bytes: int) -> str:
    ranks = sorted(w["rank"] for w in summary["weights"].values())
    kept = [w["energy_kept"] for w in summary["weights"].values()]
    return (
        f"LoRA adapter of {len(ranks)} weights, ranks {ranks[0]}-{ranks[-1]} (median {ranks[len(ranks) // 2]}), "
        f"keeping {min(kept):.1%}-{max(kept):.1%} of each weight's change; {summary['adapter_bytes'] / 2**20:.1f} "
        f"MiB against the model's {model_bytes / 2**20:.1f} MiB"
        + (f"; in full: {', '.join(summary['full_modules'])}" if summary["full_modules"] else "")
    )
