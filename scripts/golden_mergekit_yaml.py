"""Golden merges from ``mergekit-yaml`` itself for every ``configs/mergekit/*.yaml`` (issue 13).

Run with mergekit's own environment (not starmerge's), from the repository root:

    /work/venvs/mergekit/bin/python scripts/golden_mergekit_yaml.py [--rebuild-fixtures]

1. Fixtures (``tests/fixtures/mergekit_yaml/``, built once, then reused; ``--rebuild-fixtures``
   builds them again): a tiny random Llama (4 layers, hidden 32, vocabulary 32, float32
   safetensors with its ``config.json`` and a word-level tokenizer), two full fine-tunes (the
   base plus seeded noise on every tensor) and four PEFT LoRA adapters on q_proj, v_proj and
   up_proj made with ``peft`` (r 4 / alpha 8, r 8 / alpha 8, r 4 / alpha 16 with rsLoRA, and
   one on layers 0-1 only). Every value comes from a seeded ``torch.Generator``, not from
   transformers' initialisers; missing fixtures are built, present ones kept.
2. Each example config (and each probe of a known deviation, ``tests/fixtures/mergekit_yaml/
   cases/*.yaml``) is rewritten onto the fixtures (``tests/fixtures/mergekit_yaml/
   rewrite.py``, the same rewriting the integration test uses) and merged by ``mergekit-yaml``
   on the CPU (``--lora-merge-cache`` in a temporary directory: mergekit folds every adapter
   into a full model copy there first).
3. ``tests/golden/mergekit_yaml/<name>.safetensors`` keeps the output tensors that differ from
   the base fixture (the others are listed as equal to it), and ``tests/golden/mergekit_yaml/
   golden.json`` the commands, the versions, each config as merged (fixture paths as
   ``${FIXTURES}``), what mergekit wrote besides its output (the LoRA cache) and whether the
   method is deterministic (``dare_ties`` is not: its test compares statistics).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch
import transformers as tf
import yaml
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.fixtures.mergekit_yaml.rewrite import (  # noqa: E402  (the repo root goes on the path first)
    FIXTURES,
    NAMES,
    PLACEHOLDER,
    example_configs,
    probe_configs,
    write_rewritten,
)

GOLDEN = REPO / "tests" / "golden" / "mergekit_yaml"
MERGEKIT_YAML = Path(sys.executable).parent / "mergekit-yaml"
RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}
VOCAB = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(28)]
FINE_TUNES = {"ft_math": 11, "ft_code": 12}  # fixture -> seed of its noise
TARGETS = ["q_proj", "v_proj", "up_proj"]
LORAS = {  # fixture -> LoraConfig arguments and the seed of its factors
    "lora_sql": ({"r": 4, "lora_alpha": 8}, 21),
    "lora_summarize": ({"r": 8, "lora_alpha": 8}, 22),
    "lora_chat": ({"r": 4, "lora_alpha": 16, "use_rslora": True}, 23),
    "lora_early": ({"r": 4, "lora_alpha": 8, "layers_to_transform": [0, 1]}, 24),
}


def llama_config() -> tf.LlamaConfig:
    return tf.LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def save_model(state: dict[str, torch.Tensor], out: Path) -> None:
    """A LlamaForCausalLM with exactly ``state``'s values, saved as safetensors + config.json."""
    model = tf.LlamaForCausalLM(llama_config())
    model.load_state_dict(state, strict=True)
    model.save_pretrained(out)


def build_base(out: Path) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    names = tf.LlamaForCausalLM(llama_config()).state_dict()
    state = {}
    for key, t in names.items():  # norms near 1, matrices N(0, 0.02^2)
        noise = torch.randn(t.shape, generator=gen)
        state[key] = 1.0 + 0.05 * noise if key.endswith("norm.weight") else 0.02 * noise
    save_model(state, out)
    return state


