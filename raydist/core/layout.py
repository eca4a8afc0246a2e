"""The Llama module layout every model-editing step relies on (pruning, sparsity, quantization): decoder blocks
at ``model.model.layers[i]`` with ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj`` (Llama, Mistral,
Qwen2, SmolLM2). One place, so every method refuses another layout with the same message.
"""

from __future__ import annotations

from torch import nn

LLAMA_LINEARS = (
    ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
    ("mlp", ("gate_proj", "up_proj", "down_proj")),
)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or len(layers) == 0:
        raise ValueError(
            f"{type(model).__name__} does not have the Llama module layout (model.model.layers[i] with "
            "self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj)"
        )
    return layers


def layer_linears(layer: nn.Module, index: int) -> dict[str, nn.Linear]:
    """``{"self_attn.q_proj": Linear, ...}`` for one decoder layer, in execution order."""
    out: dict[str, nn.Linear] = {}
    for parent_name, names in LLAMA_LINEARS:
        parent = getattr(layer, parent_name, None)
        for name in names:
            lin = getattr(parent, name, None)
            if not isinstance(lin, nn.Linear):
                raise ValueError(f"decoder layer {index} has no nn.Linear {parent_name}.{name} (Llama layout expected)")
            out[f"{parent_name}.{name}"] = lin
    return out
