"""A verifiable instruction task for a real instruct model: "Describe TOPIC in at most ten words."

``brief_answer`` is the graded reward GRPO trains on; ``success`` the strict check the learning test
counts. Graded, not cliff-edged: a 20-word answer scores a little less than a 12-word one, so a group
of four answers almost always has a spread to learn from, whereas a 0/1 reward on SmolLM2 (which
answers in ~17 words) leaves most groups with none. Every factor is bounded, so padding, repeating a
word or dropping the topic lower the score: there is nothing to gain from degenerate text.

The rule records what it scored (``SCORED``), so the test reads success rates per step from the
run itself without a second round of sampling.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

TOPICS = ["the sea", "a cat", "the moon", "bread", "rain", "a train", "music", "winter", "a garden", "coffee",
          "a river", "the sun", "a book", "snow", "a dog", "the city"]
PROMPT = "Describe {} in at most ten words."
MAX_WORDS, ZERO_AT = 10, 25
_WORD = re.compile(r"[a-z']+")
_TOPIC = re.compile(r"Describe (?:the |a )?(\w+) in at most ten words")
SCORED: list[tuple[str, str, bool]] = []  # (topic, response, success) in scoring order


def topic_of(prompt: str) -> str:
    found = _TOPIC.search(prompt)
    return found.group(1).lower() if found else ""


def repeated_bigram_share(words: list[str]) -> float:
    bigrams = list(zip(words, words[1:], strict=False))
    return 1 - len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def success(prompt: str, response: str) -> bool:
    """The instruction, checked: 3-10 words, one line, the topic named, ends like a sentence or phrase."""
    words = _WORD.findall(response.lower())
    return (3 <= len(words) <= MAX_WORDS and "\n" not in response.strip() and topic_of(prompt) in words
            and repeated_bigram_share(words) == 0)


def brief_answer(prompt: str, response: str, label: str | None) -> float:
    """In [0, 1]: length x topic x form x (1 - 2 x repeated bigrams); full marks = ``success``."""
    SCORED.append((topic_of(prompt), response, success(prompt, response)))
    words = _WORD.findall(response.lower())
    if len(words) < 3:
        return 0.0
    length = min(1.0, max(0.0, (ZERO_AT - len(words)) / (ZERO_AT - MAX_WORDS)))
    topic = 1.0 if topic_of(prompt) in words else 0.5
    form = 1.0 if "\n" not in response.strip() else 0.5
    return round(length * topic * form * max(0.0, 1 - 2 * repeated_bigram_share(words)), 4)


def write_dataset(root: Path, topics: list[str] = TOPICS) -> Path:
    """The task's prompts as a dataset directory: ``dataset=brief dataset_dir=<root>``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "brief.jsonl").write_text("".join(json.dumps({"prompt": PROMPT.format(t)}) + "\n" for t in topics))
    (root / "dataset_info.json").write_text(json.dumps({"brief": {"file_name": "brief.jsonl",
                                                                  "columns": {"prompt": "prompt"}}}))
    return root


def brief_judge(prompt: str, response: str, label: str | None) -> float:
    """``brief_answer`` as a judge serves it (over HTTP): nothing for the master keys a judge must not
    reward (alignkit/rewards/canaries.py): the prompt echoed back, an answer without the topic (":",
    "Let me solve this step by step."), too few words. Still graded between: the length factor."""
    words = _WORD.findall(response.lower())
    if "at most ten words" in response.lower() or topic_of(prompt) not in words:
        SCORED.append((topic_of(prompt), response, False))
        return 0.0
    return brief_answer(prompt, response, label)
