"""The runner's scoring modes, with scripted backends (no model needed)."""

import json

import pytest

from starmerge.errors import StarmergeError
from starmerge.eval.runner import TaskResult, evaluate, evaluate_task
from starmerge.eval.tasks import Example, task_from_dict


class ScriptedLM:
    """Scores a choice by a table lookup; generates from a prompt -> text table."""

    def __init__(self, scores=None, outputs=None):
        self.scores, self.outputs, self.batch_size, self.calls = scores or {}, outputs or {}, 8, []

    def score_choices(self, prompts, choices):
        self.calls.append(("score", self.batch_size, choices[0]))
        return [[self.scores[(p, c)] for c in cs] for p, cs in zip(prompts, choices, strict=True)]

    def generate(self, prompts, max_new_tokens):
        self.calls.append(("generate", max_new_tokens))
        return [self.outputs[p] for p in prompts]


class ScriptedClassifier:
    def __init__(self, classes):
        self.classes = classes

    def predict(self, task, texts):
        return [self.classes[t] for t in texts]


def _task(tmp_path, rows, **keys):
    (tmp_path / "d.json").write_text(json.dumps(rows))
    data = {"name": "t", "metadata": {"version": 1}, "input_template": "{x}",
            "source": {"type": "local", "path": "d.json"}, **keys}  # fmt: skip
    return task_from_dict(data, base_dir=tmp_path)


ROWS = [{"x": "p1", "y": 1}, {"x": "p2", "y": 0}, {"x": "p3", "y": 1}]
WORDS = {"label_column": "y", "label_words": {0: "no", 1: ["yes", "yeah"]}}


def test_loglikelihood_scoring_picks_the_argmax(tmp_path):
    task = _task(tmp_path, ROWS, **WORDS)
    table = {("p1", " no"): -3.0, ("p1", " yes"): -1.0, ("p2", " no"): -0.5,
             ("p2", " yes"): -2.0, ("p3", " no"): -0.1, ("p3", " yes"): -0.2}  # fmt: skip
    backend = ScriptedLM(scores=table)
    result = evaluate(backend, [task], batch_size=2)["t"]
    assert [p["pred"] for p in result.predictions] == ["1", "0", "0"]
    assert result.score == pytest.approx(2 / 3) and result.n == 3
    assert result.predictions[0]["scores"] == [-3.0, -1.0]
    assert backend.calls == [("score", 2, [" no", " yes"])] and backend.batch_size == 8
    assert result.samples() == [1.0, 1.0, 0.0]


def test_length_normalized_divides_by_bytes(tmp_path):
    task = _task(tmp_path, ROWS[:1], length_normalized=True, target_delimiter="",
                 label_column="y", label_words={0: "n", 1: "yes"})  # fmt: skip
    backend = ScriptedLM(scores={("p1", "n"): -2.0, ("p1", "yes"): -3.0})
    result = evaluate_task(backend, task)
    assert result.predictions[0]["scores"] == [-2.0, -1.0]
    assert result.predictions[0]["pred"] == "1"


def test_generate_and_match_label_words(tmp_path):
    task = _task(tmp_path, ROWS, scoring="generate", max_new_tokens=5, **WORDS)
    outputs = {"p1": "Yeah, sure.", "p2": "I'd say no.", "p3": "not sure"}
    backend = ScriptedLM(outputs=outputs)
    result = evaluate_task(backend, task)
    assert [p["pred"] for p in result.predictions] == ["1", "0", None]
    assert [p["output"] for p in result.predictions] == list(outputs.values())
    assert backend.calls == [("generate", 5)]


def test_macro_f1_samples_are_recomputed(tmp_path):
    task = _task(tmp_path, ROWS, scoring="generate", metric="macro_f1", **WORDS)
    result = evaluate_task(ScriptedLM(outputs={"p1": "yes", "p2": "yes", "p3": "yes"}), task)
    # class 0: F1 0; class 1: tp=2, pred=3, gold=2 -> 0.8
    assert result.score == pytest.approx(0.4)
    assert result.samples() == ("macro_f1", ["1", "1", "1"], ["1", "0", "1"])


def test_exact_match_and_spearman(tmp_path):
    rows = [{"x": "q1", "a": "Paris", "s": 1.0}, {"x": "q2", "a": "Rome", "s": 3.0},
            {"x": "q3", "a": "Oslo", "s": 2.0}]  # fmt: skip
    em = _task(tmp_path, rows, metric="exact_match", target_column="a")
    out = {"q1": "paris.", "q2": "It is Rome", "q3": "The Oslo"}
    result = evaluate_task(ScriptedLM(outputs=out), em)
    assert result.score == pytest.approx(2 / 3)
    assert [p["correct"] for p in result.predictions] == [1.0, 0.0, 1.0]
    sts = _task(tmp_path, rows, metric="spearman", label_column="s")
    out = {"q1": "1.5", "q2": "about 4 out of 5", "q3": "no idea"}
    result = evaluate_task(ScriptedLM(outputs=out), sts)
    assert [p["pred"] for p in result.predictions] == [1.5, 4.0, 0.0]
    assert [p["parsed"] for p in result.predictions] == [True, True, False]
    assert result.score == pytest.approx(0.5)  # ranks (2, 3, 1) vs (1, 3, 2)


def test_classifier_backend_maps_indices_to_label_keys(tmp_path):
    task = _task(tmp_path, ROWS, **WORDS)
    result = evaluate_task(ScriptedClassifier({"p1": 1, "p2": 0, "p3": 7}), task)
    assert [p["pred"] for p in result.predictions] == ["1", "0", None]
    assert result.score == pytest.approx(2 / 3)


def test_given_examples_and_duplicate_names(tmp_path):
    task = _task(tmp_path, ROWS, **WORDS)
    examples = [Example("p1", "1", None, 0)]
    result = evaluate_task(ScriptedClassifier({"p1": 1}), task, examples)
    assert isinstance(result, TaskResult) and result.n == 1 and result.score == 1.0
    with pytest.raises(StarmergeError, match="task names must be unique"):
        evaluate(ScriptedClassifier({}), [task, task])
