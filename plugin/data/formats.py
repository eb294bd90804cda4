"""The data formats, what each needs, and the prompt templates of instruction rows."""

from __future__ import annotations

FORMATS = ("instruction", "chat", "text")

# What a row of each format must hold: quoted by every message about a row or columns that fit no format.
NEEDS = {
    "instruction": "fields 'instruction' and 'output' (or 'response'), optional 'input' (or 'context')",
    "chat": "a 'messages' field: a list of {'role': ..., 'content': ...}",
    "text": "a text field (data.text_field, default 'text')",
}

_ALPACA_HEAD = "Below is an instruction that describes a task{}. Write a response that appropriately completes the request.\n\n"
# name -> (template for rows with an input, template for rows without one)
PROMPT_TEMPLATES = {
    "alpaca": (
        _ALPACA_HEAD.format(", paired with an input that provides further context")
        + "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        _ALPACA_HEAD.format("") + "### Instruction:\n{instruction}\n\n### Response:\n",
    ),
    # Same markers without the preamble: 5x fewer prompt tokens for tiny CPU runs.
    "short": (
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "### Instruction:\n{instruction}\n\n### Response:\n",
    ),
}


def resolve_template(template: str | None) -> tuple[str, str]:
    """The (with input, without input) templates that `data.prompt_template` names.

    Args:
        template: a name in `PROMPT_TEMPLATES` (`None` means "alpaca"), or a format string with
            `{instruction}` and optionally `{input}`, used for both kinds of rows.

    Returns:
        The template for rows with a non-empty input, and the one for rows without.

    Raises:
        ValueError: the template is neither a known name nor such a format string.
    """
    t = "alpaca" if template is None else template
    if t in PROMPT_TEMPLATES:
        return PROMPT_TEMPLATES[t]
    try:
        t.format(instruction="", input="")
        ok = "{instruction}" in t
    except (KeyError, IndexError, ValueError, AttributeError, TypeError):  # any broken format string
        ok = False
    if not ok:
        raise ValueError(
            f"data.prompt_template must be one of {sorted(PROMPT_TEMPLATES)} or a format string with "
            f"'{{instruction}}' and optionally '{{input}}' (no other fields), got {t!r}"
        )
    return t, t


def instruction_prompt(templates: tuple[str, str], instruction: str, input: str = "") -> str:
    """The prompt of one instruction row, from the pair `resolve_template` returns."""
    with_input, without = templates
    if input and "{input}" not in with_input:  # a custom template without {input}
        instruction, input = f"{instruction}\n\n{input}", ""
    return (with_input if input else without).format(instruction=instruction, input=input)
