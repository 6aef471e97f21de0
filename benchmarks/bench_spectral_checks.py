"""For ``bench_spectral.py``: the peers' timings, accuracy against float64 references, memory.

The peers: one parameter's merge as they run it (densify the T deltas ``B A scale`` in float32,
the dense formulation of :mod:`bench_spectral_refs`), timed on a sample of q and k/v modules and
extrapolated to all (the adapters' loading is not counted, in the peers' favour).

For a few sampled modules, the merged adapter's ``B A scale`` (read back from the written
adapter, float64) against the float64 reference of the same method
(:mod:`bench_spectral_refs`) on the same 12 tasks' factors; for TIES in a merge space, its fitted
global thresholds (from the run's manifest) are used, and checked against a count over the
float64 coordinates of every parameter. Cross-checks: the references' shortcuts (the range
route of ``svd64``, KnOTS from the factors) against plain dense float64 SVDs on one k_proj.
Memory (optional): peak RssAnon of model-output merges on ``bench_memory.py``'s inputs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import bench_memory as M
import bench_spectral_refs as F
import common as C
import torch

REFS = {
    "tsv_m": F.ref_tsv_m,
    "iso_c": F.ref_iso_c,
    "iso_cts": F.ref_iso_cts,
    "cart": F.ref_cart,
    "wudi": F.ref_wudi_exact,
}


def parts(adapter: tuple[dict, dict], module: str, dtype: torch.dtype) -> tuple:
    """``(scale * B, A)`` of ``module`` (these inputs: plain LoRA scale, no patterns)."""
    cfg, tensors = adapter
    scale = cfg["lora_alpha"] / cfg["r"]
    a = tensors[f"{C.PREFIX}{module}.lora_A.weight"].to(dtype)
    b = tensors[f"{C.PREFIX}{module}.lora_B.weight"].to(dtype)
    return b * scale, a


def _sample(kind: str, n: int, n_layers: int) -> list[str]:
    projs = ["q_proj"] if kind == "q" else ["k_proj", "v_proj"]
    return [
        f"model.layers.{(i * 7 + 3) % n_layers}.self_attn.{projs[i % len(projs)]}" for i in range(n)
    ]


def time_peer(peer: str, adapters: list, size: dict) -> dict:
    """One parameter's dense merge (densify T deltas, the peer's formula), sampled per shape."""
    per_kind = {}
    for kind, n in size["peer_sample"].items():
        rows = []
        for module in _sample(kind, n, size["layers"]):
            factors = [parts(ad, module, torch.float32) for ad in adapters]
            w_d, c_d, ds = C.timed(lambda f=factors: [b @ a for b, a in f])
            w_m, c_m = _merge_time(peer, module, ds)
            rows.append(
                {
                    "module": module,
                    "shape": list(ds[0].shape),
                    "densify_s": w_d,
                    "merge_s": w_m,
                    "wall_s": w_d + w_m,
                    "cpu_s": c_d + c_m,
                }
            )
            print(
                f"    peer {peer} {module}: {w_d + w_m:.1f} s ({c_d + c_m:.1f} s CPU)", flush=True
            )
            del ds
        per_kind[kind] = {
            "rows": rows,
            "wall_s_median": C.median([r["wall_s"] for r in rows]),
            "cpu_s_median": C.median([r["cpu_s"] for r in rows]),
        }
    counts = {"q": size["layers"], "kv": 2 * size["layers"]}
    total = {
        stat: sum(per_kind[k][stat] * counts[k] for k in counts)
        for stat in ("wall_s_median", "cpu_s_median")
    }
    return {"per_kind": per_kind, "matrix_counts": counts, "extrapolated_total": total}


_KNOTS_SVD: dict[str, tuple[float, float, tuple]] = {}  # module -> KnOTS' SVD, timed once


def _merge_time(peer: str, module: str, ds: list) -> tuple[float, float]:
    """Wall and CPU seconds of ``peer`` on one module's dense deltas ``ds``.

    KnOTS' peers share their expensive part, the SVD of the stacked deltas: it is timed once
    per module (minutes for a q_proj) and counted in full for each, plus the method's own time.
    """
    if peer not in F.KNOTS_MERGE:
        w, c, _ = C.timed(lambda: F.PEERS[peer](ds))
        return w, c
    if module not in _KNOTS_SVD:
        _KNOTS_SVD[module] = C.timed(lambda: F.peer_knots_svd(ds))
    w_s, c_s, (u, coords) = _KNOTS_SVD[module]
    w_m, c_m, _ = C.timed(lambda: u @ F.KNOTS_MERGE[peer](coords))
    return w_s + w_m, c_s + c_m


def reference(
    method: str, space: str, factors: list, thresholds: list | None
) -> tuple[torch.Tensor, dict]:
    """Float64 result of ``method`` in ``space`` on one parameter's ``(s_t B_t, A_t)``."""
    bound = sum(a.shape[0] for _, a in factors)  # R: every matrix here has rank <= R
    info: dict = {}
    if space == "full":
        return REFS[method]([b @ a for b, a in factors], bound), info
    if space == "core":
        u_b, v_a, coords = F.core_space(factors)
    else:
        left, coords = F.knots_space(factors)
    if method == "ties":
        merged, info["entries_within_rounding_of_threshold"] = F.ref_ties(coords, thresholds)
    else:
        merged = F.ref_tsv_m(coords, bound)
    return (u_b @ merged @ v_a.T if space == "core" else left @ merged), info


