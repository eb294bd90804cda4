"""The model's transformers config, and a weightless model built from it: what ``lightning-qlora-estimate``
reads in place of the weights.

The config comes from where the run would load the model (``model.from_config``, a local directory, the
hub cache, the hub) without loading weights or downloading a tokenizer; :func:`meta_model` builds the model
on the meta device and converts it with the run's plugin, so the estimate counts the run's own layers.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .messages import one_line


def read_hf_config(cfg: DictConfig, notes: list[str] | None = None) -> tuple[Any, str]:
    """The model's transformers config, read from config.json only (no weights, no tokenizer download),
    and a name for it.

    A model built from ``model.from_config`` takes the tokenizer's vocabulary, as the run does (the
    byte tokenizer and local tokenizers are read; a hub tokenizer is not, and the config's
    ``vocab_size`` stands, said in ``notes``).

    Raises:
        ValueError: one line naming ``model.name_or_path`` / ``model.from_config`` and the fix.
    """
    from .builders import builds_from_config, model_config
    from .hub import looks_local
    from .module import build_hf_config

    notes = notes if notes is not None else []
    model = model_config(cfg)
    if builds_from_config(cfg):
        m = cfg.model
        src = (
            m.from_config
            if isinstance(m.from_config, str)
            else OmegaConf.to_container(m.from_config, resolve=True)
        )
        if isinstance(src, str) and not os.path.exists(os.path.expanduser(src)):
            raise ValueError(
                f"model.from_config={src!r} does not exist; give a config.json, a model directory, or a dict "
                "with model_type"
            )
        try:
            hf_config = build_hf_config(os.path.expanduser(src) if isinstance(src, str) else src)
        except (OSError, ValueError) as err:
            raise ValueError(f"model.from_config: {one_line(err)}") from None
        vocab = _tokenizer_vocab(model.tokenizer)
        if vocab is None:
            notes.append(
                f"vocab_size {hf_config.vocab_size} from the config: model.tokenizer={model.tokenizer!r} is a hub "
                "id and is not loaded here (the run sizes the embedding to it)"
            )
        else:
            hf_config.vocab_size = vocab
        return hf_config, model.display_name
    name = model.name_or_path
    if not name:
        raise ValueError("set model.name_or_path (hub id or local path) or model.from_config")
    path = os.path.expanduser(name)
    if looks_local(name):
        return _local_config(name, path, model.trust_remote_code, notes), name
    return _hub_config(name, model.revision, model.trust_remote_code), name


def _tokenizer_vocab(tokenizer: str | None) -> int | None:
    """``len(tokenizer)`` for the byte tokenizer or a local one; None for a hub id (not downloaded here)."""
    from .data import load_tokenizer
    from .hub import looks_local

    if tokenizer not in (None, "byte") and not looks_local(tokenizer):
        return None
    try:
        return len(load_tokenizer(tokenizer))
    except (OSError, ValueError) as err:
        raise ValueError(f"model.tokenizer={tokenizer!r}: {one_line(err)}") from None


def _local_config(name: str, path: str, trust_remote_code: bool, notes: list[str]) -> Any:
    from transformers import AutoConfig

    from .checkpoint4bit import BNB_4BIT, quantization_method, read_config

    if not os.path.isdir(path):
        raise ValueError(
            f"model.name_or_path={name!r} does not exist; give a saved model's directory or a hub id"
        )
    raw = read_config(path, "model.name_or_path")  # a clear line for a missing or broken config.json
    method = quantization_method(raw)
    if method == BNB_4BIT:
        notes.append(
            "a bitsandbytes 4-bit checkpoint: estimated with the quant.* settings, which the run's pre-flight "
            "checks against it"
        )
    elif method is not None:
        raise ValueError(
            f"model.name_or_path={name!r} is quantized with {method}; lightning-qlora trains from a 16-bit "
            "checkpoint or a bitsandbytes 4-bit one"
        )
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"model.name_or_path={name!r}: config.json cannot be read: {one_line(err)}"
        ) from None


def _hub_config(name: str, revision: str | None, trust_remote_code: bool) -> Any:
    """config.json of a hub model: from the local cache, else from the hub when it can be reached."""
    from transformers import AutoConfig

    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        pass  # not in the cache
    fix = (
        "give a local copy (model.name_or_path=/path/to/model) or its config "
        "(model.from_config=/path/to/config.json model.name_or_path=null)"
    )
    if not _hub_reachable():
        raise ValueError(
            f"model.name_or_path={name!r} is a hub id whose config.json is not in the local cache, and the hub "
            f"cannot be reached (no network); {fix}"
        )
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # retry warnings would bury the one line below
    try:
        return AutoConfig.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"model.name_or_path={name!r}: config.json cannot be fetched ({_first(err)}); {fix}"
        ) from None
    finally:
        hub_logger.setLevel(level)


def _first(err: BaseException) -> str:
    return one_line(err).split(". ")[0]


def _hub_reachable() -> bool:
    """False when the hub is off (``HF_HUB_OFFLINE``) or its host does not resolve: a fetch would only retry."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def meta_model(hf_config: Any, plugin: Any, trust_remote_code: bool = False) -> Any:
    """The model ``hf_config`` describes, built on the meta device and converted by ``plugin`` (quantized
    layers, adapters where ``lora.target_modules`` puts them): shapes only, nothing allocated."""
    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(hf_config)
    if hasattr(config, "quantization_config"):  # a 4-bit checkpoint's: the plugin quantizes, not transformers
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        plugin.convert_module(model)
    return model
