"""Run a model for statistics: eval mode, frozen parameters, gradients from the inputs.

Shared by :func:`starmerge.stats.collect.collect_statistics` (gradient statistics need each
hooked module's output gradient, but no parameter gradients) and
:func:`starmerge.stats.masks.train_masks`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


@contextmanager
def frozen_model(model: nn.Module, needs_grad: bool) -> Iterator[None]:
    """Eval mode and frozen parameters; with ``needs_grad``, gradients flow from the inputs.

    The inputs (and embedding outputs) become gradient leaves, so the backward pass reaches every
    hooked module's output while no parameter takes a gradient. Everything is restored on exit.
    """
    training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    handles = []
    model.eval()
    for p in flags:
        p.requires_grad_(False)
    if needs_grad:
        handles.append(model.register_forward_pre_hook(_inputs_need_grad, with_kwargs=True))
        for m in model.modules():
            if isinstance(m, nn.Embedding):
                handles.append(m.register_forward_hook(_output_needs_grad))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(training)


def _grad_leaf(value: Any) -> Any:
    if isinstance(value, Tensor) and value.is_floating_point() and torch.is_grad_enabled():
        return value.detach().requires_grad_()
    return value


def _inputs_need_grad(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return tuple(_grad_leaf(a) for a in args), {k: _grad_leaf(v) for k, v in kwargs.items()}


def _output_needs_grad(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    return _grad_leaf(output) if not output.requires_grad else output
