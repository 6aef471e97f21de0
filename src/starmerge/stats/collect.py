"""Collect per-Linear statistics with forward/backward hooks, in bounded memory.

For each hooked ``nn.Linear`` (weight ``(out, in)``), with x its input rows and d = dL_n/dy the
gradient of example n's loss with respect to its output rows, over the rows a ``mask_fn`` keeps
(padding excluded):

- ``"<m>.weight::fisher"`` = (1/N) sum_n (sum_t d_nt x_nt^T)^2  and ``"<m>.bias::fisher"`` =
  (1/N) sum_n (sum_t d_nt)^2: the diagonal Fisher of the per-example gradient, N examples
  (empirical or "true" depending on the labels ``loss_fn`` uses);
- ``"<m>::gram_in"`` = (1/n_tok) sum_t x_t x_t^T (RegMean's Gram, K-FAC's A);
- ``"<m>::gram_out"`` = (1/n_tok) sum_t d_t d_t^T (K-FAC's G);
with n_tok the number of kept rows the module saw. ``loss_fn(model, batch)`` returns the
per-example losses ``(B,)`` (each an example's mean over its target tokens, in the HF wrappers);
their sum is back-propagated, so d is each example's own gradient.

Bounded memory ("layer by layer"): the modules are packed in order into groups whose accumulators
(plus one per-example gradient workspace) fit ``memory_budget`` bytes; the data is run once per
group, and each finished group is handed to ``sink`` (which writes it to disk) and freed. An
injectable :class:`ByteCounter` tracks the live accumulator bytes. Activations (batch x length x
width per hooked module) are not in the budget: bound them with the batch size.

Limitation: a module called twice in one forward pass gets two per-call Fisher contributions
instead of the square of their sum.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from starmerge.errors import StarmergeError
from starmerge.stats.frozen import frozen_model

KINDS = ("fisher", "gram_in", "gram_out")
GRAD_KINDS = frozenset({"fisher", "gram_out"})
LossFn = Callable[[nn.Module, Any], Tensor]
MaskFn = Callable[[Any, str], "Tensor | None"]


class ByteCounter:
    """Counts live accumulator bytes and their peak (injectable, for memory tests)."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def alloc(self, t: Tensor) -> Tensor:
        """Count ``t`` as live and return it."""
        self.live += t.numel() * t.element_size()
        self.peak = max(self.peak, self.live)
        return t

    def free(self, t: Tensor) -> None:
        """Stop counting ``t``."""
        self.live -= t.numel() * t.element_size()


def accumulator_bytes(module: nn.Module, kinds: Iterable[str]) -> tuple[int, int]:
    """Bytes of a Linear's float32 accumulators and of its per-example gradient workspace."""
    out, inp = module.weight.shape
    kinds = set(kinds)
    n = (out * inp + (out if module.bias is not None else 0)) if "fisher" in kinds else 0
    n += inp * inp if "gram_in" in kinds else 0
    n += out * out if "gram_out" in kinds else 0
    return 4 * n, (4 * out * inp if "fisher" in kinds else 0)


def plan_groups(
    model: nn.Module,
    modules: Sequence[str],
    kinds: Iterable[str],
    budget: int | None,
    budget_name: str = "memory_budget",
) -> list[list[str]]:
    """Pack ``modules`` in order into groups whose statistics fit ``budget`` bytes (None: one).

    Raises:
        StarmergeError: One module alone needs more than the budget (named ``budget_name``).
    """
    groups: list[list[str]] = []
    current: list[str] = []
    cost = work = 0
    for name in modules:
        acc, ws = accumulator_bytes(model.get_submodule(name), kinds)
        if budget is not None and acc + ws > budget:
            raise StarmergeError(
                f"statistics of {name} need {acc + ws} bytes but {budget_name} is {budget}; "
                f"raise {budget_name}"
            )
        if current and budget is not None and cost + acc + max(work, ws) > budget:
            groups.append(current)
            current, cost, work = [], 0, 0
        current.append(name)
        cost, work = cost + acc, max(work, ws)
    return groups + [current] if current else groups


