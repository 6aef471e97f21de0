"""Helpers shared by the benchmarks: machine info, results files, synthetic inputs, child processes.

Nothing here imports starmerge: the benchmarks drive the library through its CLI (as a user
would) or through ``starmerge.api``, and build their inputs with safetensors directly.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
WORK = BENCH / "work"  # git-ignored
RESULTS = BENCH / "results"
VENV_BIN = Path(sys.executable).parent
STARMERGE = str(VENV_BIN / "starmerge")
SEED_STAR = Path(os.environ.get("IBM_STAR_DIR", "/tmp/ibm_star")) / "merger" / "STAR.py"
PREFIX = "base_model.model."


# --------------------------------------------------------------------------- machine and results
def machine_info() -> dict:
    """Where and with what a result was measured."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[1]) * 1024
    except (OSError, TypeError):
        pass
    return {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_total_bytes": mem,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "starmerge": _version("starmerge"),
        "safetensors": _version("safetensors"),
        "git_head": _git_head(),
        "loadavg_at_start": load_average(),
    }


def load_average() -> list[float]:
    """The 1/5/15-minute load averages (other work on this machine inflates wall times)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _git_head() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def write_result(name: str, result: dict) -> Path:
    """Write ``benchmarks/results/<name>.json`` (machine info added at the top)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


# --------------------------------------------------------------------------- synthetic inputs
@dataclass(frozen=True)
class LoraSpec:
    """A synthetic PEFT LoRA adapter: ``modules`` maps a module path to ``(out, in)``."""

    modules: dict[str, tuple[int, int]]
    r: int = 16
    alpha: int = 32
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    base_model: str = "mistralai/Mistral-7B-Instruct-v0.2"
    b_std: float = 0.01  # trained LoRA B is small; A keeps PEFT's kaiming-like 1/sqrt(in) scale
    dtype: str = "float32"


def write_lora(path: Path, spec: LoraSpec, seed: int) -> None:
    """Write a PEFT adapter dir: Gaussian factors, ``lora_A`` (r, in), ``lora_B`` (out, r)."""
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, spec.dtype)
    tensors = {}
    for module, (out, inp) in spec.modules.items():
        a = torch.randn(spec.r, inp, generator=g) / math.sqrt(inp)
        b = torch.randn(out, spec.r, generator=g) * spec.b_std
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b.to(dtype).contiguous()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": spec.base_model,
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "target_modules": list(spec.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def attention_modules(n_layers: int, hidden: int, kv_out: int,
                      projs: Sequence[str] = ("q_proj", "k_proj", "v_proj")) -> dict:
    """``model.layers.{i}.self_attn.{q,k,v}_proj`` -> (out, in) for a Llama/Mistral layout."""
    outs = {"q_proj": hidden, "k_proj": kv_out, "v_proj": kv_out, "o_proj": hidden}
    return {f"model.layers.{i}.self_attn.{p}": (outs[p], hidden)
            for i in range(n_layers) for p in projs}


def cached(dir_: Path, spec: dict, build: Callable[[], None]) -> bool:
    """Build ``dir_`` unless its ``bench_spec.json`` already equals ``spec``; True if built."""
    stamp = dir_ / "bench_spec.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == spec:
        return False
    build()
    dir_.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(spec, indent=2))
    return True


