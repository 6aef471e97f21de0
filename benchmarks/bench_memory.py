"""Peak memory of a model-output merge: a synthetic ~2 GB Llama-shaped base with 8 adapters.

The issue's target, for STAR and for TIES with a global threshold:
    peak anonymous memory <= (tasks + 2) x the largest merged tensor + the largest base tensor
                             + 500 MB
(the 500 MB stands for the Python + torch runtime and allocator slack; the runtime baseline is
measured and reported separately). MB = 10**6 bytes here, so the bound is the stricter reading.

The base is an HF directory (``config.json`` for ``LlamaConfig`` plus safetensors shards) written
tensor by tensor with random values, without instantiating a model. ``starmerge merge`` runs as a
child process; its ``RssAnon`` (anonymous resident memory: heap, tensors; not the page cache of
mmap'ed checkpoints) is sampled from ``/proc/<pid>/status`` every 20 ms. ``VmHWM`` (the kernel's
exact peak of all resident memory, file-backed included) and ``ru_maxrss`` are recorded too.

Usage: python benchmarks/bench_memory.py [--quick] [--methods star,ties]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import common as C
import torch
from safetensors.torch import save_file

SIZES = {  # fp32 sizes: full ~2.1 GB (9 layers), quick ~0.1 GB
    "full": {"hidden": 2048, "intermediate": 5632, "layers": 9, "vocab": 32000, "heads": 32,
             "kv_heads": 4, "tasks": 8, "shard_bytes": 10**9},
    "quick": {"hidden": 512, "intermediate": 1408, "layers": 4, "vocab": 8000, "heads": 8,
              "kv_heads": 2, "tasks": 8, "shard_bytes": 5 * 10**7},
}
METHODS = {"star": {"eta": 40}, "ties": {"density": 0.2, "trim": "global"}}
TARGET_SLACK_BYTES = 500 * 10**6
R, ALPHA = 16, 32
ADAPTED = ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")
POLL_S = 0.02


# --------------------------------------------------------------------------- synthetic base
def llama_shapes(s: dict) -> dict[str, tuple[int, ...]]:
    """HF Llama parameter names and shapes, in checkpoint order."""
    h, i, head = s["hidden"], s["intermediate"], s["hidden"] // s["heads"]
    kv = s["kv_heads"] * head
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (s["vocab"], h)}
    for n in range(s["layers"]):
        p = f"model.layers.{n}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (s["vocab"], h)
    return shapes


def llama_config(s: dict) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": s["hidden"], "intermediate_size": s["intermediate"],
        "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"], "head_dim": s["hidden"] // s["heads"],
        "vocab_size": s["vocab"], "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "float32",
    }


def write_base(path: Path, s: dict) -> None:
    """Write config.json and fp32 shards one at a time (at most one shard in memory)."""
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    shapes = llama_shapes(s)
    groups: list[list[str]] = [[]]
    size = 0
    for key, shape in shapes.items():  # plan the shards first, so their names are known
        nbytes = math_prod(shape) * 4
        if groups[-1] and size + nbytes > s["shard_bytes"]:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    weight_map = {}
    for n, keys in enumerate(groups):
        name = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {k: torch.ones(shapes[k]) if len(shapes[k]) == 1
                 else torch.randn(shapes[k], generator=g) * 0.02 for k in keys}
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
        del shard
    total = sum(math_prod(sh) * 4 for sh in shapes.values())
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(llama_config(s), indent=2))


def math_prod(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def build_inputs(s: dict, work: Path) -> dict:
    base = work / "base"
    stamp = {**s, "v": 1}
    t0 = time.perf_counter()
    built = C.cached(base, stamp, lambda: write_base(base, s))
    shapes = llama_shapes(s)
    modules = {f"model.layers.{n}.{m}": shapes[f"model.layers.{n}.{m}.weight"]
               for n in range(s["layers"]) for m in ADAPTED}
    spec = C.LoraSpec(modules, r=R, alpha=ALPHA, target_modules=("q_proj", "v_proj", "up_proj"),
                      base_model=str(base))
    adapters = [work / "adapters" / f"task{t}" for t in range(s["tasks"])]
    C.cached(work / "adapters", {"tasks": s["tasks"], "base": str(base), **stamp},
             lambda: [C.write_lora(p, spec, seed=100 + t) for t, p in enumerate(adapters)])
    return {"base": base, "adapters": adapters, "shapes": shapes, "modules": modules,
            "built": built, "build_s": time.perf_counter() - t0}


# --------------------------------------------------------------------------- measurement
def runtime_baseline() -> dict:
    """RssAnon of ``python -c "import torch, starmerge.cli"`` (the runtime before any work)."""
    run = C.run_child([sys.executable, "-c",
                       "import time, torch, starmerge.cli; time.sleep(1.0)"], poll_s=POLL_S)
    return {"peak_rss_anon_bytes": run.peak_rss_anon_bytes, "vm_hwm_bytes": run.vm_hwm_bytes,
            "ru_maxrss_bytes": run.ru_maxrss_bytes, "wall_s": run.wall_s}


def bound_bytes(inputs: dict) -> dict:
    merged = max(math_prod(inputs["shapes"][f"{m}.weight"]) for m in inputs["modules"]) * 4
    base = max(math_prod(sh) for sh in inputs["shapes"].values()) * 4  # fp32 base
    n = len(inputs["adapters"])
    return {"largest_merged_tensor_bytes": merged, "largest_base_tensor_bytes": base,
            "tasks": n, "slack_bytes": TARGET_SLACK_BYTES,
            "bound_bytes": (n + 2) * merged + base + TARGET_SLACK_BYTES}


def measure(method: str, inputs: dict, work: Path) -> dict:
    cfg = C.write_yaml(work / f"{method}.yaml", {
        "method": method,
        "parameters": METHODS[method],
        "base_model": str(inputs["base"]),
        "models": [{"adapter": str(a)} for a in inputs["adapters"]],
        "output": {"format": "model", "dtype": "float32"},
    })
    out = work / f"out_{method}"
    with C.ForeignLoad() as load:
        run = C.starmerge_merge(cfg, out, poll_s=POLL_S)
    res = {"command": f"starmerge merge {cfg} {out} --overwrite --quiet", **run.brief(),
           "foreign_load_cores": load.cores}
    if run.returncode == 0:
        man = C.manifest(out)
        res["manifest_peak_memory_bytes"] = man.get("peak_memory_bytes")
        res["manifest_predicted_peak_bytes"] = man.get("predicted_peak_bytes")
        res["manifest_wall_time_s"] = man.get("wall_time_s")
        res["output_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        state = man.get("statistics", {}).get("state", {})
        if state:
            res["state_summary"] = state
        shutil.rmtree(out, ignore_errors=True)  # 2 GB each; the numbers are what we keep
    return res


def trace(method: str, work: Path) -> dict:
    """Re-run ``method`` under ``memory_trace.py``: the peak RssAnon of each phase."""
    out = work / f"out_{method}_trace"
    run = C.run_child([sys.executable, str(C.BENCH / "memory_trace.py"),
                       str(work / f"{method}.yaml"), str(out)])
    shutil.rmtree(out, ignore_errors=True)
    if run.returncode:
        return {"error": run.stderr[-2000:]}
    data = json.loads(run.stdout.strip().splitlines()[-1])
    for phase, peak in data["phases"].items():
        print(f"    trace: {phase:12s} peak RssAnon {C.mib(peak['peak_rss_anon_bytes'])}"
              f" (at {peak['key']})", flush=True)
    return data


def run(quick: bool, methods: list[str], force_trace: bool = False) -> dict:
    mode = "quick" if quick else "full"
    s = SIZES[mode]
    work = C.WORK / f"memory_{mode}"
    result = {"benchmark": "memory", "mode": mode, "machine": C.machine_info(), "size": s,
              "poll_interval_s": POLL_S, "mb": "10**6 bytes", "adapter_rank": R,
              "adapted_modules": list(ADAPTED), "output": {"format": "model", "dtype": "float32"}}
    inputs = build_inputs(s, work)
    base_bytes = sum(f.stat().st_size for f in inputs["base"].glob("*.safetensors"))
    result["inputs"] = {"base_bytes": base_bytes, "built_now": inputs["built"],
                        "build_s": inputs["build_s"], "n_adapters": len(inputs["adapters"])}
    print(f"[memory] {mode}: base {base_bytes / 1e9:.2f} GB fp32, {len(inputs['adapters'])} "
          f"adapters (r={R} on {', '.join(ADAPTED)})", flush=True)
    result["bound"] = bound_bytes(inputs)
    result["runtime_baseline"] = runtime_baseline()
    base_anon = result["runtime_baseline"]["peak_rss_anon_bytes"]
    print(f"  runtime baseline (import torch, starmerge.cli): RssAnon {C.mib(base_anon)}",
          flush=True)
    result["runs"] = {}
    for method in methods:
        print(f"  {method}: starmerge merge (model output)...", flush=True)
        r = measure(method, inputs, work)
        bound = result["bound"]["bound_bytes"]
        if r["returncode"] == 0:
            r["pass"] = r["peak_rss_anon_bytes"] <= bound
            r["peak_anon_minus_runtime_bytes"] = r["peak_rss_anon_bytes"] - base_anon
            pred = r.get("manifest_predicted_peak_bytes") or 0
            r["anon_beyond_runtime_over_predicted"] = (
                (r["peak_rss_anon_bytes"] - base_anon) / pred if pred else None)
            print(f"    peak RssAnon {C.mib(r['peak_rss_anon_bytes'])} (bound {C.mib(bound)}: "
                  f"{'PASS' if r['pass'] else 'FAIL'}); beyond runtime "
                  f"{C.mib(r['peak_anon_minus_runtime_bytes'])} vs predicted {C.mib(pred)}; "
                  f"VmHWM {C.mib(r['vm_hwm_bytes'])}; {r['wall_s']:.1f} s (other processes used "
                  f"{r['foreign_load_cores']} cores)", flush=True)
        else:
            r["pass"] = False
            print(f"    FAILED (exit {r['returncode']}): {r.get('stderr_tail', '')[-500:]}",
                  flush=True)
        if r["returncode"] == 0 and (force_trace or not r["pass"]):
            print(f"  {method}: tracing where the peak happens (memory_trace.py)...", flush=True)
            r["trace"] = trace(method, work)
        result["runs"][method] = r
    result["machine"]["loadavg_at_end"] = C.load_average()
    return result


def summary_lines(res: dict) -> list[str]:
    b = res["bound"]
    lines = [f"memory ({res['mode']}): bound = ({b['tasks']} + 2) x "
             f"{C.mib(b['largest_merged_tensor_bytes'])} + "
             f"{C.mib(b['largest_base_tensor_bytes'])} + 500 MB = {C.mib(b['bound_bytes'])}; "
             f"runtime baseline RssAnon {C.mib(res['runtime_baseline']['peak_rss_anon_bytes'])}"]
    for method, r in res["runs"].items():
        if r["returncode"]:
            lines.append(f"  {method:5s}: FAILED (exit {r['returncode']})")
            continue
        lines.append(
            f"  {method:5s}: peak RssAnon {C.mib(r['peak_rss_anon_bytes'])} "
            f"{'PASS' if r['pass'] else 'FAIL'}; predicted "
            f"{C.mib(r['manifest_predicted_peak_bytes'] or 0)} + runtime; "
            f"VmHWM {C.mib(r['vm_hwm_bytes'])}; wall {r['wall_s']:.1f} s")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--methods", default="star,ties", help="comma-separated: star,ties")
    p.add_argument("--trace", action="store_true",
                   help="trace every method's phases (default: only those over the bound)")
    args = p.parse_args(argv)
    res = run(args.quick, [m for m in args.methods.split(",") if m], args.trace)
    path = C.write_result("memory_quick" if args.quick else "memory", res)
    print("\n".join(summary_lines(res)))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