def accuracy(
    name: str, method: str, space: str, cli: dict, adapters: list, modules: list[str]
) -> dict:
    """Relative Frobenius error of the merged adapter (``cli["out_dir"]``) per sampled module."""
    out = C.read_adapter(Path(cli["out_dir"]))
    thresholds = (cli.get("state") or {}).get("thresholds")
    rows = []
    for module in modules:
        factors = [parts(ad, module, F.F64) for ad in adapters]
        wall, _, (ref, info) = C.timed(lambda f=factors: reference(method, space, f, thresholds))
        got = C.adapter_delta(*out, module, F.F64)
        err = float(torch.linalg.norm(got - ref) / torch.linalg.norm(ref))
        rows.append({"module": module, "rel_frobenius_err": err, "reference_s": wall, **info})
        print(f"    accuracy {name} {module}: {err:.2e} ({wall:.1f} s)", flush=True)
    return {"rows": rows, "max_rel_err": max(r["rel_frobenius_err"] for r in rows)}


def threshold_check(name: str, space: str, state: dict, adapters: list, inputs: dict) -> dict:
    """TIES's fitted global thresholds against the float64 coordinates of every parameter.

    Per task: how many float64 coordinates (over all parameters) lie at or above the fitted
    threshold, against the fit's ``keep = floor(density N_t)``; equal up to rounding ties.
    """
    thr, counts = state["thresholds"], [0] * len(adapters)
    band = 2 * torch.finfo(torch.float32).eps
    for module in inputs["modules"]:
        factors = [parts(ad, module, F.F64) for ad in adapters]
        coords = F.core_space(factors)[2] if space == "core" else F.knots_space(factors)[1]
        for t, c in enumerate(coords):
            counts[t] += int((c.abs() >= thr[t] * (1 - band)).sum())
    diff = [c - k for c, k in zip(counts, state["keep"], strict=True)]
    print(f"    {name} thresholds: count - keep per task {diff}", flush=True)
    return {"counts": counts, "keep": state["keep"], "max_abs_diff": max(map(abs, diff))}


def crosschecks(adapters: list, layer: str) -> dict:
    """The references' shortcuts against plain dense float64 SVDs, on ``layer``'s k_proj."""
    module = f"{layer}.self_attn.k_proj"
    factors = [parts(ad, module, F.F64) for ad in adapters]
    total = sum(b @ a for b, a in factors)
    bound = sum(a.shape[0] for _, a in factors)
    u, s, vh = F.svd64(total, bound)
    u2, s2, vh2 = torch.linalg.svd(total, full_matrices=False)
    k = F.support(s2)
    ref = (u2[:, :k] * s2[:k]) @ vh2[:k]
    range_diff = float(torch.linalg.norm((u * s) @ vh - ref) / torch.linalg.norm(ref))
    left, coords = F.knots_space(factors)
    left_d, coords_d = F.knots_space(factors, dense=True)
    x = left @ F.ref_tsv_m(coords, bound)  # TSV-M in KnOTS space, by both routes
    y = left_d @ F.ref_tsv_m(coords_d, bound)
    knots_diff = float(torch.linalg.norm(x - y) / torch.linalg.norm(y))
    print(f"    cross-checks on {module}: range SVD {range_diff:.1e}, KnOTS {knots_diff:.1e}")
    return {"module": module, "range_svd_vs_dense": range_diff, "knots_vs_dense": knots_diff}


# --------------------------------------------------------------------------- memory (optional)
def memory(mode: str, names: list[str], case_config) -> dict:
    """Peak RssAnon of a model-output merge on bench_memory's inputs, against its bound.

    ``case_config(path, name, adapters, **extra)`` writes case ``name``'s config.
    """
    work = C.WORK / f"memory_{mode}"
    inputs = M.build_inputs(M.SIZES[mode], work)
    res = {"bound": M.bound_bytes(inputs), "runtime_baseline": M.runtime_baseline(), "runs": {}}
    for name in names:
        cfg = case_config(
            work / f"spectral_{name}.yaml",
            name,
            inputs["adapters"],
            base_model=str(inputs["base"]),
            output={"format": "model", "dtype": "float32"},
        )
        out = work / f"out_spectral_{name}"
        with C.ForeignLoad() as load:
            run = C.starmerge_merge(cfg, out, poll_s=M.POLL_S)
        r = {**run.brief(), "foreign_load_cores": load.cores}
        r["pass"] = run.returncode == 0 and run.peak_rss_anon_bytes <= res["bound"]["bound_bytes"]
        r["manifest_predicted_peak_bytes"] = C.manifest(out).get("predicted_peak_bytes")
        shutil.rmtree(out, ignore_errors=True)
        res["runs"][name] = r
        print(
            f"    memory {name}: peak RssAnon {C.mib(run.peak_rss_anon_bytes)} (bound "
            f"{C.mib(res['bound']['bound_bytes'])}: {'PASS' if r['pass'] else 'FAIL'}), "
            f"{run.wall_s:.1f} s",
            flush=True,
        )
    return res
