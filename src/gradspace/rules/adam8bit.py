"""AdamW with 8-bit block-wise quantised moments (Dettmers et al. 2022), in pure torch so it runs on CPU too.

Each moment is flattened and cut into blocks of 256 elements; a block stores one uint8 index per element into a
256-entry code table and one float32 absmax, i.e. 2 bytes per element for m and v together plus 8 bytes per block.
The tables are bitsandbytes' dynamic-tree maps (signed for m, unsigned for v), with round-to-nearest, so the state
is laid out as bitsandbytes' blockwise 8-bit Adam keeps it. Each step dequantises, runs exactly the float32 update
of ``rules/adamw.py`` (same eps placement and bias-correction factor), takes the direction from the unrounded
moments, and requantises. The codes are the state whatever the parameter dtype (``state_dtype`` does not apply).
Unlike bitsandbytes, small tensors are quantised too (no ``min_8bit_size``), so a projected r x l state always is.

``kernel``: ``"auto"`` (default) steps CUDA tensors with bitsandbytes' fused blockwise kernel when bitsandbytes is
installed (one kernel per tensor instead of about fifteen) and everything else with the torch code here;
``"bitsandbytes"`` always uses bitsandbytes (its CPU kernel too: the parity tests run it there); ``"torch"`` never
does. The state is the same either way, so a run may change kernels between checkpoints. The kernel's update is
this file's to float32 rounding given the same codes (its eps is passed as ``eps / sqrt(1 - beta2^t)``, which
turns torch.optim's eps placement into galore-torch's); its requantisation is bitsandbytes' own search, which
misses the nearest code for a block's small values (within the table's coarsest step: ``tests/test_rules.py``).
"""

from __future__ import annotations

import importlib.util
import math
from functools import cache

import torch

from .base import InnerRule, check_betas, check_nonneg

BLOCK = 256
#: a full-rank tensor larger than this many elements (a multiple of BLOCK) is stepped chunk by chunk, so that its
#: float32 temporaries stay at ~16 MB each instead of several times its size (LLaMA-1B's embedding: ~2 GB)
CHUNK = 1 << 22


def dynamic_map(signed: bool) -> torch.Tensor:
    """bitsandbytes' ``create_dynamic_map(signed, 7, 8)``: a sign, a unary-coded decimal exponent 10^-6..10^0 and
    as many linear fraction bits as are left, so small magnitudes keep their relative precision."""
    data = [0.0, 1.0]
    for i in range(7):
        n = 2**i + 1 if signed else 2 ** (i + 1) + 1
        bounds = torch.linspace(0.1, 1, n, dtype=torch.float32)
        means = ((bounds[:-1] + bounds[1:]) / 2.0 * 10 ** (i - 6)).tolist()
        data += means + ([-x for x in means] if signed else [])
    return torch.tensor(sorted(data), dtype=torch.float32)


@cache
def _tables(signed: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(code values, midpoints between neighbours) on ``device``; constants, cached, never part of the state."""
    code = dynamic_map(signed).to(device)
    return code, (code[1:] + code[:-1]) / 2


def quantize(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 indices shaped like ``x`` and one float32 absmax per block of 256 (of the flattened tensor)."""
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, -n % BLOCK)).view(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1)
    _, mids = _tables(signed, x.device)
    normed = blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    idx = torch.bucketize(normed, mids).view(-1)[:n]
    return idx.to(torch.uint8).view(x.shape), absmax


def dequantize(idx: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """The float32 tensor that ``quantize`` encoded."""
    code, _ = _tables(signed, idx.device)
    n = idx.numel()
    vals = torch.nn.functional.pad(code[idx.reshape(-1).long()], (0, -n % BLOCK)).view(-1, BLOCK)
    return (vals * absmax[:, None]).view(-1)[:n].view(idx.shape)


KERNELS = ("auto", "torch", "bitsandbytes")


@cache
def _bitsandbytes_op():
    """bitsandbytes' fused blockwise 8-bit optimizer op, or None when it is not installed (``kernel="bitsandbytes"``
    without it is refused by ``validate``)."""
    try:
        import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)
    except ImportError:
        return None
    return torch.ops.bitsandbytes.optimizer_update_8bit_blockwise


def fused_kernel(group: dict, like: torch.Tensor):
    """The bitsandbytes op to step ``like``'s state with under the group's ``kernel`` option, else None."""
    kernel = group.get("kernel", "auto")
    if kernel == "torch" or not group["correct_bias"]:  # bitsandbytes always corrects the bias
        return None
    if kernel == "auto" and like.device.type != "cuda":
        return None
    return _bitsandbytes_op()


