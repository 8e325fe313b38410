"""LoRA (Hu et al. 2021) and DoRA (Liu et al. 2024) through peft: frozen weights plus trained low-rank adapters
``W + (alpha / r) B A`` (DoRA: a magnitude vector times the normalised ``W + BA``).

Options (peft's names): ``alpha`` (``lora_alpha``, default 32) and ``dropout`` (``lora_dropout``, default 0.05),
GaLore's LoRA baseline; the rank is the run's ``--rank`` and the adapted modules its ``--target-modules`` (the
weights a subspace method would project). What else trains follows the papers: in pretraining every parameter
outside the adapted modules (embeddings, norms, head), as in ReLoRA's and GaLore's LoRA rows; in fine-tuning
only the adapters and the task head (peft's ``SEQ_CLS`` convention, ``modules_to_save``).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from .base import Baseline, adapted_modules, peft_targets

#: task heads trained in full beside the adapters when fine-tuning (peft's SEQ_CLS modules_to_save)
HEADS = ("classifier", "score")


class LoRA(Baseline):
    defaults = {"alpha": 32.0, "dropout": 0.05}
    aliases = {"lora_alpha": "alpha", "lora_dropout": "dropout"}
    uses_rank = True

    def __init__(self, name: str):
        self.name = name
        self.dora = name == "dora"

    def check(self, own: dict[str, Any], steps: int) -> None:
        for key in ("alpha", "dropout"):
            value = own[key]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{self.name} {key} must be a finite number >= 0, got {value!r}")
        if own["dropout"] >= 1:
            raise ValueError(f"{self.name} dropout must be below 1, got {own['dropout']!r}")

    def prepare(self, model: nn.Module, own: dict[str, Any], rank: int | None, targets, pretraining: bool):
        from peft import LoraConfig, get_peft_model

        names = adapted_modules(model, targets)
        heads = [] if pretraining else [h for h in HEADS if hasattr(model, h)]
        config = LoraConfig(
            r=int(rank),
            lora_alpha=float(own["alpha"]),
            lora_dropout=float(own["dropout"]),
            target_modules=peft_targets(model, names),
            use_dora=self.dora,
            modules_to_save=heads or None,
            task_type="CAUSAL_LM" if pretraining else "SEQ_CLS",
        )
        wrapped = get_peft_model(model, config)
        if pretraining:  # everything outside the adapted weights trains in full, as in ReLoRA's and GaLore's rows
            frozen = {f"{n}.base_layer.{k}" for n in names for k in ("weight", "bias")}
            for name, p in wrapped.base_model.model.named_parameters():
                if "lora_" not in name and name not in frozen:
                    p.requires_grad_(True)
        return wrapped

    def merged(self, model: nn.Module) -> nn.Module:
        """The adapters merged into their weights (peft's ``merge_and_unload``, in place: the run's last use)."""
        return model.merge_and_unload()

    def adapter(self, model: nn.Module):
        return model
