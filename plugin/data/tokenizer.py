"""Tokenizers: an offline byte-level tokenizer, and a loader for hub/local ones.

The byte tokenizer needs no files and no network, so tests and the laptop recipe run
anywhere. It maps every UTF-8 byte to its own token, hence round-trips any text.
"""

from __future__ import annotations

import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ..hub import is_hub_id

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]

# Each message is "<|role|>\n{content}"; a user/system turn ends with "\n", an assistant
# turn with "</s>", so the model learns to stop. Rendering is prefix-stable (rendering
# messages[:i] with a generation prompt is a prefix of rendering messages[:i+1]), which is
# what the data module relies on to find the assistant tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what ByteLevel expects)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def build_byte_tokenizer(model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """Build the offline byte-level tokenizer.

    Ids 0-5 are `<pad>`, `<s>`, `</s>`, `<|system|>`, `<|user|>`, `<|assistant|>`; byte `b`
    is id `6 + b`, so the vocabulary has 262 tokens. Calling the tokenizer prepends `<s>`
    (like Llama); `apply_chat_template` uses a simple role-marker template.

    Args:
        model_max_length: the length transformers warns beyond.

    Returns:
        A fast tokenizer with bos/eos/pad set and a chat template.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + b for b, ch in sorted(_bytes_to_unicode().items())})
    # BPE with no merges over byte-level characters = exactly one token per byte.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        padding_side="right",
    )


def load_tokenizer(name_or_path: str | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer by name.

    Args:
        name_or_path: `None` or `"byte"` for the built-in byte tokenizer; otherwise a local
            directory or a hub id passed to `AutoTokenizer.from_pretrained`.

    Returns:
        The tokenizer, with `pad_token` set to `eos_token` when it had none.

    Raises:
        FileNotFoundError: the name is neither an existing path nor a plausible hub id.
        ValueError: the tokenizer has neither a pad nor an eos token.
    """
    if name_or_path is None or name_or_path == "byte":
        return build_byte_tokenizer()
    path = os.path.expanduser(name_or_path)
    if not os.path.exists(path) and not is_hub_id(name_or_path):
        raise FileNotFoundError(
            f"tokenizer '{name_or_path}' is not an existing path nor a hub id like 'owner/name'; "
            "use 'byte' (or null) for the built-in byte tokenizer"
        )
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as e:  # offline hub miss, or a directory without tokenizer files
        raise OSError(f"could not load tokenizer '{name_or_path}': {e}") from e
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer '{name_or_path}' has neither a pad_token nor an eos_token")
        tok.pad_token = tok.eos_token  # only padding positions use it, and they carry no loss
    return tok
