"""Rule rewards: built-in rules and user Python functions, as a ``RewardSource``.

A rule is ``fn(prompt: str, response: str, label: str | None) -> float``. Name it in a
config as a built-in (``count_good``), an importable ``module:NAME``, or a file
``path/to/file.py:function``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from alignkit.rewards.base import Score, ScoreMeta, labels_for

Rule = Callable[[str, str, "str | None"], float]
# The batch form the judge server (and a trained reward model) scores with.
Scorer = Callable[[list[str], list[str], list["str | None"]], list[float]]

_GOOD = re.compile(r"\bgood\b", re.IGNORECASE)
DEFAULT_MARKER = "ANSWER:"


def count_good(prompt: str, response: str, label: str | None) -> float:
    """Number of times the whole word "good" appears in the response (any case)."""
    return float(len(_GOOD.findall(response)))


def contains_marker(prompt: str, response: str, label: str | None) -> float:
    """1.0 if the response contains the label (or ``ANSWER:`` when there is none), else 0.0."""
    marker = label if label else DEFAULT_MARKER
    return 1.0 if marker in response else 0.0


def exact_match(prompt: str, response: str, label: str | None) -> float:
    """1.0 if the stripped response equals the stripped label, else 0.0 (0.0 without a label)."""
    if label is None:
        return 0.0
    return 1.0 if response.strip() == label.strip() else 0.0


def length_penalty(prompt: str, response: str, label: str | None) -> float:
    """0.0 up to 100 words, then -0.01 per extra word: discourages rambling."""
    return -max(0, len(response.split()) - 100) / 100


_WORD = re.compile(r"[a-z']+")
# Words of a prompt that say what to do rather than what to talk about: not part of the topic.
_NOT_TOPIC = frozenset(
    "a an the this that it is are was be do does did what how who why which you your i my our we to of in on "
    "for and or with about write sentence say something tell me please greeting".split()
)
FLUENT_MAX_WORDS, FLUENT_HARD_MAX_WORDS = 8, 12  # the length budget: full credit up to 8 words, none from 12


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def fluent_answer(prompt: str, response: str, label: str | None) -> float:
    """A bounded rubric (0..10) whose optimum is a short, fluent answer on the prompt's topic.

    ``10 x topic x form x budget x (1 - repetition)``, each factor in [0, 1]:
    topic: 0.5 plus half the share of the prompt's topic words (the label's, when given) that the
    answer uses; form: starts with a capital letter and ends with ``. ! ?``; budget: 1 up to 8
    words (one short sentence), falling linearly to 0 at 12, 0 below 2 words;
    repetition: share of the answer's word bigrams that repeat an earlier one, doubled. Saying a
    word again and again, padding the length or dropping the topic all lower the score, so unlike
    ``count_good`` there is no way to score above 10.
    """
    words = _words(response)
    if len(words) < 2:
        return 0.0
    topic_words = {w for w in _words(label or prompt) if w not in _NOT_TOPIC}
    topic = 1.0 if not topic_words else 0.5 + 0.5 * len(topic_words & set(words)) / len(topic_words)
    text = response.strip()
    form = (0.5 + 0.5 * text[0].isupper()) * (0.5 + 0.5 * text.endswith((".", "!", "?")))
    over = max(0, len(words) - FLUENT_MAX_WORDS) / (FLUENT_HARD_MAX_WORDS - FLUENT_MAX_WORDS)
    bigrams = list(zip(words, words[1:], strict=False))
    repetition = 1 - len(set(bigrams)) / len(bigrams) if bigrams else 0.0
    return round(10 * topic * form * max(0.0, 1 - over) * max(0.0, 1 - 2 * repetition), 4)


BUILTIN_RULES: dict[str, Rule] = {
    "count_good": count_good,
    "fluent_answer": fluent_answer,
    "contains_marker": contains_marker,
    "exact_match": exact_match,
    "length_penalty": length_penalty,
}


def load_rule(spec: str) -> Rule:
    """Resolve a built-in name, ``module:NAME`` or ``path/to/file.py:function`` to a callable."""
    if spec in BUILTIN_RULES:
        return BUILTIN_RULES[spec]
    if ":" not in spec:
        raise ValueError(
            f"unknown rule {spec!r}: use a built-in ({', '.join(BUILTIN_RULES)}), "
            "'module:NAME' or 'path/to/file.py:function'"
        )
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py") or "/" in where or "\\" in where:
        module = _load_file(Path(where))
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ValueError(f"rule {spec!r}: cannot import module {where!r} ({e})") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"rule {spec!r}: {where!r} has no function named {name!r}")
    return fn


def _load_file(path: Path):
    if not path.is_file():
        raise ValueError(f"rule file {str(path)!r} does not exist")
    module_name = f"alignkit_user_rule_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"rule file {str(path)!r} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def rule_scorer(rule: Rule) -> Scorer:
    """The batch form of a rule, as the judge server's ``scorer`` hook expects."""

    def scorer(prompts: list[str], responses: list[str], labels: list[str | None]) -> list[float]:
        return [float(rule(p, r, lb)) for p, r, lb in zip(prompts, responses, labels, strict=True)]

    return scorer


class RuleReward:
    """A rule (built-in or user function) as a ``RewardSource``.

    An exception or a non-finite / non-numeric return is a failure with its reason, never 0.
    """

    def __init__(self, rule: Rule | str):
        self.name = rule if isinstance(rule, str) else getattr(rule, "__name__", "rule")
        self.rule = load_rule(rule) if isinstance(rule, str) else rule

    async def score(
        self, prompts: Sequence[str], responses: Sequence[str], meta: ScoreMeta | None = None
    ) -> list[Score]:
        labels = labels_for(meta, len(responses))
        return [self._score_one(p, r, lb) for p, r, lb in zip(prompts, responses, labels, strict=True)]

    def _score_one(self, prompt: str, response: str, label: str | None) -> Score:
        try:
            value = self.rule(prompt, response, label)
        except Exception as e:  # a user function may raise anything; it is one failed sample
            return Score.failure(f"rule error: {self.name} raised {type(e).__name__}: {e}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return Score.failure(f"non-numeric score: {self.name} returned {value!r}")
        if not math.isfinite(value):
            return Score.failure(f"non-finite score: {self.name} returned {value!r}")
        return Score(float(value))

    async def aclose(self) -> None:
        return None

    def metrics(self) -> dict[str, float]:
        return {}  # failures are counted by the CountFailures wrapper
