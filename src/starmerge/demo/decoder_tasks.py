"""The decoder tier's tasks as prompts: templates, label words, and a generation task.

A classification task is scored by the log-likelihood of each label word after its prompt
(``CausalLMBackend.score_choices``; the label word is the label name after a space, so
``"Article: ... Topic:"`` continues with ``" sports"``). The generation task (ChatterBot trivia)
is scored by exact match of the greedy answer's first line (SQuAD normalization). The input text
is cut to a token budget *before* it is put into the template, so the cue at the prompt's end
("Topic:") always survives truncation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml

from starmerge.demo.assets import TaskData, load_demo_task, package_dir
from starmerge.errors import StarmergeError

#: Task -> prompt template (``{text}`` is the input).
TEMPLATES = {
    "news": "Article: {text}\nTopic:",
    "sentiment": "Tweet: {text}\nSentiment:",
    "langid": "Sentence: {text}\nLanguage:",
    "chat_topic": "Message: {text}\nTopic:",
    "kaomoji": "Kaomoji: {text}\nEmotion:",
    "supersense": "Definition: {text}\nCategory:",
    "fortune_topic": "Quote: {text}\nTopic:",
    "wn_pos": "Definition: {text}\nPart of speech:",
    "trivia": "Question: {text}\nAnswer:",
}
MIN_TRIVIA = 200  # question-answer pairs chatterbot-corpus 1.3.3 has 260 of
MAX_NEW_TOKENS = 16


def load_trivia() -> TaskData:
    """ChatterBot trivia: 260 question-answer pairs (``label_names``: the distinct answers).

    Raises:
        StarmergeError: The package is missing or holds fewer than 200 pairs.
    """
    pip = "chatterbot-corpus==1.3.3"
    path = package_dir("chatterbot_corpus", pip, "task 'trivia'") / "data/english/trivia.yml"
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    pairs = sorted(
        {
            (" ".join(str(c[0]).split()), " ".join(str(c[1]).split()))
            for c in (doc or {}).get("conversations") or []
            if len(c) == 2
        }
    )
    if len(pairs) < MIN_TRIVIA:
        raise StarmergeError(
            f"task 'trivia': {path} holds {len(pairs)} question-answer pairs, expected at least "
            f"{MIN_TRIVIA}; fix: pip install --force-reinstall --no-deps {pip}"
        )
    answers = tuple(sorted({a for _, a in pairs}))
    index = {a: i for i, a in enumerate(answers)}
    texts, labels = tuple(q for q, _ in pairs), tuple(index[a] for _, a in pairs)
    return TaskData("trivia", texts, labels, answers, str(path), generation=True)


def load_decoder_task(name: str) -> TaskData:
    """A task for the decoder tier: trivia, or any demo classification task with a template.

    Raises:
        StarmergeError: The task has no prompt template (or its data are missing).
    """
    if name == "trivia":
        return load_trivia()
    if name not in TEMPLATES:
        raise StarmergeError(
            f"task {name!r} has no decoder prompt; the decoder tier runs {', '.join(TEMPLATES)}"
        )
    return load_demo_task(name)


class Prompter:
    """Builds a task's prompts and label words with the input cut to ``max_length`` tokens.

    Args:
        tokenizer: The decoder's tokenizer.
        max_length: Token budget of a whole prompt (the template's own tokens included).
    """

    def __init__(self, tokenizer: Any, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def prompts(self, task: TaskData) -> list[str]:
        """One prompt per item of ``task``."""
        template = TEMPLATES[task.name]
        room = self.max_length - len(self._ids(template.format(text=""))) - 1  # BOS
        return [template.format(text=self._cut(text, room)) for text in task.texts]

    def choices(self, task: TaskData) -> list[str]:
        """The label words (``" " + name``) of a classification task."""
        return [f" {name}" for name in task.label_names]

    def target(self, task: TaskData, label: int) -> list[int]:
        """Training target ids: the label word's first token, or the answer plus a newline."""
        if task.generation:
            return self._ids(f" {task.label_names[label]}\n")
        return self._ids(f" {task.label_names[label]}")[:1]

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _cut(self, text: str, room: int) -> str:
        ids = self._ids(text)
        return text if len(ids) <= room else self.tokenizer.decode(ids[: max(room, 1)]).strip()


def first_line(text: str) -> str:
    """A generated answer: the text up to the first newline."""
    return text.strip().split("\n", 1)[0].strip()


def check_first_tokens(prompter: Prompter, tasks: Sequence[TaskData]) -> None:
    """Training targets a label by its word's first token: those must differ across labels.

    Raises:
        StarmergeError: Two label words of a task start with the same token.
    """
    for task in tasks:
        if task.generation:
            continue
        firsts = [prompter.target(task, i)[0] for i in range(len(task.label_names))]
        if len(set(firsts)) < len(firsts):
            raise StarmergeError(
                f"task {task.name!r}: two label words start with the same token "
                f"({list(zip(task.label_names, firsts, strict=True))}); rename a label"
            )
