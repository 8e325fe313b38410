"""Full-rank AdamW with 8-bit block-wise moments (Dettmers et al. 2022): every parameter trained by the
``adamw8bit`` inner rule, the row users of bitsandbytes compare with. ``--base`` does not apply."""

from __future__ import annotations

from .base import Baseline


class AdamW8bitBaseline(Baseline):
    name = "adamw8bit"
    base = "adamw8bit"
