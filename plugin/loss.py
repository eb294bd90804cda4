"""Causal-LM cross-entropy that never holds the full-vocabulary fp32 logits.

With a 128k vocabulary, ``(batch * seq, vocab)`` fp32 logits are 4 GiB for 8k tokens: more than
the whole 4-bit 1B model. The output head is frozen under QLoRA, so the loss only needs the
gradient with respect to the hidden states; it is computed chunk by chunk in the forward pass
(logits of one chunk at a time) and stored, so nothing is recomputed in the backward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

IGNORE_INDEX = -100


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, labels: Tensor, chunk_tokens: int) -> Tensor:
        valid = labels != IGNORE_INDEX
        count = valid.sum().clamp(min=1)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            h, y = hidden[start : start + chunk_tokens], labels[start : start + chunk_tokens]
            logits = (h @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            mask = y != IGNORE_INDEX
            target = y.clamp(min=0)
            picked = logits.gather(1, target[:, None]).squeeze(1)
            total += ((lse - picked) * mask).sum()
            if grad_hidden is not None:
                # d(lse - picked)/d logits = softmax - onehot, zero on ignored rows
                logits.sub_(lse[:, None]).exp_()
                logits.scatter_add_(1, target[:, None], -torch.ones_like(lse)[:, None])
                logits.mul_(mask[:, None])
                grad_hidden[start : start + chunk_tokens] = logits.to(h.dtype) @ weight
        ctx.save_for_backward(grad_hidden, count)
        return total / count

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, None, None, None]:
        grad_hidden, count = ctx.saved_tensors
        if grad_hidden is None:
            return None, None, None, None
        return grad_hidden * (grad_output / count).to(grad_hidden.dtype), None, None, None


def causal_lm_loss(hidden: Tensor, head_weight: Tensor, labels: Tensor, chunk_tokens: int = 2048) -> Tensor:
    """Mean next-token cross-entropy of ``hidden @ head_weight.T`` against ``labels``.

    Args:
        hidden: final hidden states, ``(batch, seq, dim)``.
        head_weight: the frozen output head, ``(vocab, dim)``.
        labels: token ids ``(batch, seq)``, ``-100`` where no loss is taken; shifted here (position
            ``t`` predicts ``labels[t + 1]``).
        chunk_tokens: tokens whose logits exist at once.

    Returns:
        The mean loss over labelled positions, float32. Only ``hidden`` receives a gradient: use it
        with a frozen head (the QLoRA setting); a trainable head needs the ordinary loss.
    """
    if head_weight.requires_grad:
        raise ValueError(
            "causal_lm_loss needs a frozen output head; compute the loss from logits to train it"
        )
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    labels = labels[:, 1:].reshape(-1)
    return _LinearCrossEntropy.apply(hidden, head_weight.to(hidden.dtype), labels, chunk_tokens)
