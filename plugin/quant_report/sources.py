"""Where the weights come from: a module, a checkpoint's safetensors, a config, a training recipe.

Every source yields ``(name, tensor)`` pairs of linear-layer weights, one tensor at a time, for
:func:`~lightning_qlora.quant_report.measurement.evaluate_weights`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

# Tensors that are 2-D but are not linear layers' weights: token/position embeddings and the
# output head (often tied to the embedding). They are left out unless asked for.
_EMBEDDING_RE = re.compile(
    r"(embed|(^|\.)(wte|wpe|lm_head|shared|output|embed_out|word_embeddings|position_embeddings)\.weight$)"
)


def _natural_key(name: str) -> list[object]:
    # layers.10 after layers.9, not after layers.1
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def is_linear_weight(name: str, tensor: torch.Tensor, include_embeddings: bool = False) -> bool:
    """Whether a state-dict entry looks like a linear layer's weight.

    2-D floating tensors named ``*.weight``; embeddings and the output head are excluded unless
    ``include_embeddings`` (they are usually kept in 16-bit).
    """
    if tensor.ndim != 2 or not tensor.is_floating_point() or not name.endswith("weight"):
        return False
    return include_embeddings or not _EMBEDDING_RE.search(name)


def select_linear_weights(
    named_tensors: Iterable[tuple[str, torch.Tensor]], include_embeddings: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Filter ``(name, tensor)`` pairs (e.g. ``state_dict().items()``) to linear weights."""
    for name, t in named_tensors:
        if is_linear_weight(name, t, include_embeddings):
            yield name, t


def linear_weights_from_module(
    module: torch.nn.Module, include_embeddings: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights of a module's ``nn.Linear`` layers (and transformers' ``Conv1D``).

    Args:
        module: any model, e.g. a recipe's instantiated model.
        include_embeddings: also yield the output head (embeddings are not linear layers).

    Yields:
        ``(parameter name, weight)``.
    """
    head = None
    get_out = getattr(module, "get_output_embeddings", None)
    if callable(get_out):
        head = get_out()
    for name, m in module.named_modules():
        is_linear = isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"
        if not is_linear or getattr(m, "weight", None) is None:
            continue
        if not include_embeddings and (m is head or name.split(".")[-1] == "lm_head"):
            continue
        yield f"{name}.weight", m.weight.detach()


def _safetensors_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path} is not a .safetensors file")
        return [path]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in dict.fromkeys(sorted(weight_map.values(), key=_natural_key))]
    return sorted(path.glob("*.safetensors"), key=lambda p: _natural_key(p.name))


def linear_weights_from_checkpoint(
    path: str | os.PathLike[str], include_embeddings: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream the linear weights of a transformers checkpoint, one tensor at a time.

    Reads ``*.safetensors`` (single file or sharded with ``model.safetensors.index.json``) with
    ``safetensors.safe_open``, so host memory stays bounded by one tensor.

    Args:
        path: a checkpoint directory or a ``.safetensors`` file.
        include_embeddings: also yield 2-D embeddings and the output head.

    Yields:
        ``(name, tensor)`` in natural order of names (layer 2 before layer 10).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: no safetensors weights there, or none of them is a linear weight.
    """
    from safetensors import safe_open

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model path {p} does not exist (expected a checkpoint directory)")
    files = _safetensors_files(p)
    if not files:
        other = sorted(x.name for x in p.glob("*.bin")) + sorted(x.name for x in p.glob("*.pt"))
        hint = f" (found {', '.join(other)}: convert to safetensors with save_pretrained)" if other else ""
        raise ValueError(
            f"no weights in {p}: expected *.safetensors files (a transformers checkpoint saved with "
            f"save_pretrained, or a model.safetensors.index.json with its shards){hint}"
        )
    # Read the headers first and sort all names across shards, so layers come in order
    # (layers.2 before layers.10) even when one layer spans two shards.
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(f), framework="pt")) for f in files]
        where = {name: h for h in handles for name in h.keys()}
        found = 0
        for name in sorted(where, key=_natural_key):
            h = where[name]
            if len(h.get_slice(name).get_shape()) != 2:
                continue  # skip without reading the data
            t = h.get_tensor(name)
            if is_linear_weight(name, t, include_embeddings):
                found += 1
                yield name, t
    if not found:
        raise ValueError(f"no linear-layer weights (2-D *.weight tensors) in {', '.join(map(str, files))}")


TINY_LLAMA: dict[str, int] = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 1024,
}


def model_from_config(config: str | os.PathLike[str] | None = None, seed: int = 0) -> torch.nn.Module:
    """Build a causal LM with random weights from a transformers config, offline.

    Args:
        config: a ``config.json`` (or its directory); ``None`` builds a tiny Llama
            (:data:`TINY_LLAMA`).
        seed: seed for the random initialisation (global RNG restored afterwards).

    Returns:
        The model, in float32.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    if config is None:
        cfg = LlamaConfig(**TINY_LLAMA)
    else:
        p = Path(config)
        if not p.exists():
            raise FileNotFoundError(f"config {p} does not exist (expected a config.json or its directory)")
        cfg = AutoConfig.from_pretrained(str(p))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(cfg)


def linear_weights_from_recipe(
    recipe: str, overrides: Sequence[str] = (), include_embeddings: bool = False
) -> tuple[Iterator[tuple[str, torch.Tensor]], str]:
    """The linear weights of the model a training recipe would fine-tune, and its name.

    A local ``model.name_or_path`` is read from its safetensors; ``model.from_config`` (the embedded
    default) is built with the recipe's seed and tokenizer, exactly as ``lightning-qlora`` builds it.

    Args:
        recipe: a recipe name, e.g. ``default``.
        overrides: Hydra overrides applied to it, e.g. ``model.name_or_path=/models/llama2``.
        include_embeddings: also yield embeddings and the output head.

    Returns:
        ``(weights, name)``: the ``(name, tensor)`` pairs and a label for the report.

    Raises:
        ValueError: an unknown recipe or a bad override, or a recipe whose model is on the hub.
    """
    # Imported here, not at the top: composing a recipe and building its module pulls in Hydra,
    # Lightning and transformers, which the other weight sources do not need.
    from ..builders import build_module, build_tokenizer, compose_recipe

    try:
        cfg = compose_recipe(recipe, overrides)
    except ValueError as err:
        raise ValueError(f"--recipe {recipe}: {err}") from None
    if cfg.model.from_config is None:
        path = str(cfg.model.name_or_path)
        if not Path(path).expanduser().is_dir():
            raise ValueError(
                f"recipe {recipe!r} fine-tunes {path!r}, which is not a local directory; download it and pass "
                "--model <dir> (this report reads weights from disk, not from the hub)"
            )
        return linear_weights_from_checkpoint(path, include_embeddings), f"{recipe}: {path}"
    module = build_module(cfg, build_tokenizer(cfg))
    module.configure_model()
    return linear_weights_from_module(module.model, include_embeddings), f"{recipe}: {module.model_name}"