def read_adapter(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """An adapter dir's config and tensors (loaded fully)."""
    from safetensors.torch import load_file

    config = json.loads((path / "adapter_config.json").read_text())
    return config, load_file(str(path / "adapter_model.safetensors"))


def _pattern_value(patterns: dict, module: str, default):
    # PEFT's rule: a pattern matches the whole module name or a suffix after a "."
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def adapter_delta(config: dict, tensors: dict, module: str, dtype=torch.float64) -> torch.Tensor:
    """Dense delta ``scale * B @ A`` of ``module``, honouring rank/alpha patterns and rsLoRA."""
    a = tensors[f"{PREFIX}{module}.lora_A.weight"].to(dtype)
    b = tensors[f"{PREFIX}{module}.lora_B.weight"].to(dtype)
    r = _pattern_value(config.get("rank_pattern"), module, config.get("r", 8))
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
    if a.shape[0] != r:
        raise ValueError(f"{module}: lora_A has {a.shape[0]} rows but the config says r={r}")
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    delta = (b @ a) * scale
    return delta.T if config.get("fan_in_fan_out") else delta


# --------------------------------------------------------------------------- the seed code
def load_seed_star() -> tuple[Callable, str]:
    """The seed code's ``star(matrix, eta, known_rank=None)``, imported from its checkout.

    When the checkout is absent, a re-statement of its two SVD calls is used instead (and said so).
    """
    if SEED_STAR.is_file():
        spec = importlib.util.spec_from_file_location("ibm_star_merger_STAR", SEED_STAR)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.star, f"imported from {SEED_STAR}"
    return _restated_seed_star, "RE-STATEMENT of the seed's two paths (checkout not found)"


def _restated_seed_star(matrix: torch.Tensor, eta: float, known_rank: int | None = None):
    """A re-statement (not the seed's code) of IBM/STAR ``merger/STAR.py star()``'s two paths.

    Dense: ``torch.linalg.svd(delta, full_matrices=False)``; low rank:
    ``torch.svd_lowrank(delta, q=r + 5)`` keeping the top r values; then the same truncation to
    the fewest components holding eta % of the nuclear norm, rescaled to keep that norm.
    """
    if known_rank is not None:
        u, s, v = torch.svd_lowrank(matrix, q=known_rank + 5)
        s, vt = s[:known_rank], v.T
    else:
        u, s, vt = torch.linalg.svd(matrix, full_matrices=False)
    total = s.sum()
    k = int(torch.searchsorted(s.cumsum(0), total * eta / 100).item()) + 1
    kept = s[:k] * (total / s[:k].sum())
    return u[:, :k] @ torch.diag_embed(kept) @ vt[:k]


# --------------------------------------------------------------------------- child processes
@dataclass
class ChildRun:
    """One child process: wall clock, CPU time, exit code, memory samples."""

    argv: list[str]
    returncode: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    ru_maxrss_bytes: int = 0
    peak_rss_anon_bytes: int = 0
    peak_rss_file_bytes: int = 0
    vm_hwm_bytes: int = 0
    samples: int = 0
    stdout: str = ""
    stderr: str = ""
    extra: dict = field(default_factory=dict)

    def brief(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("stdout", "stderr", "argv")}
        out["argv"] = " ".join(self.argv)
        if self.returncode:
            out["stderr_tail"] = self.stderr[-2000:]
        return out


def _status(pid: int) -> dict[str, int]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmHWM", "VmRSS") and value.strip():
            out[key] = int(value.split()[0]) * 1024
    return out


def run_child(argv: Sequence[str], *, poll_s: float | None = None, env: dict | None = None,
              cwd: Path | None = None) -> ChildRun:
    """Run ``argv``; wall clock, CPU time (user + sys) and, when ``poll_s``, memory every poll_s.

    RssAnon is sampled from ``/proc/<pid>/status`` (a spike shorter than ``poll_s`` can be
    missed); VmHWM is the kernel's exact peak of the whole RSS (anonymous + file-backed, so it
    includes mmap'ed safetensors pages); ru_maxrss comes from ``wait4``.
    """
    run = ChildRun([str(a) for a in argv])
    start = time.perf_counter()
    proc = subprocess.Popen(run.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd=cwd)
    # Drain pipes in threads so a chatty child never blocks on a full pipe.
    chunks: dict[str, list[bytes]] = {"out": [], "err": []}
    readers = [threading.Thread(target=lambda s=s, k=k: chunks[k].extend(iter(s.readline, b"")))
               for s, k in ((proc.stdout, "out"), (proc.stderr, "err"))]
    for t in readers:
        t.start()
    interval = poll_s if poll_s else 0.05
    while True:
        if poll_s:
            st = _status(proc.pid)
            if st:
                run.samples += 1
                run.peak_rss_anon_bytes = max(run.peak_rss_anon_bytes, st.get("RssAnon", 0))
                run.peak_rss_file_bytes = max(run.peak_rss_file_bytes, st.get("RssFile", 0))
                run.vm_hwm_bytes = max(run.vm_hwm_bytes, st.get("VmHWM", 0))
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(interval)
    run.wall_s = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    run.returncode = proc.returncode
    run.cpu_s = ru.ru_utime + ru.ru_stime
    run.ru_maxrss_bytes = ru.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    for t in readers:
        t.join()
    run.stdout = b"".join(chunks["out"]).decode(errors="replace")
    run.stderr = b"".join(chunks["err"]).decode(errors="replace")
    return run


def starmerge_merge(config: Path, out_dir: Path, *, poll_s: float | None = None,
                    extra: Sequence[str] = (), threads: int | None = None) -> ChildRun:
    """``starmerge merge CONFIG OUT --overwrite --quiet`` as a child process.

    ``threads`` sets OMP_NUM_THREADS/MKL_NUM_THREADS for the child (a diagnostic; the default
    leaves torch's own choice, 2 threads on a 2-core machine).
    """
    env = None
    if threads is not None:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return run_child([STARMERGE, "merge", str(config), str(out_dir), "--overwrite", "--quiet",
                      *extra], poll_s=poll_s, env=env)


def write_yaml(path: Path, cfg: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def manifest(out_dir: Path) -> dict:
    path = out_dir / "starmerge.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    """(wall s, process CPU s summed over threads, result) of ``fn()``."""
    c0, t0 = time.process_time(), time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, time.process_time() - c0, value


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


class ForeignLoad:
    """How many cores other processes used during a ``with`` block (from /proc/stat).

    This machine is shared: the busy CPU time of the whole machine minus this process's own
    (children included once reaped), per second of wall clock. 0 means the timing was quiet.
    """

    def __enter__(self) -> ForeignLoad:
        self._start = (_busy_s(), _own_s(), time.perf_counter())
        self.cores = None
        return self

    def __exit__(self, *exc: object) -> None:
        busy, own, wall = _busy_s(), _own_s(), time.perf_counter()
        b0, o0, w0 = self._start
        if busy is not None and b0 is not None and wall > w0:
            self.cores = round(max(0.0, (busy - b0) - (own - o0)) / (wall - w0), 2)


def _busy_s() -> float | None:
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def _own_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class BusyLoop:
    """One CPU-bound competing process (a Python busy loop) for the ``with`` block.

    The benchmarks time the loaded case themselves: a neighbour that keeps one core busy, as
    another job on a shared machine or CI runner does. Started on entry, killed on exit.
    """

    def __enter__(self) -> BusyLoop:
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)  # let it reach the scheduler before the timings start
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()
