"""Skip the last decoder layer's work at positions whose output nothing reads.

In a causal LM the last decoder layer's output at a position is read only by the LM head at that position.
The training loss projects only the positions that predict a response token (`logits_to_keep`, a boolean
mask), so everywhere else the last layer's MLP and attention output projection are wasted work: 77% of the
positions on the built-in task. While enabled (`with only_where_logits(model):`), those two modules run only
at the kept positions and write zeros elsewhere (hidden states that no one reads). Keys and values of the last
layer still come from every position, as attention needs them. Exact: loss and gradients equal the full
computation (tests).

It applies to decoder layers with an `mlp` module named `*MLP` (Llama, Mistral, Qwen, Gemma, Phi-3, ...) and a
`self_attn.o_proj`; anything else (mixture-of-experts blocks, other layouts) runs unchanged. Not combined with
gradient checkpointing (the recomputation runs outside the model call that sets the mask) or torch.compile.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from forgetting.harness.packing import transformers_model


def last_decoder_layer(model) -> torch.nn.Module | None:
    """The last decoder layer when it has the MLP and output projection this module knows how to skip."""
    base = transformers_model(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not layers:
        return None
    layer = layers[-1]
    mlp, attention = getattr(layer, "mlp", None), getattr(layer, "self_attn", None)
    if not (
        isinstance(mlp, torch.nn.Module)
        and type(mlp).__name__.endswith("MLP")
        and isinstance(getattr(attention, "o_proj", None), torch.nn.Module)
    ):
        return None
    return layer


def enable(model) -> Callable[[], None]:
    """Run the last layer's MLP and output projection only at kept positions; returns the undo function.

    A model without a recognised last layer, with gradient checkpointing on, or compiled is left as it is (the
    undo function then does nothing).
    """
    layer = last_decoder_layer(model)
    base = transformers_model(model)
    compiled = any(getattr(m, "_compiled_call_impl", None) is not None for m in (model, base))  # nn.Module.compile
    # transformers 5.24 renamed is_gradient_checkpointing (the old name warns); older versions have only that
    checkpointing = getattr(base, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(base, "is_gradient_checkpointing", False)
    if layer is None or checkpointing or compiled:
        return lambda: None
    kept = {"mask": None}  # the current call's logits_to_keep mask, set only while the model runs

    def remember(module, args, kwargs):
        mask = kwargs.get("logits_to_keep")
        kept["mask"] = mask if torch.is_tensor(mask) and mask.dtype == torch.bool else None

    def forget(module, args, kwargs, output):
        kept["mask"] = None

    handles = [
        base.register_forward_pre_hook(remember, with_kwargs=True),
        base.register_forward_hook(forget, with_kwargs=True, always_call=True),
    ]
    patched = [(module, module.__dict__.get("forward")) for module in (layer.mlp, layer.self_attn.o_proj)]
    for module, _ in patched:
        module.forward = _only_at_kept(module.forward, kept)

    def restore() -> None:
        for handle in handles:
            handle.remove()
        for module, own_forward in patched:
            del module.forward
            if own_forward is not None:
                module.forward = own_forward

    return restore


@contextmanager
def only_where_logits(model) -> Iterator[None]:
    """`enable` for a `with` block: the layer's own forwards come back however the block ends (an error too)."""
    undo = enable(model)
    try:
        yield
    finally:
        undo()


def _only_at_kept(forward, kept: dict):
    def only_at_kept(hidden_states, *args, **kwargs):
        mask = kept["mask"]
        if mask is None or mask.shape != hidden_states.shape[:-1]:
            return forward(hidden_states, *args, **kwargs)
        rows = forward(hidden_states[mask], *args, **kwargs)
        zeros = rows.new_zeros(hidden_states.shape[:-1] + rows.shape[-1:])
        return zeros.index_put((mask,), rows)

    return only_at_kept
