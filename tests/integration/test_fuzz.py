"""Seeded fuzz of ``starmerge merge``: mutated configs, adapter configs and safetensors files.

The property, for every case: exit 0 with a finite, loadable output, or exit 2 with exactly one
stderr line beginning ``error: ``; never a traceback, a hang, a non-finite tensor written, a
changed input, a half-written or changed OUT_DIR, or a temporary directory left next to it.
Cases come from ``fuzz_cases.make_case`` (seeded by ``STARMERGE_FUZZ_SEED`` and the case index);
a failure prints the mutations and the command that rebuilds it. ``make test`` runs ``FAST``
cases in-process and two in real processes (one a YAML alias bomb); ``make test-slow`` runs
``SLOW`` more and 60 more processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tests.integration.fuzz_cases import Case, build_pristine, make_case
from tests.integration.fuzz_files import alias_bomb
from tests.integration.helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

SEED = int(os.environ.get("STARMERGE_FUZZ_SEED", "1010"))
FAST, SLOW = 150, 1500
CASE_TIMEOUT_S = 20  # a tiny merge takes well under a second; longer is a hang
SUBPROCESS_TIMEOUT_S = 60


class CaseTimeout(BaseException):
    """Raised by the alarm; a BaseException so that no ``except Exception`` swallows it."""


@pytest.fixture(scope="module")
def pristine(tiny_models, llama_adapters, tmp_path_factory) -> Path:
    """The inputs every case starts from (each case mutates its own copy)."""
    root = tmp_path_factory.mktemp("fuzz_pristine")
    return build_pristine(root, tiny_models["llama"], llama_adapters)


def tree(path: Path) -> dict[str, str]:
    """Every entry under ``path`` (not following links): file sha256, link target or ``dir``."""
    if path.is_symlink() or path.is_file():
        return {".": _entry(path)}
    found = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = Path(root) / name
            found[str(p.relative_to(path))] = _entry(p)
    return found


def _entry(p: Path) -> str:
    if p.is_symlink():
        return "link:" + os.readlink(p)
    return "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()


def _snapshot(case: Case) -> dict:
    out = case.out
    exists = os.path.lexists(out)  # False, not an error, for a name too long to exist
    return {
        "inputs": {str(p): tree(p) for p in case.protected},
        "out_existed": exists,
        "out": tree(out) if exists else None,
        "siblings": sorted(os.listdir(out.parent)) if out.parent.is_dir() else None,
    }


def run_in_process(capsys, argv: list[str]) -> tuple[int | None, str, str]:
    """(exit code, stderr, what escaped main) with the per-case alarm armed."""

    def alarm(signum, frame):
        raise CaseTimeout()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(CASE_TIMEOUT_S)
    try:
        code, _, err = run_cli(capsys, *argv)
        return code, err, ""
    except CaseTimeout:
        return None, capsys.readouterr().err, f"hang: still running after {CASE_TIMEOUT_S} s"
    except BaseException as exc:  # noqa: BLE001 - any escape from main is a traceback
        return None, capsys.readouterr().err, f"traceback: {type(exc).__name__}: {_clip(str(exc))}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_subprocess(argv: list[str]) -> tuple[int | None, str, str]:
    """(exit code, stderr, problem) of the real console entry, memory- and time-bounded."""

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "starmerge", *argv],
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT_S,
            preexec_fn=limit_memory,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return None, "", f"hang: still running after {SUBPROCESS_TIMEOUT_S} s"
    problem = "traceback on stderr" if "Traceback" in proc.stderr else ""
    return proc.returncode, proc.stderr, problem


def violations(case: Case, before: dict, code: int | None, err: str, problem: str) -> list[str]:
    """What broke the property in this run (empty when it held)."""
    found = [problem] if problem else []
    if code not in (0, 2, None):
        found.append(f"exit code {code}")
    lines = err.strip().splitlines()
    if code == 2 and (len(lines) != 1 or not lines[0].startswith("error: ")):
        found.append(f"stderr is not one `error:` line: {err[:300]!r}")
    if "Traceback" in err:
        found.append("traceback on stderr")
    if case.canary.exists():
        found.append("a !!python tag ran code")
    wrote = code == 0 and case.argv[0] == "merge" and "--dry-run" not in case.argv
    after = _snapshot(case)
    if wrote and any(_overlap(case.out, p) for p in case.protected):
        found.append("merged into an input, a folder holding inputs or a folder inside one")
    changed = [p for p, t in before["inputs"].items() if after["inputs"][p] != t]
    if changed:
        found.append(f"inputs changed: {changed}")
    if not wrote and (after["out_existed"], after["out"]) != (before["out_existed"], before["out"]):
        found.append("OUT_DIR changed although nothing was merged")
    siblings = set(after["siblings"] or ()) - set(before["siblings"] or ()) - {case.out.name}
    if siblings:
        found.append(f"left next to OUT_DIR: {sorted(siblings)}")
    if wrote and not found:
        found += check_output(case.out, case.inputs / "base" / "model.safetensors")
    return found


def _overlap(out: Path, source: Path) -> bool:
    out, source = out.resolve(), source.resolve()
    return out.is_relative_to(source) or source.is_relative_to(out)


def check_output(out: Path, base_file: Path) -> list[str]:
    """A written output loads with safetensors, has only finite tensors and the base's shapes."""
    if not out.is_dir() or not (out / "starmerge.json").is_file():
        return [f"exit 0 but no merged output in {out}"]
    files: dict[str, dict[str, torch.Tensor]] = {}  # file name -> its tensors
    try:
        for f in sorted(out.glob("*.safetensors")):
            with safe_open(f, framework="pt") as reader:
                files[f.name] = {k: reader.get_tensor(k) for k in reader.keys()}
        json.loads((out / "starmerge.json").read_text())
    except Exception as exc:  # noqa: BLE001 - whatever fails to load is the finding
        return [f"output does not load: {type(exc).__name__}: {exc}"]
    bad = [k for ts in files.values() for k, t in ts.items() if not _finite(t)]
    found = [f"non-finite tensors written: {bad[:3]}"] if bad else []
    if (out / "adapter_config.json").is_file():
        return found + _check_adapter(out, files.get("adapter_model.safetensors", {}))
    # the model's weights (model.safetensors or its shards), not the method's artifacts
    weights = {k: t for f, ts in files.items() if f.startswith("model") for k, t in ts.items()}
    expected = _shapes(base_file)
    got = {k: list(t.shape) for k, t in weights.items()}
    if expected is not None and got != expected:
        found.append(f"output tensors differ from the base's: {sorted(set(got) ^ set(expected))}")
    return found