class _Accumulator:
    """The hooks and running sums of one Linear module."""

    def __init__(self, name: str, module: nn.Module, kinds: set[str], counter: ByteCounter):
        out, inp = module.weight.shape
        dev = module.weight.device
        self.name, self.kinds, self.counter = name, kinds, counter
        self.sums: dict[str, Tensor] = {}
        if "fisher" in kinds:
            self.sums[f"{name}.weight::fisher"] = torch.zeros(out, inp, device=dev)
            if module.bias is not None:
                self.sums[f"{name}.bias::fisher"] = torch.zeros(out, device=dev)
        if "gram_in" in kinds:
            self.sums[f"{name}::gram_in"] = torch.zeros(inp, inp, device=dev)
        if "gram_out" in kinds:
            self.sums[f"{name}::gram_out"] = torch.zeros(out, out, device=dev)
        for t in self.sums.values():
            counter.alloc(t)
        self.tokens = 0
        self.batch: Any = None
        self.mask_fn: MaskFn | None = None

    def _rows(self, t: Tensor, keep: Tensor | None) -> Tensor:
        """``t`` as float32 rows ``(B * T, width)`` with dropped rows zeroed."""
        rows = t.detach().reshape(-1, t.shape[-1]).to(torch.float32)
        return rows if keep is None else rows * keep[:, None]

    def _keep(self, x: Tensor) -> Tensor | None:
        mask = self.mask_fn(self.batch, self.name) if self.mask_fn else None
        n_rows = x.numel() // x.shape[-1]
        if mask is None or mask.numel() != n_rows:
            return None
        return mask.reshape(-1).to(device=x.device, dtype=torch.float32)

    def forward_hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        """Accumulate the input Gram; arrange for the output gradient's statistics."""
        x = args[0]
        keep = self._keep(x)
        rows = self._rows(x, keep)  # (B * T, in)
        self.tokens += int(keep.sum()) if keep is not None else rows.shape[0]
        if "gram_in" in self.kinds:
            self.sums[f"{self.name}::gram_in"] += rows.T @ rows
        if self.kinds & GRAD_KINDS and output.requires_grad:
            n_ex = x.shape[0] if x.ndim > 1 else 1
            output.register_hook(
                lambda g: self._backward(g, rows.reshape(n_ex, -1, rows.shape[-1]), keep)
            )

    def _backward(self, grad: Tensor, x: Tensor, keep: Tensor | None) -> None:
        d = self._rows(grad, keep)  # (B * T, out)
        if "gram_out" in self.kinds:
            self.sums[f"{self.name}::gram_out"] += d.T @ d
        if "fisher" not in self.kinds:
            return
        d = d.reshape(x.shape[0], -1, d.shape[-1])  # (B, T, out)
        weight = self.sums[f"{self.name}.weight::fisher"]
        bias = self.sums.get(f"{self.name}.bias::fisher")
        for n in range(x.shape[0]):  # per-example gradient, one (out, in) workspace at a time
            g = self.counter.alloc(d[n].T @ x[n])
            weight += g.square()
            self.counter.free(g)
            del g
            if bias is not None:
                bias += d[n].sum(dim=0).square()

    def finish(self, n_examples: int) -> dict[str, Tensor]:
        """The normalised statistics (in place)."""
        for key, t in self.sums.items():  # Fisher: mean over examples; Grams: over kept tokens
            t /= max(n_examples if key.endswith("::fisher") else self.tokens, 1)
        return self.sums

    def release(self) -> None:
        """Stop counting (and drop) the sums."""
        for t in self.sums.values():
            self.counter.free(t)
        self.sums = {}


def collect_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossFn,
    modules: Sequence[str],
    kinds: Iterable[str],
    *,
    mask_fn: MaskFn | None = None,
    memory_budget: int | None = None,
    budget_name: str = "memory_budget",
    sink: Callable[[dict[str, Tensor]], None] | None = None,
    counter: ByteCounter | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Hook ``modules`` of ``model`` and accumulate ``kinds`` of statistics over ``batches``.

    Args:
        model: Any module; it is put in eval mode, its parameters frozen, then restored.
        batches: The batches (re-iterated once per module group).
        loss_fn: ``loss_fn(model, batch) -> (B,)`` per-example losses (the sum is differentiated).
        modules: Names of ``nn.Linear`` submodules, in the order to group them.
        kinds: A subset of ``fisher``, ``gram_in``, ``gram_out``.
        mask_fn: ``mask_fn(batch, module_name) -> (B, T)`` 0/1 rows to keep (None: keep all).
        memory_budget: Bytes the accumulators of one group may take (None: one group).
        budget_name: What errors call the budget (``data.memory_budget``, ``--stats-memory``).
        sink: Receives each finished group's statistics (then freed); None: all are returned.
        counter: Tracks live accumulator bytes (a fresh one when None).
        progress: Show a progress bar over groups.

    Returns:
        ``{"<m>.weight::fisher" | "<m>.bias::fisher" | "<m>::gram_in" | "<m>::gram_out": tensor}``
        (empty when ``sink`` took them).

    Example:
        >>> stats = collect_statistics(net, [x], lambda m, b: m(b).square().mean(-1),
        ...                            ["fc"], {"gram_in"})  # doctest: +SKIP
    """
    kinds = set(kinds)
    if not kinds <= set(KINDS) or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {sorted(kinds)}")
    batches = list(batches)
    counter = counter or ByteCounter()
    needs_grad = bool(kinds & GRAD_KINDS)
    results: dict[str, Tensor] = {}
    groups = plan_groups(model, modules, kinds, memory_budget, budget_name)
    with frozen_model(model, needs_grad):
        for group in tqdm(groups, desc="statistics", disable=not progress, unit="group"):
            accs = [_Accumulator(n, model.get_submodule(n), kinds, counter) for n in group]
            handles = [
                model.get_submodule(a.name).register_forward_hook(a.forward_hook) for a in accs
            ]
            try:
                n_examples = _run(model, batches, loss_fn, accs, mask_fn, needs_grad)
            finally:
                for h in handles:
                    h.remove()
            finished = {k: v for a in accs for k, v in a.finish(n_examples).items()}
            if sink is None:
                results.update(finished)
                continue
            sink(finished)
            del finished
            for a in accs:
                a.release()
    return results


def _run(
    model: nn.Module,
    batches: list[Any],
    loss_fn: LossFn,
    accs: list[_Accumulator],
    mask_fn: MaskFn | None,
    needs_grad: bool,
) -> int:
    """One pass over the data; returns the number of examples."""
    n_examples = 0
    for batch in batches:
        for acc in accs:
            acc.batch, acc.mask_fn = batch, mask_fn
        with torch.set_grad_enabled(needs_grad):
            losses = loss_fn(model, batch).reshape(-1)
            if needs_grad:
                if not losses.requires_grad:
                    raise StarmergeError("the loss does not depend on the model's inputs")
                losses.sum().backward()
        n_examples += losses.numel()
    return n_examples
