"""A run's weight dtype (``--dtype``): what the weights are stored in and what the model computes in.

``float32`` and ``bfloat16`` store and compute in that dtype. ``int8`` stores the blocks' linear weights (the
weights the projected methods project) as int8 codes with one scale per 256 inputs (``gradspace.int8_weights``)
and everything else (embeddings, norms, head) in the compute dtype, which is bfloat16 where the hardware is fast in
it (CUDA; a CPU with AMX or AVX512-BF16) and float32 where bfloat16 is emulated (an AVX2-only CPU).
"""

from __future__ import annotations

from typing import Any

import torch

WEIGHT_DTYPES = ("float32", "bfloat16", "int8")


def fast_bfloat16(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively (measured on an Intel Xeon with AMX: 2,022
    GFLOP/s in bfloat16 against 338 in float32 on 2 threads; an AMD EPYC with AVX2 only emulates it, far slower)."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def compute_dtype(cfg: dict[str, Any], device: str | torch.device | None = None) -> torch.dtype:
    """The dtype a run's model computes in (and stores its non-int8 parameters in)."""
    name = cfg["dtype"]
    if name == "int8":
        return torch.bfloat16 if fast_bfloat16(device or cfg.get("device", "cpu")) else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def int8_group_size(cfg: dict[str, Any]) -> int | None:
    """The int8 layout's group size, or None for a float run."""
    from ..int8_weights import DEFAULT_GROUP_SIZE

    return DEFAULT_GROUP_SIZE if cfg["dtype"] == "int8" else None


def store_weights(model, cfg: dict[str, Any], target_modules=None):
    """``model`` in the run's compute dtype, its target weights in int8 for ``--dtype int8`` (a model built in
    int8 already is left as it is); returns it."""
    from ..int8_weights import is_int8, quantize_model_

    dtype = compute_dtype(cfg, next(model.parameters()).device)
    if not any(is_int8(p) for p in model.parameters()):
        model = model.to(dtype=dtype)
    group = int8_group_size(cfg)
    if group is not None and not any(is_int8(p) for p in model.parameters()):
        quantize_model_(model, target_modules, group, dtype)
    return model
