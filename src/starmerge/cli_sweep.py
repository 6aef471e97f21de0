"""``starmerge reproduce`` and ``starmerge sweep`` (registered in ``cli.py`` with ``add_command``).

Both run merge + evaluation jobs over a suite into a results directory that they resume from;
``--executor ray`` runs the same jobs as Ray tasks; ``--dry-run`` lists the jobs, the models and
datasets they need, and the predicted memory and download size, without downloading anything.

The sweep machinery (``torch``, the suites, Ray) is imported inside the functions that run it,
so that ``starmerge --help`` and these commands' ``--help`` start without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from starmerge.errors import ConfigError, short_repr
from starmerge.yaml_io import parse_yaml


def _split(values: tuple[str, ...]) -> list[str]:
    """``--tasks a,b --tasks c`` -> ``[a, b, c]``."""
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _params(values: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``--param star.eta=20`` -> ``{"star": {"eta": 20}}`` (values parsed as YAML)."""
    out: dict[str, dict[str, Any]] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot or not method or not name:
            raise ConfigError([f"--param must look like method.name=value, got {short_repr(item)}"])
        value = parse_yaml(raw, f"the value of --param {short_repr(item)}")
        out.setdefault(method.strip(), {})[name.strip()] = value
    return out


def _common(fn: Any) -> Any:
    """Options shared by both commands (runtime and executor)."""
    options = [
        click.option(
            "--out",
            "out_dir",
            type=click.Path(path_type=Path),
            default=None,
            help="Results directory (resumed when it exists).",
        ),
        click.option(
            "--executor",
            type=click.Choice(["local", "ray"]),
            default="local",
            show_default=True,
            help="local: one process; ray: one Ray task per job.",
        ),
        click.option("--address", default=None, help="Ray cluster address (e.g. auto)."),
        click.option(
            "--gpus-per-job",
            type=float,
            default=None,
            help="Ray: GPUs declared per job (default: 1 if the cluster has GPUs).",
        ),
        click.option(
            "--device",
            default="auto",
            show_default=True,
            help="auto, cpu, cuda or cuda:N: where models run and merges compute.",
        ),
        click.option(
            "--batch-size",
            type=int,
            default=None,
            help="Evaluation batch size (default: the suite's; scores do not depend on it).",
        ),
        click.option(
            "--data-dir",
            type=click.Path(path_type=Path),
            default=None,
            help="Local mirror of the hub datasets: DIR/<hub id>/<config|default>/<split>.jsonl",
        ),
        click.option(
            "--stats-dir",
            type=click.Path(path_type=Path),
            default=None,
            help="Statistics cache of the data-driven methods (default: "
            "$STARMERGE_CACHE/stats or ~/.cache/starmerge/stats).",
        ),
        click.option(
            "--stats-memory",
            default="4GB",
            show_default=True,
            help="Memory the statistics accumulators may take at once (on the device); "
            "layers are collected in groups that fit.",
        ),
        click.option(
            "--dry-run",
            is_flag=True,
            help="List jobs, models, datasets, predicted memory and downloads; run nothing.",
        ),
        click.option("--quiet", is_flag=True, help="No per-job progress lines."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _runtime(
    device: str,
    batch_size: int | None,
    data_dir: Path | None,
    stats_dir: Path | None,
    stats_memory: str,
    quiet: bool,
) -> Any:
    from starmerge.io.output_dir import parse_size
    from starmerge.sweep.jobs import Runtime

    parse_size(stats_memory)  # a bad size fails here, before any job
    return Runtime(
        device=device,
        batch_size=batch_size,
        data_dir=str(data_dir) if data_dir else None,
        progress=not quiet,
        stats_dir=str(stats_dir) if stats_dir else None,
        stats_memory=stats_memory,
    )


def _data(values: tuple[str, ...]) -> Any:
    """``--data n_examples=64`` -> ``DataOptions(n_examples=64)`` (values parsed as YAML)."""
    from starmerge.sweep.jobs import DataOptions

    out: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError([f"--data must look like name=value, got {short_repr(item)}"])
        out[key.strip()] = parse_yaml(raw, f"the value of --data {short_repr(item)}")
    return DataOptions.from_mapping(out)


@click.command()
@click.argument("suite")
@click.option(
    "--tasks",
    multiple=True,
    help="Task set to merge (comma-separated or repeated); default: every seed table's task set.",
)
@click.option(
    "--methods",
    multiple=True,
    help="Methods (comma-separated or repeated); default: "
    "simple_average, ties, tall_masks, metagpt, star.",
)
@click.option("--param", "params", multiple=True, help="A method parameter: star.eta=20.")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default=None,
    help="Model dtype for evaluation (default: the suite's, float32 as the seed).",
)
@click.option(
    "--full-keys",
    type=click.Choice(["qv", "changed"]),
    default="qv",
    show_default=True,
    help="Full checkpoints: task vector on the q/v weights (seed) or all changed ones.",
)
@click.option("--limit", type=int, default=None, help="At most N examples per task (quick runs).")
@click.option(
    "--data",
    "data",
    multiple=True,
    help="Training data of the data-driven methods: "
    "n_examples=32, seed=0, batch_size=8, max_length=512.",
)
@_common
def reproduce(
    suite: str,
    tasks: tuple[str, ...],
    methods: tuple[str, ...],
    params: tuple[str, ...],
    dtype: str | None,
    full_keys: str,
    limit: int | None,
    data: tuple[str, ...],
    out_dir: Path | None,
    executor: str,
    address: str | None,
    gpus_per_job: float | None,
    device: str,
    batch_size: int | None,
    data_dir: Path | None,
    stats_dir: Path | None,
    stats_memory: str,
    dry_run: bool,
    quiet: bool,
) -> None:
    """Reproduce a STAR paper table: base, individual, and each method.

    SUITE: flan-t5-large, llama-3.2-3b-instruct, mistral-7b-instruct, or a suite file.
    """
    from starmerge.reproduce import DEFAULT_METHODS
    from starmerge.reproduce import reproduce as run
    from starmerge.sweep.jobs import RunOptions

    name = Path(suite).stem if suite.endswith((".yaml", ".yml")) else suite
    run(
        suite,
        out_dir or Path("results/reproduce") / name,
        tasks=_split(tasks) or None,
        methods=_split(methods) or list(DEFAULT_METHODS),
        params=_params(params),
        options=RunOptions(dtype=dtype, full_keys=full_keys, limit=limit),
        data=_data(data),
        runtime=_runtime(device, batch_size, data_dir, stats_dir, stats_memory, quiet),
        executor=executor,
        address=address,
        gpus_per_job=gpus_per_job,
        dry_run=dry_run,
        echo=click.echo,
    )


@click.command()
@click.argument("sweep_file", type=click.Path(path_type=Path))
@_common
def sweep(
    sweep_file: Path,
    out_dir: Path | None,
    executor: str,
    address: str | None,
    gpus_per_job: float | None,
    device: str,
    batch_size: int | None,
    data_dir: Path | None,
    stats_dir: Path | None,
    stats_memory: str,
    dry_run: bool,
    quiet: bool,
) -> None:
    """Run SWEEP_FILE: methods x parameters x task subsets, each a merge plus an evaluation."""
    from starmerge.sweep import load_sweep, run_sweep

    run_sweep(
        load_sweep(sweep_file),
        out_dir or Path("results/sweep") / sweep_file.stem,
        _runtime(device, batch_size, data_dir, stats_dir, stats_memory, quiet),
        executor=executor,
        address=address,
        gpus_per_job=gpus_per_job,
        dry_run=dry_run,
        echo=click.echo,
    )
