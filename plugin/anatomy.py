"""Where the parts of a transformers model are: the HF model inside a wrapper, and its decoder layers."""

from __future__ import annotations

from torch import nn


def hf_root(model: nn.Module) -> tuple[nn.Module, str]:
    """The module adapter keys are relative to, and its qualified name inside ``model``.

    A ``transformers`` model is its own root. A wrapper (a LightningModule holding the HF model as
    ``self.model``) with exactly one outermost ``PreTrainedModel`` inside is keyed relative to it,
    so the saved keys are those PEFT expects for that model; any other module is its own root.
    """
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model, ""
    outer: list[tuple[str, nn.Module]] = []
    for name, sub in model.named_modules():
        if isinstance(sub, PreTrainedModel) and not any(name.startswith(o + ".") for o, _ in outer):
            outer.append((name, sub))
    if len(outer) == 1:
        return outer[0][1], outer[0][0]
    return model, ""


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The blocks transformers checkpoints one by one (its ``GradientCheckpointingLayer``s: a Llama's decoder
    layers), in order. Containers that carry a ``gradient_checkpointing`` flag for their children (RoFormer's
    encoder, say) are not among them."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
