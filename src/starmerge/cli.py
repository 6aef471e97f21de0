"""The ``starmerge`` command line: merge, validate, extract, methods, demo, report.

User errors (``StarmergeError``) print one ``error: ...`` line on stderr and exit 2, with no
traceback unless ``--debug`` is given; the output directory is left as it was.

Each command imports what it runs inside its function: those modules import ``torch`` (and
``demo``/``eval`` more), which ``starmerge --help`` and every command's ``--help`` never need.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from starmerge.cli_sweep import reproduce, sweep
from starmerge.errors import StarmergeError
from starmerge.memory import prefer_huge_pages

DEBUG_ENV = "STARMERGE_DEBUG"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors.")
@click.version_option(package_name="starmerge")
def cli(debug: bool) -> None:
    """Merge fine-tuned models (LoRA adapters or full fine-tunes) into one multi-task model."""
    if debug:
        os.environ[DEBUG_ENV] = "1"


@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.argument("overrides", nargs=-1)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT_DIR.")
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda", "auto"]),
    default="cpu",
    show_default=True,
    help="Where the methods compute.",
)
@click.option("--dry-run", is_flag=True, help="Check and plan only; write nothing.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def merge(
    config: Path,
    out_dir: Path,
    overrides: tuple[str, ...],
    overwrite: bool,
    device: str,
    dry_run: bool,
    quiet: bool,
) -> None:
    """Merge the models of CONFIG into OUT_DIR (overrides: parameters.eta=20 ...).

    Relative paths in CONFIG and in the overrides start at CONFIG's directory.
    """
    from starmerge.engine import check_output, resolve_device, run_merge
    from starmerge.plan import check_config_and_inputs

    plan = check_config_and_inputs(config, list(overrides))
    check_output(plan, out_dir, overwrite=overwrite)
    resolve_device(device)
    if dry_run:
        _print_plan(plan)
        click.echo(f"dry run: nothing written to {out_dir}")
        return
    manifest = run_merge(plan, out_dir, overwrite=overwrite, device=device, progress=not quiet)
    click.echo(
        f"merged {len(plan.tasks)} models with {plan.method.name} into {out_dir} "
        f"({manifest['wall_time_s']:.1f} s, peak {manifest['peak_memory_bytes'] / 2**20:.0f} MiB)"
    )


@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.argument("overrides", nargs=-1)
def validate(config: Path, overrides: tuple[str, ...]) -> None:
    """Check CONFIG and its inputs (every error at once) and predict peak memory."""
    from starmerge.plan import check_config_and_inputs

    plan = check_config_and_inputs(config, list(overrides))
    _print_plan(plan)
    click.echo("ok")


def _print_plan(plan) -> None:
    cfg = plan.config
    click.echo(f"method: {plan.method.name} {json.dumps(plan.params, default=str)}")
    click.echo(f"models: {len(plan.tasks)} ({', '.join(t.spec.label for t in plan.tasks)})")
    click.echo(f"parameters merged: {len(plan.shapes)}")
    for label, keys in plan.missing.items():
        click.echo(f"  {label} lacks {len(keys)} of them (a zero delta for that task)")
    click.echo(f"output: {cfg.output.format}, dtype {str(plan.out_dtype).removeprefix('torch.')}")
    click.echo(f"space: {cfg.space}")
    click.echo(
        f"predicted peak memory: {plan.predicted_peak_bytes / 2**20:.1f} MiB "
        "(beyond the Python/torch runtime)"
    )


@cli.command(short_help="Extract a LoRA adapter from a full fine-tune (truncated SVD per module).")
@click.argument("paths", nargs=-1, metavar="[BASE FINETUNED] OUT_DIR")
@click.option("--base", help="The base model (instead of BASE).")
@click.option("--model", help="The full fine-tune (instead of FINETUNED).")
@click.option("--rank", type=int, help="The rank of every module's adapter.")
@click.option("--energy", type=float, help="Per module, keep this fraction of sum(s^2).")
@click.option("--max-rank", type=int, help="A cap on the rank that --energy chooses.")
@click.option("--target-modules", help="Comma-separated module names, e.g. q_proj,v_proj.")
@click.option("--modules-to-save", is_flag=True, help="Save changed norms, biases etc. whole.")
@click.option("--skip-non-matrix", is_flag=True, help="Leave them out (listed in starmerge.json).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT_DIR.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def extract(paths: tuple[str, ...], **flags: Any) -> None:
    """Write a PEFT LoRA adapter of FINETUNED - BASE into OUT_DIR (--rank R or --energy E).

    Each 2-D weight but the embeddings and LM head gets the truncated SVD of its change (see
    docs/extract.md). Also `extract --base BASE --model FINETUNED OUT_DIR`.
    """
    from starmerge.extract_write import extract_command

    click.echo(extract_command(paths, flags))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def methods(as_json: bool) -> None:
    """List the merge methods: parameters, defaults, data step, base weights, separability."""
    from starmerge.methods import METHODS
    from starmerge.methods.listing import describe, render

    rows = [describe(METHODS.get(name)) for name in METHODS.names()]
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    for row in rows:
        click.echo("\n".join(render(row)))


@cli.command()
@click.option("--full", is_flag=True, help="Also the STAR eta sweep and the number-of-tasks curve.")
@click.option("--fast", is_flag=True, help="A quick 3-task version (seconds; for checks).")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=Path("results/demo"),
    show_default=True,
)
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where trained adapters are cached (default: $STARMERGE_CACHE or ~/.cache/starmerge).",
)
@click.option("--tasks", default=None, help="Comma-separated task names.")
@click.option("--methods", "method_names", default=None, help="Comma-separated method names.")
@click.option(
    "--model",
    type=click.Choice(["minilm", "gemma-270m"]),
    default="minilm",
    show_default=True,
    help="minilm: encoder + heads (minutes); gemma-270m: the decoder tier (about 30 min).",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(
    full: bool,
    fast: bool,
    out_dir: Path,
    cache_dir: Path | None,
    tasks: str | None,
    method_names: str | None,
    model: str,
    quiet: bool,
) -> None:
    """Run the embedded benchmark: train a zoo of LoRAs offline, merge with every method."""
    from starmerge.demo import run as demo_mod

    presets = {
        "minilm": (demo_mod.DEFAULTS, demo_mod.FAST),
        "gemma-270m": (demo_mod.DECODER, demo_mod.DECODER_FAST),
    }
    preset = dict(presets[model][1] if fast else presets[model][0])
    if tasks:
        preset["tasks"] = [t.strip() for t in tasks.split(",") if t.strip()]
    if method_names:
        preset["methods"] = [m.strip() for m in method_names.split(",") if m.strip()]
    demo_mod.run_demo(**preset, full=full, out_dir=out_dir, cache_dir=cache_dir, progress=not quiet)


@cli.command(name="eval")
@click.argument("model")
@click.option(
    "--task",
    "tasks",
    multiple=True,
    required=True,
    help="A task file (.yaml) or built-in task name; repeat for several.",
)
@click.option("--adapter", default=None, help="A PEFT adapter to merge into MODEL first.")
@click.option("--name", default=None, help="Row name in the results (default: MODEL's name).")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=Path("results/eval"),
    show_default=True,
)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--chat-template", is_flag=True, help="Wrap prompts in the tokenizer's chat template."
)
def eval_command(
    model: str,
    tasks: tuple[str, ...],
    adapter: str | None,
    name: str | None,
    out_dir: Path,
    batch_size: int,
    seed: int,
    chat_template: bool,
) -> None:
    """Score MODEL (a HF model directory or hub id) on task files; write a results JSON."""
    from starmerge.eval.evaluate_model import evaluate_model
    from starmerge.report.tables import render_table

    results, path = evaluate_model(
        model,
        list(tasks),
        out_dir,
        adapter=adapter,
        name=name,
        batch_size=batch_size,
        seed=seed,
        chat_template=chat_template,
    )
    click.echo(render_table(results))
    click.echo(f"results: {path}")


@cli.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=Path("results/report"),
    show_default=True,
)
def report(results: tuple[Path, ...], out_dir: Path) -> None:
    """Render tables, plots and an HTML report from results JSON files."""
    from starmerge.report import report_from_files

    written = report_from_files(list(results), out_dir)
    for name, path in written.items():
        click.echo(f"{name}: {path}")


cli.add_command(reproduce)
cli.add_command(sweep)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning user errors into one line and exit code 2."""
    debug = os.environ.get(DEBUG_ENV) == "1" or "--debug" in (argv or sys.argv[1:])
    prefer_huge_pages()  # before any command imports torch (memory.py says why)
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        return 1
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()} (see --help)", err=True)
        return 2
    except StarmergeError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