class AdamW8bit(InnerRule):
    name = "adamw8bit"
    defaults = {"betas": (0.9, 0.999), "eps": 1e-6, "correct_bias": True, "kernel": "auto"}
    has_second_moment = True
    #: codes and block scales: not elementwise (a block's scale spans 256 entries), so nothing shards
    state_keys = dict.fromkeys(("q8_m", "q8_m_absmax", "q8_v", "q8_v_absmax", "q8_step"))

    def state_bytes(self, shape, elem, group) -> int:
        """8-bit codes of m and v plus one float32 absmax per block of 256, whatever the parameter dtype."""
        numel = math.prod(shape)
        return 2 * (numel + 4 * math.ceil(numel / 256))

    def validate(self, group: dict) -> None:
        check_betas(group)
        check_nonneg(group, "eps")
        if group.get("kernel", "auto") not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {group['kernel']!r}")
        if group.get("kernel") == "bitsandbytes" and importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("kernel='bitsandbytes' needs bitsandbytes: pip install bitsandbytes (or kernel='auto')")

    def init_state(self, state: dict, like: torch.Tensor, group: dict) -> None:
        """Zero moments written as codes directly: quantising a float32 zero tensor would make temporaries of
        several times its size (1.3 GB for a 1B embedding)."""
        blocks = math.ceil(like.numel() / BLOCK)
        for key, signed in (("m", True), ("v", False)):
            zero, _ = quantize(torch.zeros(1, device=like.device), signed=signed)
            state[f"q8_{key}"] = zero.reshape(()).expand(like.shape).contiguous()
            state[f"q8_{key}_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=like.device)
        state["q8_step"] = 0

    def update(self, grad: torch.Tensor, state: dict, group: dict) -> tuple[torch.Tensor, float]:
        op = fused_kernel(group, grad)
        if op is not None:
            direction = torch.zeros(grad.shape, dtype=torch.float32, device=grad.device)
            self._fused(op, grad, direction, state, group, lr=-1.0)  # from zero, lr -1: the weight moves by D
            return direction, 1.0
        beta1, beta2 = group["betas"]
        mom = self.moments(state)
        m, v = mom["m"], mom["v"]
        g = grad.float()
        state["q8_step"] += 1
        t = state["q8_step"]
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        direction = m / v.sqrt().add_(group["eps"])
        self.set_moments(state, {"m": m, "v": v})
        factor = 1.0
        if group["correct_bias"]:
            factor = math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
        return direction, factor

    def step_full_rank(self, params: list[torch.Tensor], states: list[dict], group: dict) -> None:
        """As the base loop, but a big contiguous tensor goes chunk by chunk: blocks never straddle a chunk, so
        the codes, scales and weights are bit for bit those of the one-piece update."""
        lr = float(group["lr"])
        for p, state in zip(params, states):
            op = fused_kernel(group, p)
            if op is not None and p.dtype == torch.float32 and p.is_contiguous():
                self._fused(op, p.grad, p, state, group, lr=lr)
                continue
            if p.numel() <= CHUNK or not (p.is_contiguous() and p.grad.is_contiguous()):
                direction, factor = self.update(p.grad, state, group)
                p.add_(direction, alpha=-lr * factor)
                continue
            state["q8_step"] += 1
            beta1, beta2 = group["betas"]
            t = state["q8_step"]
            factor = math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t) if group["correct_bias"] else 1.0
            weight, grad = p.view(-1), p.grad.view(-1)
            codes = {k: state[f"q8_{k}"].view(-1) for k in ("m", "v")}
            for start in range(0, weight.numel(), CHUNK):
                part = slice(start, min(start + CHUNK, weight.numel()))
                blocks = slice(start // BLOCK, math.ceil(part.stop / BLOCK))
                m = dequantize(codes["m"][part], state["q8_m_absmax"][blocks], signed=True)
                v = dequantize(codes["v"][part], state["q8_v_absmax"][blocks], signed=False)
                g = grad[part].float()
                m.mul_(beta1).add_(g, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                weight[part].add_(m / v.sqrt().add_(group["eps"]), alpha=-lr * factor)
                for key, moment, signed in (("m", m, True), ("v", v, False)):
                    idx, absmax = quantize(moment, signed=signed)
                    codes[key][part] = idx
                    state[f"q8_{key}_absmax"][blocks] = absmax

    @staticmethod
    def _fused(op, grad: torch.Tensor, out: torch.Tensor, state: dict, group: dict, lr: float) -> None:
        """One step of bitsandbytes' kernel: the codes and scales in place, ``out -= lr * f * D`` (float32,
        contiguous). Weight decay stays the optimizer's (decoupled, after the update), so the kernel gets none."""
        beta1, beta2 = group["betas"]
        state["q8_step"] += 1
        t = state["q8_step"]
        eps = group["eps"] / math.sqrt(1.0 - beta2**t)  # galore-torch's m/(sqrt(v)+eps), in the kernel's form
        code_m, code_v = _tables(True, grad.device)[0], _tables(False, grad.device)[0]
        g = grad.detach().float().contiguous()
        m, v, scales = state["q8_m"], state["q8_v"], (state["q8_m_absmax"], state["q8_v_absmax"])
        op("adam", g, out, m, v, beta1, beta2, 0.0, 0.0, eps, t, lr, code_m, code_v, *scales, 0.0, 1.0, False)

    def moments(self, state: dict) -> dict[str, torch.Tensor]:
        return {
            "m": dequantize(state["q8_m"], state["q8_m_absmax"], signed=True),
            "v": dequantize(state["q8_v"], state["q8_v_absmax"], signed=False),
        }

    def set_moments(self, state: dict, moments: dict[str, torch.Tensor]) -> None:
        state["q8_m"], state["q8_m_absmax"] = quantize(moments["m"], signed=True)
        state["q8_v"], state["q8_v_absmax"] = quantize(moments["v"], signed=False)

    def bias_corrections(self, state: dict, group: dict) -> tuple[float, float]:
        beta1, beta2 = group["betas"]
        t = state["q8_step"]
        return 1.0 - beta1**t, 1.0 - beta2**t
