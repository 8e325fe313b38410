"""What a causal LM's forward keeps for its backward, counted on the model itself rather than from a formula.

A probe of the same architecture with one and with two decoder layers (the real widths, vocabulary and dtype; its
weights left uninitialised, so nothing is computed that matters) runs one forward of the planned batch under
``torch.autograd.graph.saved_tensors_hooks`` and counts the bytes of every distinct storage autograd saves, the
weights excluded. Two layers minus one is what each layer keeps; one layer minus that is what the rest keeps
(embeddings, final norm, head, loss). This holds for any architecture ``transformers`` builds, with whatever its
attention implementation saves on this machine.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Saved:
    per_layer: int  #: bytes one decoder layer keeps for backward
    rest: int  #: embeddings, final norm, head and loss
    layer_input: int  #: one layer's input (what gradient checkpointing keeps per layer)
    logits: int  #: the float32 logits of the batch (their gradient is as large)


def _with_vocab(config, vocab: int):
    config = copy.deepcopy(config)
    config.vocab_size = vocab
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # ids past the probe's vocabulary
        if isinstance(getattr(config, key, None), int) and getattr(config, key) >= vocab:
            setattr(config, key, None)
    return config


def _layers_key(config) -> str:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(config, key):
            return key
    raise ValueError(f"cannot tell the number of layers of a {type(config).__name__}")


def _saved_by_forward(config, layers: int, batch: int, seq_len: int, dtype: torch.dtype, classifier: bool) -> int:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = copy.deepcopy(config)
    setattr(config, _layers_key(config), layers)
    config.use_cache = False
    with torch.device("meta"):
        model = (AutoModelForSequenceClassification if classifier else AutoModelForCausalLM).from_config(config)
    model = model.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # uninitialised memory may hold NaN, which some kernels branch on
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        # detached: a node that saves its own output and gets the tensor back (whose grad_fn is that node) makes
        # a cycle through autograd's C++ that no garbage collection frees; the probe leaked 1.8 GiB at 7B
        return t.detach()

    ids = torch.zeros(batch, seq_len, dtype=torch.long)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, labels=ids[:, 0] if classifier else ids)
    del out, model
    return sum(seen.values())


#: the probe's vocabularies: what the head and loss keep grows linearly with the vocabulary, so two small ones
#: give it for the real one without building a real-size embedding and head
PROBE_VOCAB = (256, 512)


_probed: dict[tuple, tuple[int, int]] = {}


def saved_activations(config, batch: int, seq_len: int, dtype: torch.dtype, classifier: bool = False) -> Saved:
    """The bytes a forward of ``batch`` x ``seq_len`` keeps, by part (see the module docstring). Probed once per
    architecture, sequence length and dtype with one sequence (what is kept grows with the batch, one sequence's
    worth per row), and remembered for the rest of the process. ``classifier``: a sequence classifier (its
    ``num_labels`` logits per row), as fine-tuning trains."""
    key = (config.to_json_string(), seq_len, str(dtype), classifier)
    if key not in _probed:
        small, larger = (_with_vocab(config, v) for v in PROBE_VOCAB)
        one = _saved_by_forward(small, 1, 1, seq_len, dtype, classifier)
        per_layer = max(0, _saved_by_forward(small, 2, 1, seq_len, dtype, classifier) - one)
        per_vocab = (_saved_by_forward(larger, 1, 1, seq_len, dtype, classifier) - one) / (
            PROBE_VOCAB[1] - PROBE_VOCAB[0]
        )
        one += round(per_vocab * (config.vocab_size - PROBE_VOCAB[0]))
        _probed[key] = (per_layer, max(0, one - per_layer))
    per_layer, rest = _probed[key]
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    elem = torch.finfo(dtype).bits // 8
    return Saved(
        per_layer=batch * per_layer,
        rest=batch * rest,
        layer_input=batch * seq_len * hidden * elem,
        logits=batch * 4 * (config.num_labels if classifier else seq_len * config.vocab_size),
    )
