"""LLaMA models of the sizes the GaLore / SubTrack papers train, built from a config (no download), plus two small
ones that train on a CPU.

    model = build_llama("60m")                       # the papers' LLaMA-60M with GPT-2's vocabulary
    big = build_llama("7b", device="meta")           # shapes only, no memory
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

GPT2_EOS = 50256

#: preset -> (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads). The paper sizes follow
#: GaLore's llama_*.json configs (their names count a 32,000-token vocabulary).
PRESETS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (64, 172, 2, 4),
    "mini": (128, 344, 4, 4),
    "60m": (512, 1376, 8, 8),
    "130m": (768, 2048, 12, 12),
    "350m": (1024, 2736, 24, 16),
    "1b": (2048, 5461, 24, 32),
    "7b": (4096, 11008, 32, 32),
}
#: the small presets tie input and output embeddings: the vocabulary dominates them, and tying halves its cost
TIED = ("tiny", "mini")


def llama_config(preset: str, vocab_size: int = 50257, **overrides):
    """The ``LlamaConfig`` of a preset; ``overrides`` set any other config field."""
    from transformers import LlamaConfig

    key = preset.lower()
    if key not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    hidden, intermediate, layers, heads = PRESETS[key]
    eos = GPT2_EOS if vocab_size > GPT2_EOS else None
    fields = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": key in TIED,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "pad_token_id": None,
    }
    fields.update(overrides)
    return LlamaConfig(**fields)


def build_llama(
    preset: str,
    vocab_size: int = 50257,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    int8_group_size: int | None = None,
    state: dict[str, torch.Tensor] | None = None,
    **overrides,
):
    """A freshly initialised ``LlamaForCausalLM`` of a preset (random init draws on torch's global RNG), built in
    ``dtype`` (float32 by default) so that a bfloat16 7B never exists in float32.

    ``device="meta"`` builds the model without allocating its weights, e.g. to count parameters of the 7B.
    ``int8_group_size``: the blocks' linear weights stored in int8 (``gradspace.int8_weights``), each quantised as
    soon as it is initialised, so the model never exists in full precision.
    ``state``: a checkpoint's model state, which becomes the model's own tensors (no initialisation, no second
    copy: a resumed 7B holds its weights once).
    """
    from transformers import LlamaForCausalLM

    config = llama_config(preset, vocab_size, **overrides)
    if state is not None:
        return _from_state(LlamaForCausalLM, config, torch.device(device or "cpu"), dtype, int8_group_size, state)
    if int8_group_size is not None:
        return _build_int8(LlamaForCausalLM, config, torch.device(device or "cpu"), dtype, int8_group_size)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    with torch.device(device) if device is not None else nullcontext():
        return LlamaForCausalLM._from_config(config, **kwargs)


def _build_int8(cls, config, device: torch.device, dtype: torch.dtype | None, group_size: int):
    """Built on the meta device, then each module allocated, initialised (the model's own ``_init_weights``) and,
    for the int8 targets, quantised before the next is allocated."""
    from itertools import chain

    from ..int8_weights import int8_modules, quantize_module_

    with torch.device("meta"):
        model = cls._from_config(config, **({"dtype": dtype} if dtype is not None else {}))
    targets = set(int8_modules(model))
    with torch.no_grad():
        for name, module in model.named_modules():
            own = chain(module.parameters(recurse=False), module.buffers(recurse=False))
            if any(t.is_meta for t in own):
                module.to_empty(device=device, recurse=False)
                model._init_weights(module)
                if name in targets:
                    quantize_module_(module, "weight", group_size, dtype)
    model.tie_weights()
    return model


def _from_state(cls, config, device: torch.device, dtype, group_size: int | None, state: dict[str, torch.Tensor]):
    """The model whose parameters are ``state``'s tensors (moved to ``device`` and ``dtype`` only if they are not
    there); buffers not in the state (rotary frequencies) initialised by the model's own ``_init_weights``."""
    from torch import nn

    from ..int8_weights import SCALES_SUFFIX, Int8Weight, int8_modules, wrap_stored

    with torch.device("meta"):
        model = cls._from_config(config, **({"dtype": dtype} if dtype is not None else {}))
    targets = set(int8_modules(model)) if group_size is not None else set()
    with torch.no_grad():
        for name, module in model.named_modules():
            if any(b.is_meta for b in module.buffers(recurse=False)):
                module.to_empty(device=device, recurse=False)
                model._init_weights(module)
            for pname, p in list(module._parameters.items()):
                key = f"{name}.{pname}" if name else pname
                if p is None or key not in state:
                    continue
                if name in targets and pname == "weight" and key + SCALES_SUFFIX in state:
                    wrap_stored(module, state[key].to(device), state[key + SCALES_SUFFIX].to(device), group_size, dtype)
                    continue
                value = state[key]
                if isinstance(value, Int8Weight):
                    raise TypeError(f"{key}: an int8 weight outside the int8 targets")
                value = value.to(device=device, dtype=dtype or value.dtype)
                module._parameters[pname] = nn.Parameter(value, requires_grad=p.requires_grad)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise KeyError(f"the checkpoint has no {', '.join(left[:3])}")
    model.tie_weights()
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def checkpoint_activations(model) -> None:
    """Gradient checkpointing of a Hugging Face model, non-reentrant, under either name transformers gives it."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
