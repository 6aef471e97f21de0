"""Sweeps: many merge + evaluation jobs over a suite, resumable, locally or on a Ray cluster.

Example:
    >>> from starmerge.sweep import Runtime, load_sweep, run_sweep
    >>> outcome = run_sweep(load_sweep("sweep.yaml"), "results/sweep", Runtime())  # doctest: +SKIP
"""

from starmerge.sweep.config import Sweep, load_sweep, random_subsets, sweep_from_dict
from starmerge.sweep.jobs import (
    DataOptions,
    Job,
    RunOptions,
    Runtime,
    bound_jobs,
    job_key,
    merge_job,
)
from starmerge.sweep.run import Outcome, execute, run_sweep, write_results
from starmerge.sweep.store import ResultsStore

__all__ = [
    "DataOptions",
    "Job",
    "Outcome",
    "ResultsStore",
    "RunOptions",
    "Runtime",
    "Sweep",
    "bound_jobs",
    "execute",
    "job_key",
    "load_sweep",
    "merge_job",
    "random_subsets",
    "run_sweep",
    "sweep_from_dict",
    "write_results",
]
