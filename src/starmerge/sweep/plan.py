"""``--dry-run``: the jobs, the models and datasets they need, predicted memory and downloads.

Nothing is downloaded or loaded: hub inputs are sized from the suite's ``info`` (published file
sizes, stated as estimates); local inputs from their files and safetensors headers.

Memory model (per worker):
- device: the base model's weights in the run dtype, plus the generation cache
  (batch x 1024 tokens x layers x 2 x kv width x dtype bytes);
- CPU: the saved originals of the adapted weights (restored after each job), the cached task
  vectors (adapter factors in float32; full-checkpoint deltas dense float32), one dense merged
  delta of the adapted weights (methods with elementwise steps), and the base model's weights
  while they are loaded (transient).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from starmerge.io.adapter import load_adapter
from starmerge.io.checkpoint import TensorIndex
from starmerge.suites import Suite
from starmerge.suites.training import train_spec
from starmerge.sweep.jobs import Job, RunOptions, Runtime

GiB = 2**30
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# tokens assumed per sequence for the generation cache: prompt + answer (seq2seq: the encoder
# states the decoder's cross-attention caches, at most the usual 512-token input)
_SEQ = {"causal": 1024, "seq2seq": 512}


def _dir_bytes(path: Path) -> int:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files)


def _local_params(path: Path) -> int | None:
    try:
        idx = TensorIndex.open(path)
    except Exception:  # not a checkpoint we can index: no estimate
        return None
    total = 0
    for key in idx.keys():
        if idx.dtype(key).is_floating_point:
            n = 1
            for s in idx.shape(key):
                n *= s
            total += n
    return total


def _adapted_params(suite: Suite, tasks: Sequence[str]) -> int | None:
    """Entries of the weights the task models change (local adapters: from their headers)."""
    if suite.info.get("adapted_params"):
        return int(suite.info["adapted_params"])
    keys: dict[str, int] = {}
    for t in tasks:
        task = suite.task(t)
        if task.adapter and Path(task.adapter).is_dir():
            for key, (m, n) in load_adapter(task.adapter).shapes().items():
                keys[key] = m * n
    return sum(keys.values()) or None


def estimate(suite: Suite, tasks: Sequence[str], options: RunOptions, runtime: Runtime) -> dict:
    """Predicted bytes: ``device``, ``cpu`` and ``download`` (each with its parts)."""
    opts = options.resolved(suite)
    width = _BYTES.get(str(opts.dtype), 4)
    info, base_local = suite.info, Path(suite.base_model).exists()
    params = _local_params(Path(suite.base_model)) if base_local else info.get("params")
    adapted = _adapted_params(suite, tasks) or 0
    batch = runtime.batch_size or suite.batch_size
    layers, kv = info.get("layers", 0), info.get("kv_dim", info.get("hidden", 0))
    device = {
        "weights": (params or 0) * width,
        "generation cache": batch * _SEQ[suite.model_class] * layers * 2 * kv * width,
    }
    cache = 0
    download = {"base model": 0.0, "adapters": 0.0, "full checkpoints": 0.0, "datasets": 0.0}
    if not base_local:
        download["base model"] = info.get("download_gb", 0) * 1e9
    for t in tasks:
        task = suite.task(t)
        local = Path(task.source).exists()
        size = _dir_bytes(Path(task.source)) if local else 0
        if task.adapter:
            cache += size if local else info.get("adapter_mb", 0) * 1e6
            download["adapters"] += 0 if local else info.get("adapter_mb", 0) * 1e6
        else:
            full = adapted if opts.full_keys == "qv" else (params or 0)
            cache += full * 4
            download["full checkpoints"] += 0 if local else info.get("model_gb", 0) * 1e9
        download["datasets"] += 0 if runtime.data_dir else (task.data_mb or 0) * 1e6
    cpu = {
        "saved weights": adapted * width,
        "task vectors": cache,
        "merged delta": adapted * 4,
        "weights while loading": (params or 0) * width,
    }
    return {"device": device, "cpu": cpu, "download": download, "params": params}


def _gib(parts: dict[str, float]) -> str:
    inner = ", ".join(f"{k} {v / GiB:.1f} GiB" for k, v in parts.items() if v)
    return f"{sum(parts.values()) / GiB:.1f} GiB ({inner or 'unknown'})"


def _training_lines(suite: Suite, jobs: Sequence[tuple[str, Job]]) -> list[str]:
    """Where the data-driven merges draw each task's training examples (nothing is loaded)."""
    data = [job.data for _, job in jobs if job.data is not None]
    if not data:
        return []
    tasks = sorted(
        {t for _, job in jobs if job.data is not None for t in job.tasks},
        key=list(suite.tasks).index,
    )
    sizes = sorted({d["n_examples"] for d in data})
    n = "/".join(map(str, sizes))
    lines = [
        f"training data of the data-driven merges ({len(tasks)} tasks, {n} examples per "
        "task, never the evaluated rows):"
    ]
    for t in tasks:
        task = suite.task(t)
        if task.train is None:
            lines.append(f"  {t}: none declared (add `train:` to the suite file)")
            continue
        spec = train_spec(task.spec(), task.train)
        src, transform = spec.source, spec.metadata.get("transform")
        where = f"{src.path}" + (f" ({src.config})" if src.config else "") + f" [{src.split}]"
        lines.append(f"  {t}: {where}" + (f", transform {transform}" if transform else ""))
    return lines


def describe(
    suite: Suite,
    jobs: Sequence[tuple[str, Job]],
    done: set[str],
    options: RunOptions,
    runtime: Runtime,
) -> str:
    """The dry-run report (plain text)."""
    opts = options.resolved(suite)
    kinds = Counter(job.kind for _, job in jobs)
    todo = [k for k, _ in jobs if k not in done]
    lines = [
        f"suite {suite.name}: {suite.base_model} ({suite.model_class}, {opts.dtype})",
        f"jobs: {len(jobs)} ({', '.join(f'{n} {k}' for k, n in kinds.items())}); "
        f"{len(jobs) - len(todo)} done, {len(todo)} to run",
    ]
    lines += [f"  [{'done' if key in done else 'todo'}] {key}  {job.label}" for key, job in jobs]
    tasks = sorted({t for _, job in jobs for t in job.tasks}, key=list(suite.tasks).index)
    lines.append(f"models ({1 + len(tasks)}):")
    lines.append(f"  base: {suite.base_model}")
    for t in tasks:
        task = suite.task(t)
        what = "adapter" if task.adapter else f"full checkpoint ({opts.full_keys} keys)"
        lines.append(f"  {t}: {what} {task.source}")
    lines.append(f"datasets ({len(tasks)}):")
    for t in tasks:
        src, s = suite.task(t).spec().source, suite.task(t).spec().sampling
        where = f"{src.path}" + (f" ({src.config})" if src.config else "") + f" [{src.split}]"
        size = "all rows" if s.n is None else f"n={s.n}{' balanced' if s.balance else ''}"
        lines.append(f"  {t}: {where}, {size}" + (f", limit {opts.limit}" if opts.limit else ""))
    lines += _training_lines(suite, jobs)
    est = estimate(suite, tasks, options, runtime)
    lines.append(f"predicted memory (estimate), device: {_gib(est['device'])}")
    lines.append(f"predicted memory (estimate), CPU: {_gib(est['cpu'])}")
    total = sum(est["download"].values()) / 1e9
    parts = ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in est["download"].items() if v)
    lines.append(
        f"predicted download (estimate): {total:.2f} GB ({parts or 'everything is local'})"
    )
    lines.append("dry run: nothing was downloaded, loaded or run")
    return "\n".join(lines)