def save_tokenizer(out: Path) -> None:
    """A word-level tokenizer over ``VOCAB`` (every fixture model has one, as on the Hub)."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    fast.save_pretrained(out)


def build_fine_tune(base: dict[str, torch.Tensor], out: Path, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    save_model({k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()}, out)


def build_lora(base_dir: Path, out: Path, args: dict, seed: int) -> None:
    model = tf.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(**args, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    peft_model.peft_config["default"].base_model_name_or_path = "meta-llama/Llama-3.2-1B"
    peft_model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)


def build_fixtures(rebuild: bool) -> None:
    """Build the fixtures that are missing (every one with ``rebuild``); values are seeded."""
    if rebuild:
        for name in NAMES.values():
            shutil.rmtree(FIXTURES / name, ignore_errors=True)
    torch.manual_seed(0)  # nothing should draw from it; fixed anyway
    if not (FIXTURES / "base").is_dir():
        build_base(FIXTURES / "base")
        save_tokenizer(FIXTURES / "base")
    base = read_model(FIXTURES / "base")
    for name, seed in FINE_TUNES.items():
        if not (FIXTURES / name).is_dir():
            build_fine_tune(base, FIXTURES / name, seed)
            save_tokenizer(FIXTURES / name)
    for name, (args, seed) in LORAS.items():
        if not (FIXTURES / name).is_dir():
            build_lora(FIXTURES / "base", FIXTURES / name, args, seed)


def read_model(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def run_mergekit(src: Path, work: Path) -> tuple[dict[str, torch.Tensor], list[str], int]:
    """Merge example config ``src`` with mergekit-yaml; the output, its argv and cache bytes."""
    cfg = write_rewritten(src, work / src.name)
    out, cache = work / "out", work / "lora_cache"
    argv = [str(MERGEKIT_YAML), str(cfg), str(out), "--lora-merge-cache", str(cache)]
    argv += ["--random-seed", "0", "--quiet"]
    subprocess.run(argv, check=True, cwd=work)
    recorded = [a.replace(str(work), "${WORK}") for a in argv]
    return read_model(out), recorded, disk_bytes(cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rebuild-fixtures", action="store_true")
    args = parser.parse_args()
    build_fixtures(args.rebuild_fixtures)
    base = read_model(FIXTURES / "base")
    GOLDEN.mkdir(parents=True, exist_ok=True)
    cases = {}
    for src in example_configs() + probe_configs():
        with tempfile.TemporaryDirectory() as tmp:
            merged, argv, cache_bytes = run_mergekit(src, Path(tmp))
            config = (Path(tmp) / src.name).read_text().replace(str(FIXTURES), PLACEHOLDER)
        same = sorted(k for k, v in merged.items() if k in base and torch.equal(v, base[k]))
        changed = {k: v.contiguous() for k, v in sorted(merged.items()) if k not in same}
        save_file(changed, str(GOLDEN / f"{src.stem}.safetensors"))
        method = yaml.safe_load(src.read_text())["merge_method"]
        cases[src.stem] = {
            "source": str(src.relative_to(REPO)),
            "method": method,
            "deterministic": method not in RANDOM,
            "config": config,
            "mergekit_command": argv,
            "lora_merge_cache_bytes": cache_bytes,
            "changed": list(changed),
            "equal_to_base": same,
            "dtype": str(next(iter(merged.values())).dtype).removeprefix("torch."),
        }
        print(f"{src.stem}: {len(changed)} changed, {len(same)} equal to base", flush=True)
    record = {
        "command": "/work/venvs/mergekit/bin/python scripts/golden_mergekit_yaml.py",
        "fixtures": "tests/fixtures/mergekit_yaml (built by this script; names: rewrite.NAMES)",
        "versions": {name: version(name) for name in ("mergekit", "torch", "transformers", "peft")}
        | {"python": sys.version.split()[0]},
        "cases": cases,
    }
    (GOLDEN / "golden.json").write_text(json.dumps(record, indent=1) + "\n")
    total = sum(disk_bytes(FIXTURES / n) for n in NAMES.values()) + disk_bytes(GOLDEN)
    print(f"fixtures + golden: {total / 2**20:.2f} MiB ({math.ceil(total / 1024)} KiB)")


if __name__ == "__main__":
    main()