def _finite(t: torch.Tensor) -> bool:
    return not t.is_floating_point() or bool(t.isfinite().all())


def _check_adapter(out: Path, tensors: dict[str, torch.Tensor]) -> list[str]:
    found = []
    config = json.loads((out / "adapter_config.json").read_text())
    if not tensors or not all(".lora_A." in k or ".lora_B." in k for k in tensors):
        found.append(f"adapter output holds no or non-LoRA tensors: {sorted(tensors)[:3]}")
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or not 0 < alpha < float("inf"):
        found.append(f"adapter output has lora_alpha {alpha!r}")
    return found


def _shapes(file: Path) -> dict[str, list[int]] | None:
    try:
        with safe_open(file, framework="pt") as reader:
            return {k: list(reader.get_slice(k).get_shape()) for k in reader.keys()}
    except Exception:  # noqa: BLE001 - a corrupted base: no independent expectation
        return None


def _report(seed: int, index: int, case: Case, code, err: str, found: list[str]) -> str:
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
    return (
        f"fuzz case seed={seed} index={index} broke the property: {'; '.join(found)}\n"
        f"  mutations: {case.log or ['none']}\n  argv: {[_clip(a) for a in case.argv]}\n"
        f"  exit {code}, "
        f"stderr: {err.strip()[:400]!r}\n  rebuild: STARMERGE_FUZZ_SEED={seed} "
        f".venv/bin/python -m pytest -m '' '{test}'"
    )


def _clip(text: str) -> str:
    return text if len(text) <= 150 else f"{text[:100]}...({len(text)} characters)"


def _fuzz_one(capsys, tmp_path: Path, pristine: Path, index: int, mutations: int = -1) -> None:
    case = make_case(SEED, index, tmp_path, pristine, mutations)
    before = _snapshot(case)
    code, err, problem = run_in_process(capsys, case.argv)
    found = violations(case, before, code, err, problem)
    assert not found, _report(SEED, index, case, code, err, found)
    shutil.rmtree(tmp_path, ignore_errors=True)  # thousands of cases: keep only failures


@pytest.mark.parametrize("index", range(8))
def test_fuzz_control_valid_configs_merge(capsys, tmp_path, pristine, index):
    """The unmutated configs merge (exit 0): the fuzz starts from inputs that work."""
    case = make_case(SEED, index, tmp_path, pristine, mutations=0)
    before = _snapshot(case)
    code, err, problem = run_in_process(capsys, case.argv)
    assert code == 0 or case.argv[0] == "validate", (case.argv, err, problem)
    assert not violations(case, before, code, err, problem)


@pytest.mark.parametrize("index", range(FAST))
def test_fuzz_merge(capsys, tmp_path, pristine, index):
    _fuzz_one(capsys, tmp_path, pristine, index)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(FAST, FAST + SLOW))
def test_fuzz_merge_slow(capsys, tmp_path, pristine, index):
    _fuzz_one(capsys, tmp_path, pristine, index)


def _subprocess_case(tmp_path: Path, pristine: Path, index: int, bomb: str | None) -> Case:
    case = make_case(SEED, index, tmp_path, pristine, mutations=0 if bomb else -1)
    if bomb:  # a billion laughs (10**9 leaves): only a bounded reader survives it
        cfg = Path(case.argv[1])
        cfg.write_text(alias_bomb(cfg.read_text(), levels=8, key=bomb))
        case.log.append(f"YAML alias bomb (8 levels) as {bomb}")
    return case


@pytest.mark.parametrize("index,bomb", [(FAST + SLOW, "method"), (FAST + SLOW + 1, None)])
def test_fuzz_console_script(tmp_path, pristine, index, bomb):
    """Real processes: no traceback on the real stderr, no hang, bounded memory."""
    case = _subprocess_case(tmp_path, pristine, index, bomb)
    before = _snapshot(case)
    code, err, problem = run_subprocess(case.argv)
    found = violations(case, before, code, err, problem)
    assert not found, _report(SEED, index, case, code, err, found)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(FAST + SLOW + 2, FAST + SLOW + 22))
@pytest.mark.parametrize("bomb", ["parameters", "models", None])
def test_fuzz_console_script_slow(tmp_path, pristine, index, bomb):
    test_fuzz_console_script(tmp_path, pristine, index, bomb)
