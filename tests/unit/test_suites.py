"""The built-in suites as data: tasks, ids, verbatim prompts, seed numbers, sampling, transforms.

Several tests re-state a piece of the seed code (IBM/STAR e6bfcf70) inline to show that the
check fails on the seed's behaviour.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import numpy as np
import pytest

from starmerge.errors import ConfigError, StarmergeError, UnknownNameError
from starmerge.eval.matching import match_choice
from starmerge.eval.sources import Source
from starmerge.suites import list_suites, load_suite
from starmerge.suites.data import (
    TRANSFORMS,
    build_examples,
    load_task_rows,
    mirror_file,
    seed_sample,
)
from starmerge.suites.scoring import contains_words, word_f1

SUITES = {"flan-t5-large": 13, "llama-3.2-3b-instruct": 13, "mistral-7b-instruct": 20}


def test_builtin_suites_load_with_every_task():
    assert set(list_suites()) == set(SUITES)
    for name, n in SUITES.items():
        suite = load_suite(name)
        assert len(suite.tasks) == n
        for task in suite.tasks.values():
            spec = task.spec()
            assert spec.name == task.name and spec.version == 1
            assert bool(task.adapter) != bool(task.model)


def test_flan_task_models_are_fusionbench_adapters_and_speeeed_checkpoints():
    suite = load_suite("flan-t5-large")
    assert suite.tasks["qqp"].adapter == "tanganke/flan-t5-large_glue-qqp_lora-16"
    assert suite.tasks["piqa"].model == "Speeeed/flan-t5-large-piqa_lora-16"
    assert sorted(t for t, x in suite.tasks.items() if x.model) == sorted(
        ["finance", "imdb", "agnews", "hella", "boolq", "piqa"]
    )


def test_lots_of_loras_ids_are_zero_padded_and_match_the_datasets():
    # Seed: f"...-task{task_id_map[task]}" with qasc = 39 -> "task39", a repo that does not exist.
    seed_id = f"Lots-of-LoRAs/Mistral-7B-Instruct-v0.2-4b-r16-task{39}"
    suite = load_suite("mistral-7b-instruct")
    assert suite.tasks["qasc"].adapter == "Lots-of-LoRAs/Mistral-7B-Instruct-v0.2-4b-r16-task039"
    assert suite.tasks["qasc"].adapter != seed_id
    for task in suite.tasks.values():
        adapter_id = re.search(r"task(\d+)$", task.adapter).group(1)
        dataset_id = re.search(r"/task(\d+)_", task.spec().source.path).group(1)
        assert adapter_id == dataset_id and len(adapter_id) >= 3


SEED_PROMPTS = [  # (suite, task, row, the seed's f-string rendered on it)
    (
        "flan-t5-large",
        "mnli",
        {"premise": "P", "hypothesis": "H", "label": 0},
        "Does the premise: ‘P’ logically imply, contradict, or is neutral to the hypothesis: ‘H’? "
        "Answer with ‘entailment’, ‘contradiction’, or ‘neutral’.",
    ),
    (
        "flan-t5-large",
        "hella",
        {"ctx": "C", "endings": ["e0", "e1", "e2", "e3"], "label": "1"},
        "The following is a context: 'C'\nGiven this context, choose the most appropriate ending:\n"
        "0: e0\n1: e1\n2: e2\n3: e3\nPlease return 0, 1, 2, or 3 as the correct answer.",
    ),
    (
        "flan-t5-large",
        "piqa",
        {"goal": "G", "sol1": "A", "sol2": "B", "label": 0},
        "Question: G\n    Option 1: A\n    Option 2: B\n    Which option is more appropriate? "
        "Respond with 'Option 1' or 'Option 2'.",
    ),
    (
        "flan-t5-large",
        "boolq",
        {"question": "Q", "passage": "P", "answer": True},
        "Based on the following passage: ‘P’, answer the question: ‘Q’. Respond with ‘true’ or "
        "‘false’.",
    ),
    (
        "llama-3.2-3b-instruct",
        "cola",
        {"sentence": "S", "label": 1},
        'Indicate if the following sentence is grammatically correct or not: "S". Answer ‘Yes’ or '
        "‘No’.",
    ),
    (
        "llama-3.2-3b-instruct",
        "copa",
        {"premise": "P", "question": "cause", "choice1": "A", "choice2": "B", "label": 0},
        "Given the premise: 'P', what's the cause for this? choice1: 'A' or choice2: 'B'. Answer "
        "with 'choice1' or 'choice2' without explanation.",
    ),
    (
        "mistral-7b-instruct",
        "ethos",
        {"input": "Text: x", "output": ["violence"], "id": "1"},
        "Text: x",
    ),
]


@pytest.mark.parametrize(("suite", "task", "row", "expected"), SEED_PROMPTS)
def test_prompts_are_the_seed_prompts_verbatim(suite, task, row, expected):
    spec = load_suite(suite).tasks[task].spec()
    _, examples, _ = build_examples(spec, [row] * 2, limit=1)
    assert examples[0].input == expected


def test_label_words_are_the_seed_dicts():
    flan = load_suite("flan-t5-large").tasks
    assert flan["qnli"].spec().label_words == {"1": ("no", "No"), "0": ("yes", "Yes")}
    agnews = flan["agnews"].spec().label_words
    assert agnews["3"] == ("Sci/Tech", "Sci/tech", "sci/tech")
    llama_mnli = load_suite("llama-3.2-3b-instruct").tasks["mnli"].spec().label_words
    assert llama_mnli["0"] == ("entail", "Entail", "entailment", "Entailment")
    disco = load_suite("mistral-7b-instruct").tasks["disco"].spec().label_words
    assert len(disco) == 13 and disco["13"] == ("PAIR_NONE", "pair_none")


def test_sample_sizes_match_the_seed():
    flan = load_suite("flan-t5-large").tasks
    assert flan["mnli"].spec().sampling.n == 1200 and flan["mnli"].spec().sampling.balance
    assert flan["sst2"].spec().sampling.n is None
    llama = load_suite("llama-3.2-3b-instruct").tasks
    assert llama["stsb"].spec().sampling.n == 200 and not llama["stsb"].spec().sampling.balance
    mistral = load_suite("mistral-7b-instruct").tasks
    sizes = {t: mistral[t].spec().sampling.n for t in ("ethos", "gap", "disco", "casino")}
    assert sizes == {"ethos": None, "gap": 100, "disco": 80, "casino": 75}
    assert mistral["snli"].spec().max_new_tokens == 2


def test_seed_tables_are_consistent_with_their_normalized_scores():
    # Avg. Normalized = 100 * mean(merged / LoRA): recompute from the per-task numbers.
    for name in SUITES:
        for table in load_suite(name).seed_tables:
            ref = table.rows["individual"]["scores"]
            assert list(ref) == list(table.tasks)
            for row_name, row in table.rows.items():
                if "scores" not in row:
                    continue
                norm = 100 * np.mean([row["scores"][t] / ref[t] for t in table.tasks])
                assert norm == pytest.approx(row["normalized"], abs=0.06), (name, row_name)


def _seed_random_balanced_sample(labels, n_per_label):
    """IBM/STAR util.random_balanced_sample, on indices."""
    counts = Counter(labels)
    n_per_label = min(n_per_label, min(counts.values()))
    random.seed(42)
    out = []
    for label in counts:
        members = [i for i, lab in enumerate(labels) if lab == label]
        out.extend(random.sample(members, n_per_label))
    return out


def test_sampling_draws_the_seed_rows():
    labels = [str(x) for x in np.random.default_rng(0).integers(0, 3, 500)]
    assert seed_sample(500, 120, 42, True, labels) == _seed_random_balanced_sample(labels, 40)
    random.seed(42)
    assert seed_sample(500, 50, 42, False, None) == random.sample(range(500), 50)
    assert seed_sample(5, None, 42, False, None) == [0, 1, 2, 3, 4]


def test_finance_split_is_datasets_train_test_split():
    datasets = pytest.importorskip("datasets")
    rows = [{"sentence": f"s{i}", "label": i % 3} for i in range(2264)]
    spec = load_suite("flan-t5-large").tasks["finance"].spec()
    ours = TRANSFORMS["seed_test_split"](rows, spec)
    ds = datasets.Dataset.from_list(rows).train_test_split(test_size=0.1, seed=42)["test"]
    assert len(ours) == 227 and [r["sentence"] for r in ours] == ds["sentence"]


def test_lots_of_loras_gold_outside_the_label_map_is_its_own_label():
    # Seed: true_label_id kept the previous example's value (or raised NameError).
    spec = load_suite("mistral-7b-instruct").tasks["snli"].spec()
    rows = [{"input": "q", "output": [g], "id": str(i)} for i, g in enumerate("CNEC")]
    spec2, examples, notes = build_examples(spec, rows)
    assert notes["extra_labels"] == ["E"]
    assert sorted(ex.label for ex in examples) == ["1", "1", "2", "E"]
    assert spec2.label_words["E"] == ("E",)


def test_dream_gold_is_read_from_its_prefix():
    spec = load_suite("mistral-7b-instruct").tasks["dream"].spec()
    rows = [{"input": "q", "output": [f"({c}) answer"], "id": c} for c in "ABC"]
    _, examples, _ = build_examples(spec, rows)
    assert sorted(ex.label for ex in examples) == ["1", "2", "3"]


def test_one_letter_labels_do_not_match_every_answer():
    # Seed (mistral evaluator): first label (dict order) that is a substring of the output.
    labels = {"1": ["a", "A"], "0": ["b", "B"]}  # wino

    def seed_match(text):
        text = text.lower()
        return next((k for k, ws in labels.items() for w in ws if w in text), None)

    outputs = {"B": "0", "b) is a better fit": "0", "Option B, that is": "0"}
    for text, gold in outputs.items():
        assert list(labels)[match_choice(text, list(labels.values()))] == gold
    assert [seed_match(t) for t in outputs] == ["0", "1", "1"]  # what the seed scored


def test_qasc_f1_uses_words_not_characters():
    gold, pred = "cell division", "cell division"
    seed_true = {c.lower() for c in gold}  # the seed iterated the gold string's characters
    seed_pred = set(pred.lower().split())
    assert not seed_true & seed_pred  # the seed scores an exact answer 0
    assert word_f1(pred, gold) == 1.0
    assert contains_words("Disease: Breast cancer", "breast cancer")
    assert not contains_words("breastcancer", "breast cancer")


def test_mirror_layout_and_missing_mirror_error(tmp_path):
    spec = load_suite("flan-t5-large").tasks["mnli"].spec()
    path = tmp_path / "nyu-mll/glue/mnli_matched/validation.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"premise": "p", "hypothesis": "h", "label": 0, "idx": 0}) + "\n")
    assert mirror_file(tmp_path, spec.source) == path
    assert load_task_rows(spec, tmp_path)[0]["premise"] == "p"
    other = load_suite("flan-t5-large").tasks["qqp"].spec()
    with pytest.raises(StarmergeError, match="no mirror file .*qqp/validation"):
        load_task_rows(other, tmp_path)
    assert mirror_file(tmp_path, Source("hub", "x/y", split="test")) is None


def test_script_datasets_use_the_parquet_conversion():
    flan = load_suite("flan-t5-large").tasks
    for task in ("finance", "piqa"):
        assert flan[task].spec().metadata["revision"] == "refs/convert/parquet"


def test_suite_include_overrides_and_errors(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text(
        "include: flan-t5-large\nbase_model: ./base\nbatch_size: 2\n"
        "tasks:\n  mnli: {adapter: ./a/mnli}\n  piqa: {adapter: ./a/piqa}\n"
    )
    suite = load_suite(f)
    assert suite.base_model == str(tmp_path / "base") and suite.batch_size == 2
    assert suite.tasks["mnli"].adapter == str(tmp_path / "a/mnli")
    assert suite.tasks["piqa"].model is None  # an adapter replaces the full checkpoint
    assert suite.tasks["mnli"].spec().input_template.startswith("Does the premise")
    assert suite.seed_tables and suite.tasks["qqp"].adapter.startswith("tanganke/")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "include: flan-t5-large\nbase_modle: x\ntasks:\n  mnli: {model: m, adapter: a}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_suite(bad)
    assert "base_modle" in str(err.value) and "exactly one of 'adapter' or 'model'" in str(
        err.value
    )
    with pytest.raises(UnknownNameError, match="Did you mean: flan-t5-large"):
        load_suite("flan-t5-larg")
    with pytest.raises(UnknownNameError, match="no task 'mnl'"):
        suite.task("mnl")
