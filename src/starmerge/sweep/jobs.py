"""Jobs of a sweep, the options that change their results, and the key each result is stored under.

A job is one model evaluated on tasks: the ``base`` model on one task (lower bound), one task's
``individual`` model on its own task (upper bound), or a ``merge`` of a task set with a method and
its parameters, evaluated on every task of the set; a data-driven merge (statistics or trained
masks) also carries its :class:`DataOptions`. Its key hashes everything that defines the
result: the job, the suite's models and task files for those tasks (content, not paths), and the
:class:`RunOptions`. Device, batch size, executor and data location are :class:`Runtime` choices
and are left out on purpose: results do not depend on them. Nothing is ever keyed by position or
by a task order, so no result overwrites another and a re-run finds what is already done.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from starmerge.errors import ConfigError
from starmerge.methods import METHODS
from starmerge.schema import at_least, count, option, parse_section
from starmerge.suites import Suite

SCHEMA = 1
Kind = Literal["base", "individual", "merge"]


@dataclass(frozen=True)
class Job:
    """One evaluation: ``kind``, the task set (sorted), and for merges the method + parameters."""

    kind: Kind
    tasks: tuple[str, ...]
    method: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    data: Mapping[str, Any] | None = None  # DataOptions as a dict, for data-driven merges only

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the part of the key that is the job; ``data`` only when there is some)."""
        out = {
            "kind": self.kind,
            "tasks": list(self.tasks),
            "method": self.method,
            "params": dict(sorted(self.params.items())),
        }
        if self.data is not None:
            out["data"] = dict(sorted(self.data.items()))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Job:
        """Inverse of :meth:`to_dict`."""
        extra = data.get("data")
        params, extra = dict(data["params"]), None if extra is None else dict(extra)
        return cls(data["kind"], tuple(data["tasks"]), data.get("method"), params, extra)

    @property
    def label(self) -> str:
        """A short human name: ``star(eta=40) on 10 tasks``, ``individual mnli``."""
        if self.kind != "merge":
            return f"{self.kind} {self.tasks[0]}"
        params = ", ".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        data = f", {self.data['n_examples']} examples per task" if self.data else ""
        return f"{self.method}({params}) on {len(self.tasks)} tasks{data}"


@dataclass(frozen=True)
class DataOptions:
    """Task data of the data-driven merges (part of their job keys, and only theirs).

    Each task's examples come from its training rows as the suite declares them (``train:``),
    never from the evaluated rows; see :mod:`starmerge.suites.training`.

    Args:
        n_examples: Training examples drawn per task (seeded, uniform).
        seed: Sampling seed.
        batch_size: Examples per forward/backward pass while collecting.
        max_length: Tokens per example (the prompt is cut from the left).
    """

    n_examples: int = count(32, 1)
    seed: int = count(0, 0)
    batch_size: int = count(8, 1)
    max_length: int = count(512, 1)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None, where: str = "data") -> DataOptions:
        """Validate a ``data:`` mapping (every problem at once).

        Raises:
            ConfigError: Unknown keys, or values that are not positive integers (seed: >= 0).
        """
        problems: list[str] = []
        options = parse_section(cls, dict(data or {}), where, problems)
        if problems:
            raise ConfigError(problems)
        return options


@dataclass(frozen=True)
class RunOptions:
    """Options that change results (part of every job key).

    Args:
        dtype: The base model's dtype for evaluation (``float32``, ``bfloat16``, ``float16``);
            None: the suite's default.
        full_keys: Task vectors of full checkpoints on ``qv`` (the seed's q/v weights) or on
            every ``changed`` parameter.
        limit: Evaluate at most this many examples per task (quick runs); None: the suite's
            sample sizes.
    """

    dtype: str | None = None
    full_keys: str = "qv"
    limit: int | None = option(None, check=at_least(1), expect="an integer >= 1")

    def resolved(self, suite: Suite) -> RunOptions:
        """These options with the suite's defaults filled in."""
        return RunOptions(self.dtype or suite.dtype, self.full_keys, self.limit)


@dataclass(frozen=True)
class Runtime:
    """How jobs run (not part of any key).

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` for the model and the merges.
        batch_size: Evaluation batch size; None: the suite's.
        data_dir: A local mirror of the hub datasets (see ``starmerge.suites.data``).
        progress: Print one line per finished job.
        stats_dir: The statistics cache of the data-driven methods (None: ``$STARMERGE_CACHE/stats``
            or ``~/.cache/starmerge/stats``); entries are keyed by what changes them.
        stats_memory: Bytes the statistics accumulators may take at once (``data.memory_budget``).
    """

    device: str = "auto"
    batch_size: int | None = None
    data_dir: str | None = None
    progress: bool = True
    stats_dir: str | None = None
    stats_memory: str = "4GB"


def bound_jobs(tasks: Iterable[str]) -> list[Job]:
    """The lower (``base``) and upper (``individual``) bound job of every task."""
    tasks = list(tasks)
    return [Job("base", (t,)) for t in tasks] + [Job("individual", (t,)) for t in tasks]


def merge_job(
    method: str,
    params: Mapping[str, Any],
    tasks: Iterable[str],
    data: DataOptions | None = None,
) -> Job:
    """A merge job with the method's parameters validated and defaults filled in.

    A method that needs task data with these parameters (its ``data(params)``) gets ``data``
    (default :class:`DataOptions`); any other job gets none, so its key does not change.

    Raises:
        ConfigError: Unknown method or parameters, ``statistics`` given (they are collected
            from the suite's training data), or fewer than two tasks.
    """
    tasks = tuple(sorted(set(tasks)))
    if len(tasks) < 2:
        raise ConfigError([f"a merge needs at least two tasks, got {list(tasks)}"])
    spec = METHODS.get(method)
    if params.get("statistics") is not None:
        raise ConfigError(
            [
                f"{method}: statistics are collected from the suite's training data in sweeps; "
                "remove the statistics parameter"
            ]
        )
    resolved = spec.resolve(dict(params))
    for name, value in resolved.items():  # eta: 40 and eta: 40.0 are one job (and one key)
        if isinstance(spec.all_params[name].default, float) and type(value) is int:
            resolved[name] = float(value)
    resolved.pop("statistics", None)
    needs = spec.data is not None and spec.data(resolved) is not None
    return Job("merge", tasks, method, resolved, asdict(data or DataOptions()) if needs else None)


def job_key(suite: Suite, job: Job, options: RunOptions) -> str:
    """20 hex digits of sha256 over the job, its tasks' models and files, and the options."""
    opts = options.resolved(suite)
    fingerprint = suite.fingerprint(job.tasks)
    blob = {"schema": SCHEMA, "job": job.to_dict(), "suite": fingerprint, "options": asdict(opts)}
    text = json.dumps(blob, sort_keys=True, default=str).encode()
    return hashlib.sha256(text).hexdigest()[:20]
