"""Localize-and-Stitch mask training ("data-driven localization"), model-agnostic.

For one task with task vector tau over the parameter set P (a dict key -> tensor of ``model``'s
parameters), from the code (``localize_utils.Localizer``) and the paper:

1. S = +b on the top-``sparsity`` entries of |tau| (one global top-k over P), -b elsewhere;
2. ``steps`` times: set theta = theta_0 + sigmoid(S) * tau; over the batches, g = mean_b
   dL_b/dtheta * tau; reset theta_0; then
     ``paper``:     S <- S - (lr * g + l1) * sigmoid'(S)
                    (gradient descent with step lr on L + (l1 / lr) * ||sigmoid(S)||_1: the L1
                    strength is not multiplied by lr, as in the code's commented-out line);
     ``reference``: S <- S - lr * g * sigmoid'(S) + l1 * sign(S) * sigmoid'(S)
                    (the released code's active line: descent on L - l1 * sum|sigmoid(S) - 1/2|,
                    which pushes logits away from 0 rather than toward sparsity);
3. gamma = 1[S > 0] (= round(sigmoid(S))).

Memory: theta_0, tau, S and the gradient of every entry of P (4 x |P| floats) plus the model; the
masks are not streamed (the whole-model forward needs every entry at once).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from starmerge.stats.collect import LossFn
from starmerge.stats.frozen import frozen_model
from starmerge.tensors.sparsify import keep_count, kth_largest_abs


@dataclass(frozen=True)
class MaskTraining:
    """Trained masks and the soft-mask loss before each step (for logging and tests)."""

    masks: dict[str, Tensor]
    losses: list[float]


def initial_logits(
    taus: Mapping[str, Tensor], sparsity: float, sigmoid_bias: float
) -> dict[str, Tensor]:
    """S = +b on the global top-k of |tau| (k = floor(sparsity * N)), -b elsewhere."""
    n = sum(t.numel() for t in taus.values())
    threshold = kth_largest_abs(taus.values(), keep_count(sparsity, n))
    out = {}
    for key, tau in taus.items():
        tau = tau.to(torch.float32)
        on = (tau.abs() >= threshold) & (tau != 0) if threshold is not None else tau != tau
        out[key] = torch.where(on, sigmoid_bias, -sigmoid_bias)
    return out


def train_masks(
    model: nn.Module,
    taus: Mapping[str, Tensor],
    batches: Iterable[Any],
    loss_fn: LossFn,
    *,
    sparsity: float,
    steps: int = 10,
    lr: float = 1e7,
    l1: float = 10.0,
    regularizer: Literal["paper", "reference"] = "paper",
    sigmoid_bias: float = 5.0,
) -> MaskTraining:
    """Train one task's Localize-and-Stitch masks on ``batches``.

    Args:
        model: The pretrained model (theta_0); its parameters ``taus`` names are changed during
            training and restored exactly.
        taus: Parameter name (``model.get_parameter``) -> task vector, the parameter set P.
        batches: The few-shot batches.
        loss_fn: ``loss_fn(model, batch) -> (B,)`` per-example losses.
        sparsity: Fraction of P in the initial top-k mask.
        steps: Mask update steps (one pass over ``batches`` each).
        lr: Learning rate of the mask logits.
        l1: L1 strength.
        regularizer: ``paper`` or ``reference`` (see the module docstring).
        sigmoid_bias: b, the initial logit magnitude.

    Returns:
        Boolean masks per parameter and the loss of the soft mask before each step.

    Example:
        >>> out = train_masks(net, {"fc.weight": tau}, data, loss, sparsity=0.05)  # doctest: +SKIP
    """
    batches = list(batches)
    params = {k: model.get_parameter(k) for k in taus}
    theta0 = {k: p.detach().clone() for k, p in params.items()}
    taus = {k: t.to(device=params[k].device, dtype=torch.float32) for k, t in taus.items()}
    logits = initial_logits(taus, sparsity, sigmoid_bias)
    losses: list[float] = []
    with frozen_model(model, needs_grad=False):
        try:
            for _ in range(steps):
                grads, loss = _soft_mask_gradient(
                    model, params, theta0, taus, logits, batches, loss_fn
                )
                losses.append(loss)
                for k, s in logits.items():
                    sig = torch.sigmoid(s)
                    dsig = sig * (1 - sig)
                    if regularizer == "paper":
                        s -= (lr * grads[k] + l1) * dsig
                    else:
                        s += -lr * grads[k] * dsig + l1 * torch.sign(s) * dsig
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(theta0[k])
                    p.grad = None
    return MaskTraining({k: s > 0 for k, s in logits.items()}, losses)


def _soft_mask_gradient(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    theta0: Mapping[str, Tensor],
    taus: Mapping[str, Tensor],
    logits: Mapping[str, Tensor],
    batches: list[Any],
    loss_fn: LossFn,
) -> tuple[dict[str, Tensor], float]:
    """Mean over batches of dL_b/dtheta * tau at theta_0 + sigmoid(S) * tau, and the mean loss."""
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(theta0[k] + torch.sigmoid(logits[k]) * taus[k])
            p.requires_grad_(True)
            p.grad = None
    total = 0.0
    for batch in batches:
        loss = loss_fn(model, batch).mean()
        loss.backward()  # gradients of the per-batch mean losses add up in p.grad
        total += float(loss.detach())
    grads = {
        k: (torch.zeros_like(taus[k]) if p.grad is None else p.grad.to(torch.float32) * taus[k])
        / len(batches)
        for k, p in params.items()
    }
    with torch.no_grad():
        for k, p in params.items():
            p.requires_grad_(False)
            p.copy_(theta0[k])
            p.grad = None
    return grads, total / len(batches)
