"""The report's content: normal-sample and model measurements, the NF4 codebooks, an example block."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .formats import (
    DEFAULT_BLOCKSIZES,
    DEFAULT_FORMATS,
    bnb_codebook,
    derive_nf4_codebook,
    validate_blocksizes,
    validate_formats,
)
from .measurement import DEFAULT_SAMPLES, Measurement, evaluate_weights, measure, normal_samples


@dataclass
class Report:
    """Everything the report shows; see :func:`build_report`."""

    blocksizes: tuple[int, ...]
    formats: tuple[str, ...]
    samples: int
    seed: int
    normal: list[Measurement]
    derived_nf4: torch.Tensor
    bnb_nf4: torch.Tensor
    model_name: str | None = None
    model_layers: list[Measurement] = field(default_factory=list)
    model_totals: list[Measurement] = field(default_factory=list)
    # One block of weights for the codebook figure, and the tensor it came from.
    example_block: torch.Tensor | None = None
    example_tensor: torch.Tensor | None = None
    example_name: str = ""
    # What 4-bit costs in model quality (a QualityResult), and the train-first study around it
    # (a StudyResult: the fit, the LoRA recovery), when they were measured.
    quality: Any = None
    study: Any = None

    @property
    def codebook_max_diff(self) -> float:
        """max |derived NF4 - bitsandbytes NF4|."""
        return float((self.derived_nf4 - self.bnb_nf4).abs().max())


def build_report(
    blocksizes: Sequence[int] = DEFAULT_BLOCKSIZES,
    formats: Sequence[str] = DEFAULT_FORMATS,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    weights: Iterable[tuple[str, torch.Tensor]] | None = None,
    model_name: str | None = None,
    measured: tuple[list[Measurement], list[Measurement]] | None = None,
    example: tuple[str, torch.Tensor] | None = None,
) -> Report:
    """Measure all formats on normal samples and, if given, on model weights.

    Args:
        blocksizes: block sizes (validated against :data:`BNB_BLOCKSIZES`).
        formats: format keys.
        samples: number of standard-normal samples.
        seed: their seed.
        weights: ``(name, tensor)`` pairs of a model's linear weights, or ``None``.
        model_name: label of the model in the report.
        measured: ``(per_tensor, totals)`` already measured (the quality study measures the
            weights the model ran with), instead of ``weights``.
        example: ``(name, tensor)`` for the codebook figure when ``measured`` is given.

    Returns:
        The report.
    """
    blocksizes = validate_blocksizes(blocksizes)
    formats = validate_formats(formats)
    x = normal_samples(samples, seed)
    normal = [
        measure(x, f, b, source="normal", tensor=f"randn({samples})") for f in formats for b in blocksizes
    ]
    report = Report(
        blocksizes=blocksizes,
        formats=formats,
        samples=samples,
        seed=seed,
        normal=normal,
        derived_nf4=derive_nf4_codebook(),
        bnb_nf4=bnb_codebook("nf4"),
    )
    example_bs = 64 if 64 in blocksizes else blocksizes[0]
    example_src, example_name = x, f"N(0, 1) samples, seed {seed}"
    if measured is not None:
        report.model_layers, report.model_totals = measured
        report.model_name = model_name or "model"
        if example is not None:
            example_name = f"{report.model_name}: {example[0]}"
            example_src = example[1].detach().to("cpu", torch.float32).reshape(-1)[: 1 << 20].clone()
    elif weights is not None:
        first: list[tuple[str, torch.Tensor]] = []

        def keep_first(it: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
            for name, w in it:
                if not first:
                    first.append((name, w.detach().float().reshape(-1)[: 1 << 20].clone()))
                yield name, w

        name = model_name or "model"
        report.model_layers, report.model_totals = evaluate_weights(
            keep_first(weights), blocksizes, formats, source=name
        )
        report.model_name = name
        example_name, example_src = f"{name}: {first[0][0]}", first[0][1]
    report.example_tensor = example_src[: 1 << 20]
    report.example_block = example_src[:example_bs]
    report.example_name = example_name
    return report


def all_measurements(report: Report) -> list[Measurement]:
    """Normal samples, model totals, then each model tensor: the rows of the CSV."""
    return [*report.normal, *report.model_totals, *report.model_layers]
