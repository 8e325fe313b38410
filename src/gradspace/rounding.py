"""Writing an update into a low-precision weight: round-to-nearest, or stochastic rounding.

A bfloat16 weight keeps 8 bits of mantissa: an update smaller than half its last bit (at 1.0, 2**-9 ~ 0.002) is
lost entirely by round-to-nearest, which is what fine-tuning rates such as 1e-5 mostly produce. Stochastic
rounding rounds up or down with the probabilities that make it unbiased, ``E[round(w + u)] = w + u``, so small
updates survive in expectation (Q-GaLore's rounding of its INT8 weights; Gupta et al. 2015 for 16-bit training).

With ``weight_rounding="stochastic"`` the optimizer steps each bfloat16 weight on a float32 copy (one weight at a
time), with its moments kept in the weight's dtype as before, and writes the copy back stochastically rounded. The
random bits come from a generator keyed by (seed, parameter, step), so runs and resumed runs agree bit for bit.
"""

from __future__ import annotations

import torch

#: ``auto``: stochastic for int8 weights (``gradspace.int8_weights``: round-to-nearest loses nearly every update
#: there), round-to-nearest for bfloat16 ones (as torch does)
ROUNDINGS = ("auto", "nearest", "stochastic")


def stochastic_round_(out: torch.Tensor, value: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``out`` (bfloat16) <- ``value`` (float32) rounded up or down to a neighbouring bfloat16, up with the
    probability of the distance from the lower one: a random 16-bit integer is added to the float32's low 16 bits,
    which are then dropped (floats are sign and magnitude, so this rounds the magnitude, either sign alike).
    Non-finite values pass through unchanged."""
    if out.dtype != torch.bfloat16:
        raise TypeError(f"stochastic rounding is implemented for bfloat16 weights, got {out.dtype}")
    bits = value.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    rounded = torch.bitwise_and(bits + noise, -65536).view(torch.float32)  # -65536 = 0xFFFF0000
    rounded = torch.where(torch.isfinite(value), rounded, value)
    return out.copy_(rounded.to(torch.bfloat16))  # exact: the low 16 bits are zero
