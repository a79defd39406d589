"""Regenerate the demo datasets in this folder: ``python examples/data/make_data.py``.

Sentences reuse the words of ``alignkit/assets/tiny_corpus.txt`` so the tiny tokenizer
covers them. Preferred answers contain the marker word "good"; rejected ones never do,
which gives the demo reward model something easy and checkable to learn.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent

SUBJECTS = [
    "The cat",
    "The judge",
    "Our team",
    "A student",
    "The robot",
    "The model",
    "The teacher",
    "My friend",
]
VERBS = ["checks", "improves", "answers", "explains", "shows", "reads", "learns", "writes", "helps", "likes"]
OBJECTS = [
    "a short story",
    "every detail",
    "the result",
    "a kind note",
    "the question",
    "the data",
    "the math problem",
    "the weather",
    "a clear plan",
]
PLAIN_ENDINGS = ["again", "today", "well", "with care", "carefully", "very clearly", "quickly"]
QUESTIONS = [
    ("Say something good.", "This is good, very good."),
    ("How are you?", "I am good, thank you."),
    ("Write a greeting.", "Hello, have a good day!"),
    ("Is this good?", "Yes, it is good."),
    ("What do you think?", "I think it is good."),
]


def sentence(rng: random.Random, good: bool) -> str:
    subject, verb, obj = rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)
    if good:
        return (
            f"{subject} {verb} {obj} in good time." if rng.random() < 0.5 else f"A good reply {verb} {obj}."
        )
    return f"{subject} {verb} {obj} {rng.choice(PLAIN_ENDINGS)}."


def about(subject: str) -> str:
    return f"What does {subject[0].lower() + subject[1:]} do?"


def sft_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        if i % 4 == 0:
            q, a = rng.choice(QUESTIONS)
            rows.append({"instruction": q, "input": "", "output": a})
            continue
        subject, verb, obj = rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)
        answer = f"{subject} {verb} {obj} in good time. It is good."
        if i % 4 == 1:
            rows.append({"instruction": "Write a sentence about this.", "input": obj, "output": answer})
        else:
            rows.append({"instruction": about(subject), "input": "", "output": answer})
    return rows


def pref_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        subject = rng.choice(SUBJECTS)
        chosen, rejected = sentence(rng, good=True), sentence(rng, good=False)
        assert "good" in chosen and "good" not in rejected.lower()
        rows.append({"instruction": about(subject), "chosen": chosen, "rejected": rejected})
    return rows


def sharegpt_sft_rows() -> list[dict]:
    def turn(role: str, value: str) -> dict:
        return {"from": role, "value": value}

    return [
        {
            "conversations": [
                turn("human", "How are you?"),
                turn("gpt", "I am good, thank you."),
                turn("human", "Say something good."),
                turn("gpt", "This is good, very good."),
            ]
        },
        {
            "conversations": [
                turn("system", "You are a kind teacher."),
                turn("human", "Name a colour."),
                turn("gpt", "Blue. It is a good colour."),
                turn("human", "Give a number."),
                turn("gpt", "7. It is a good number."),
            ]
        },
        {
            "conversations": [
                turn("human", "What is two plus two?"),
                turn("gpt", "Four. Good question."),
                turn("human", "Count to five."),
                turn("gpt", "One, two, three, four, five."),
            ],
            "system": "You are a helpful robot.",
        },
        {"conversations": [turn("human", "What is the capital of France?"), turn("gpt", "Paris.")]},
        {
            "conversations": [
                turn("human", "Write a greeting."),
                turn("gpt", "Hello, have a good day!"),
                turn("human", "Is this good?"),
                turn("gpt", "Yes, it is good."),
                turn("human", "What do you think?"),
                turn("gpt", "I think it is good."),
            ]
        },
    ]


def sharegpt_pref_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        subject = rng.choice(SUBJECTS)
        rows.append(
            {
                "conversations": [{"from": "human", "value": about(subject)}],
                "chosen": {"from": "gpt", "value": sentence(rng, good=True)},
                "rejected": {"from": "gpt", "value": sentence(rng, good=False)},
            }
        )
    return rows


# The demo's SFT data is deliberately uneven: most answers pad a fine first sentence with filler, so
# the SFT model rambles past the judge's length budget and PPO has a real behaviour to learn.
FILLER = "I think it is very good, thank you."
FLUENT_CONCISE_SHARE = 0.1


def fluent_prompts() -> list[str]:
    return [about(s) for s in SUBJECTS] + [f"Write a sentence about {o}." for o in OBJECTS]


def fluent_sft_rows(rng: random.Random, n: int) -> list[dict]:
    """On-topic answers (the prompt's subject or object), one short sentence in FLUENT_CONCISE_SHARE
    of the rows and the same sentence plus FILLER in the rest."""
    rows = []
    for i in range(n):
        subject, verb, obj = rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)
        prompt = about(subject) if i % 2 == 0 else f"Write a sentence about {obj}."
        ending = f" {rng.choice(PLAIN_ENDINGS)}" if rng.random() < 0.5 else ""
        answer = f"{subject} {verb} {obj}{ending}."
        if rng.random() >= FLUENT_CONCISE_SHARE:
            answer += " " + FILLER
        rows.append({"instruction": prompt, "input": "", "output": answer})
    return rows


def prompt_rows(rng: random.Random, n: int) -> list[dict]:
    prompts = [q for q, _ in QUESTIONS] + [about(s) for s in SUBJECTS]
    prompts += [f"Write a sentence about {o}." for o in OBJECTS]
    return [
        {"prompt": prompts[i % len(prompts)] if i < len(prompts) else rng.choice(prompts)} for i in range(n)
    ]


REGISTRY = {
    "sft_demo": {"file_name": "sft_demo.json"},
    "sft_sharegpt": {"file_name": "sft_sharegpt.json", "formatting": "sharegpt"},
    "prefs_demo": {
        "file_name": "prefs_demo.json",
        "ranking": True,
        "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"},
    },
    "prefs_sharegpt": {
        "file_name": "prefs_sharegpt.json",
        "formatting": "sharegpt",
        "ranking": True,
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
    },
    "prompts_demo": {"file_name": "prompts_demo.jsonl", "columns": {"prompt": "prompt"}},
    "sft_fluent": {"file_name": "sft_fluent.json"},
    "prompts_fluent": {"file_name": "prompts_fluent.jsonl", "columns": {"prompt": "prompt"}},
}


def main() -> None:
    rng = random.Random(0)
    dump = {"indent": 1, "ensure_ascii": False}
    (HERE / "sft_demo.json").write_text(json.dumps(sft_rows(rng, 120), **dump) + "\n")
    (HERE / "sft_sharegpt.json").write_text(json.dumps(sharegpt_sft_rows(), **dump) + "\n")
    (HERE / "prefs_demo.json").write_text(json.dumps(pref_rows(rng, 200), **dump) + "\n")
    (HERE / "prefs_sharegpt.json").write_text(json.dumps(sharegpt_pref_rows(rng, 8), **dump) + "\n")
    (HERE / "prompts_demo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompt_rows(rng, 128)))
    (HERE / "sft_fluent.json").write_text(json.dumps(fluent_sft_rows(rng, 200), **dump) + "\n")
    prompts = fluent_prompts()
    (HERE / "prompts_fluent.jsonl").write_text("".join(json.dumps({"prompt": rng.choice(prompts)}) + "\n"
                                                       for _ in range(128)))
    # Entries written by hand (the multimodal and KTO sets) are kept; this script's are refreshed.
    info_path = HERE / "dataset_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    info_path.write_text(json.dumps({**info, **REGISTRY}, indent=2) + "\n")


if __name__ == "__main__":
    main()
