"""Dataset registry, row formats, encoding with label masks, collators."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from alignkit.data import (
    ChatFormat,
    DataError,
    Example,
    PairCollator,
    SFTCollator,
    encode_pair,
    encode_prompt,
    encode_supervised,
    encode_supervised_examples,
    get_template,
    load_examples,
    pad_left,
    split_train_val,
)
from alignkit.models.tiny import build_tokenizer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def write(tmp_path: Path, name: str, rows: list) -> str:
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return str(path)


def gpt(value: str, role: str = "gpt") -> dict:
    return {"from": role, "value": value}


def human(value: str) -> dict:
    return {"from": "human", "value": value}


# ---------------------------------------------------------------- row formats


def test_alpaca_rows(tmp_path):
    path = write(
        tmp_path,
        "a.json",
        [
            {"instruction": "Add", "input": "2 and 2", "output": "4", "system": "Be exact."},
            {"instruction": "Hi", "input": "", "output": "Hello", "history": [["Q1", "A1"], ["Q2", "A2"]]},
        ],
    )
    a, b = load_examples(path, None, "sft")
    assert a.messages == [{"role": "user", "content": "Add\n2 and 2"}, {"role": "assistant", "content": "4"}]
    assert a.system == "Be exact." and a.source == f"{path}:0"
    assert [m["content"] for m in b.messages] == ["Q1", "A1", "Q2", "A2", "Hi", "Hello"]
    assert [m["role"] for m in b.messages] == ["user", "assistant"] * 3


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"instruction": "Hi"}, "missing key 'output'"),
        ({"instruction": "Hi", "output": 3}, "must be a string"),
        ({"instruction": "  ", "output": "x"}, "is empty"),
        ({"instruction": "Hi", "output": "x", "history": [["only one"]]}, "pair"),
    ],
)
def test_alpaca_malformed_row_names_file_and_row(tmp_path, row, problem):
    path = write(tmp_path, "a.json", [{"instruction": "ok", "output": "fine"}, row])
    with pytest.raises(DataError) as err:
        load_examples(path, None, "sft")
    assert f"{path}: row 1:" in str(err.value) and problem in str(err.value)


def test_sharegpt_from_value_rows(tmp_path):
    path = write(
        tmp_path,
        "s.json",
        [
            {
                "conversations": [
                    gpt("Be brief.", "system"),
                    human("Hi"),
                    gpt("Hello"),
                    human("Bye"),
                    gpt("See you"),
                ]
            },
        ],
    )
    (ex,) = load_examples(path, None, "sft")
    assert ex.system == "Be brief."
    assert [(m["role"], m["content"]) for m in ex.messages] == [
        ("user", "Hi"),
        ("assistant", "Hello"),
        ("user", "Bye"),
        ("assistant", "See you"),
    ]


@pytest.mark.parametrize(
    ("conversation", "problem"),
    [
        ([human("Hi"), human("again"), gpt("Hello")], "does not alternate"),
        ([human("Hi"), gpt("Hello"), human("Bye")], "must end with an assistant turn"),
        ([human("Hi"), gpt("")], "empty"),
        ([human("Hi"), {"from": "robot", "value": "x"}], "unknown role 'robot'"),
    ],
)
def test_sharegpt_malformed_row_names_file_and_row(tmp_path, conversation, problem):
    rows = [{"conversations": [human("a"), gpt("b")]}] * 2 + [{"conversations": conversation}]
    path = write(tmp_path, "s.json", rows)
    with pytest.raises(DataError) as err:
        load_examples(path, None, "sft")
    assert f"{path}: row 2:" in str(err.value) and problem in str(err.value)


def test_openai_messages_rows_jsonl(tmp_path):
    ok = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
        ]
    }
    bad = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "   "}]}
    path = write(tmp_path, "m.jsonl", [ok, bad])
    with pytest.raises(DataError, match=r"m\.jsonl: row 1: message 1 has empty"):
        load_examples(path, None, "sft")
    (ex,) = load_examples(path, None, "sft", skip_bad_rows=True)
    assert ex.system == "S" and ex.messages[-1] == {"role": "assistant", "content": "Hello"}


@pytest.mark.parametrize("prompt_key", ["question", "prompt", "instruction"])
def test_preference_string_rows(tmp_path, prompt_key):
    path = write(
        tmp_path,
        "p.json",
        [
            {prompt_key: "Q", "chosen": "good", "rejected": "bad", "margin": 2},
            {prompt_key: "Q", "chosen": "good"},
        ],
    )
    with pytest.raises(DataError, match=r"p\.json: row 1: 'rejected' must be a string"):
        load_examples(path, None, "pairwise")
    (ex,) = load_examples(path, None, "pairwise", skip_bad_rows=True)
    assert ex.messages == [{"role": "user", "content": "Q"}]
    assert (ex.chosen, ex.rejected, ex.margin) == ("good", "bad", 2.0)


def test_preference_sharegpt_rows(tmp_path):
    path = write(
        tmp_path,
        "ps.json",
        [
            {
                "conversations": [human("Q1"), gpt("A1"), human("Q2")],
                "chosen": gpt("yes"),
                "rejected": gpt("no"),
            },
            {"conversations": [human("Q")], "chosen": human("yes"), "rejected": gpt("no")},
        ],
    )
    with pytest.raises(DataError, match=r"ps\.json: row 1: 'chosen' must be an assistant message"):
        load_examples(path, None, "pairwise")
    (ex,) = load_examples(path, None, "pairwise", skip_bad_rows=True)
    assert [m["content"] for m in ex.messages] == ["Q1", "A1", "Q2"]
    assert (ex.chosen, ex.rejected, ex.margin) == ("yes", "no", None)


def test_preference_data_is_not_sft_and_sft_data_is_not_pairwise(tmp_path):
    prefs = write(tmp_path, "p.json", [{"prompt": "Q", "chosen": "a", "rejected": "b"}])
    sft = write(tmp_path, "s.json", [{"instruction": "Q", "output": "a"}])
    with pytest.raises(DataError, match="cannot be used for sft"):
        load_examples(prefs, None, "sft")
    with pytest.raises(DataError, match="needs preference rows"):
        load_examples(sft, None, "pairwise")


def test_prompt_rows_and_labels(tmp_path):
    path = write(
        tmp_path,
        "q.jsonl",
        [
            {"prompt": "2+2?", "response": "4"},
            {"prompt": "3+3?", "labels": 6},
            {"prompt": "Hi"},
            {"prompt": ["not", "text"]},
        ],
    )
    with pytest.raises(DataError, match=r"q\.jsonl: row 3: 'prompt' \(instruction\) must be a string"):
        load_examples(path, None, "prompt")
    examples = load_examples(path, None, "prompt", skip_bad_rows=True)
    assert [e.label for e in examples] == ["4", "6", None]
    assert examples[0].messages == [{"role": "user", "content": "2+2?"}]
    query = write(tmp_path, "query.jsonl", [{"query": "Hey", "label": "hello"}])
    (ex,) = load_examples(query, None, "prompt")
    assert ex.messages == [{"role": "user", "content": "Hey"}] and ex.label == "hello"


def test_prompt_part_of_sft_rows(tmp_path):
    alpaca = write(tmp_path, "a.json", [{"instruction": "Q", "output": "A", "history": [["q0", "a0"]]}])
    (ex,) = load_examples(alpaca, None, "prompt")
    assert [m["content"] for m in ex.messages] == ["q0", "a0", "Q"] and ex.label == "A"
    sharegpt = write(tmp_path, "s.json", [{"conversations": [human("Q"), gpt("A")]}])
    (ex,) = load_examples(sharegpt, None, "prompt")
    assert ex.messages == [{"role": "user", "content": "Q"}] and ex.label == "A"


# ---------------------------------------------------------------- registry


def test_registry_columns_and_tags(tmp_path):
    write(
        tmp_path,
        "custom.json",
        [
            {
                "dialog": [
                    {"speaker": "U", "text": "Hi"},
                    {"speaker": "B", "text": "Hello"},
                    {"speaker": "T", "text": "result"},
                    {"speaker": "B", "text": "Done"},
                ],
                "sys": "Be kind.",
            },
        ],
    )
    write(tmp_path, "alp.json", [{"q": "Question", "ctx": "more", "a": "Answer"}])
    (tmp_path / "dataset_info.json").write_text(
        json.dumps(
            {
                "chat": {
                    "file_name": "custom.json",
                    "formatting": "sharegpt",
                    "columns": {"messages": "dialog", "system": "sys"},
                    "tags": {
                        "role_tag": "speaker",
                        "content_tag": "text",
                        "user_tag": "U",
                        "assistant_tag": "B",
                        "observation_tag": "T",
                    },
                },
                "alp": {"file_name": "alp.json", "columns": {"prompt": "q", "query": "ctx", "response": "a"}},
            }
        )
    )
    chat, alp = load_examples("chat, alp", str(tmp_path), "sft")
    assert chat.system == "Be kind."
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "tool", "assistant"]
    assert alp.messages[0]["content"] == "Question\nmore" and alp.messages[1]["content"] == "Answer"


def test_unknown_dataset_lists_known_names(tmp_path):
    with pytest.raises(
        DataError, match="known: .*prefs_demo, prefs_sharegpt, prompts_demo, prompts_fluent, sft_demo, sft_fluent, sft_sharegpt"
    ):
        load_examples("nope", str(EXAMPLES), "sft")


def test_bad_registry_entry(tmp_path):
    write(tmp_path, "x.json", [{"instruction": "a", "output": "b"}])
    (tmp_path / "dataset_info.json").write_text(
        json.dumps({"x": {"file_name": "x.json", "columns": {"videos": "v"}}})  # images are supported
    )
    with pytest.raises(DataError, match="'x'.*not supported"):
        load_examples("x", str(tmp_path), "sft")


def test_skip_bad_rows_logs_count(tmp_path, caplog):
    rows = [
        {"instruction": "a", "output": "b"},
        {"instruction": "a"},
        {"output": "b"},
        {"instruction": "c", "output": "d"},
    ]
    path = write(tmp_path, "a.json", rows)
    with caplog.at_level(logging.WARNING, logger="alignkit.data.loader"):
        examples = load_examples(path, None, "sft", skip_bad_rows=True)
    assert len(examples) == 2
    assert "skipped 2 malformed rows of 4" in caplog.text and "row 1" in caplog.text


def test_max_samples_per_dataset():
    examples = load_examples(["sft_demo", "sft_sharegpt"], str(EXAMPLES), "sft", max_samples=3)
    assert len(examples) == 6
    assert [e.source.rsplit(":", 1)[1] for e in examples] == ["0", "1", "2"] * 2


def register(tmp_path: Path, n_rows: int, **entry) -> str:
    write(tmp_path, "x.json", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(n_rows)])
    (tmp_path / "dataset_info.json").write_text(json.dumps({"x": {"file_name": "x.json", **entry}}))
    return str(tmp_path)


def test_num_samples_draws_rows_as_llamafactory(tmp_path):
    """num_samples: a shuffle of all rows cut to n; past the file's size every row once plus repeats;
    then max_samples cuts. The same rows every time (every rank)."""
    fewer = load_examples("x", register(tmp_path, 10, num_samples=4), "sft")
    assert len(fewer) == 4 and len({e.last_user_text() for e in fewer}) == 4
    assert [e.last_user_text() for e in fewer] == [e.last_user_text() for e in load_examples("x", str(tmp_path), "sft")]
    more = load_examples("x", register(tmp_path, 3, num_samples=7), "sft")
    assert len(more) == 7 and {e.last_user_text() for e in more} == {"q0", "q1", "q2"}
    assert len(load_examples("x", register(tmp_path, 10, num_samples=6), "sft", max_samples=2)) == 2


@pytest.mark.parametrize(("entry", "problem"), [
    ({"split": "test"}, r"split 'test' cannot be honoured: a local file is one 'train' split"),
    ({"num_samples": 0}, r"num_samples must be a whole number >= 1, got 0"),
    ({"num_samples": "5"}, r"num_samples must be a whole number >= 1, got '5'"),
])
def test_split_and_bad_num_samples_are_refused_clearly(tmp_path, entry, problem):
    with pytest.raises(DataError, match=rf"dataset 'x': {problem}"):
        load_examples("x", register(tmp_path, 3, **entry), "sft")
    assert load_examples("x", register(tmp_path, 3, split="train"), "sft")  # the one split a file has


def test_shipped_datasets():
    d = str(EXAMPLES)
    assert 60 <= len(load_examples("sft_demo", d, "sft")) <= 200
    assert len(load_examples("sft_sharegpt", d, "sft")) >= 3
    prefs = load_examples("prefs_demo", d, "pairwise")
    assert len(prefs) == 200
    assert all("good" in p.chosen and "good" not in p.rejected.lower() for p in prefs)
    assert len(load_examples("prefs_sharegpt", d, "pairwise")) >= 3
    assert 64 <= len(load_examples("prompts_demo", d, "prompt")) <= 200


def test_split_train_val_sizes_and_determinism():
    examples = [Example(messages=[], source=str(i)) for i in range(50)]
    train, val = split_train_val(examples, 0.1, seed=0)
    assert (len(train), len(val)) == (45, 5)
    assert split_train_val(examples, 0.1, seed=0) == (train, val)
    assert split_train_val(examples, 0.1, seed=1)[1] != val
    train, val = split_train_val(examples, 7, seed=0)
    assert (len(train), len(val)) == (43, 7)
    assert {e.source for e in train} | {e.source for e in val} == {str(i) for i in range(50)}
    assert split_train_val(examples, 0, seed=0) == (examples, [])
    with pytest.raises(ValueError):
        split_train_val(examples, 50, seed=0)
    with pytest.raises(ValueError):
        split_train_val(examples, 1.5, seed=0)


# ---------------------------------------------------------------- encoding


TWO_TURNS = Example(
    messages=[
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "I am good."},
        {"role": "user", "content": "Say something good."},
        {"role": "assistant", "content": "This is good."},
    ],
    system="Be kind.",
)


def supervised_spans(labels: list[int]) -> list[list[int]]:
    spans, current = [], []
    for t in labels:
        if t == -100:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(t)
    return spans + ([current] if current else [])


@pytest.mark.parametrize("name", ["chatml", "qwen", "auto"])
def test_sft_labels_are_exactly_the_assistant_turns(tokenizer, name):
    template = get_template(name, tokenizer)
    ids, labels = encode_supervised(ChatFormat(tokenizer, template), TWO_TURNS, 1024)
    assert len(ids) == len(labels)
    assert tokenizer.decode(ids) == template.render(TWO_TURNS.messages, system="Be kind.")
    spans = [tokenizer.decode(s) for s in supervised_spans(labels)]
    assert spans == ["I am good.<|im_end|>", "This is good.<|im_end|>"]


def test_sft_system_precedence(tokenizer):
    qwen = get_template("qwen")
    plain = Example(messages=TWO_TURNS.messages[:2])

    def text(ex: Example, default: str | None) -> str:
        return tokenizer.decode(encode_supervised(ChatFormat(tokenizer, qwen, default), ex, 512)[0])

    assert "You are Qwen" in text(plain, None)
    assert "<|im_start|>system\nBe short.<|im_end|>" in text(plain, "Be short.")
    assert "You are Qwen" not in text(plain, "Be short.")
    assert "<|im_start|>system\nBe kind.<|im_end|>" in text(TWO_TURNS, "Be short.")


def test_sft_truncation_keeps_beginning_and_drops_unsupervised(tokenizer, caplog):
    chatml = get_template("chatml")
    full, full_labels = encode_supervised(ChatFormat(tokenizer, chatml), TWO_TURNS, 1024)
    cutoff = next(i for i, t in enumerate(full_labels) if t != -100) + 2  # two answer tokens survive
    ids, labels = encode_supervised(ChatFormat(tokenizer, chatml), TWO_TURNS, cutoff)
    assert ids == full[:cutoff] and labels == full_labels[:cutoff]
    long_prompt = Example(
        messages=[{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "ok"}]
    )
    with caplog.at_level(logging.WARNING, logger="alignkit.data.encode"):
        features = encode_supervised_examples(ChatFormat(tokenizer, chatml), [TWO_TURNS, long_prompt], cutoff)
    assert len(features) == 1 and "dropped 1 of 2" in caplog.text


def test_prompt_encoding_ends_with_generation_prompt(tokenizer):
    chatml = get_template("chatml")
    ex = Example(messages=TWO_TURNS.messages[:3], system="Be kind.")
    ids = encode_prompt(ChatFormat(tokenizer, chatml), ex, 1024)
    assert tokenizer.decode(ids).endswith(
        "<|im_start|>user\nSay something good.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.decode(ids).startswith("<|im_start|>system\nBe kind.")
    qwen3_ids = encode_prompt(ChatFormat(tokenizer, get_template("qwen3"), enable_thinking=False), ex, 1024)
    assert tokenizer.decode(qwen3_ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_prompt_left_truncation(tokenizer):
    chatml = get_template("chatml")
    ex = Example(messages=TWO_TURNS.messages[:3], system="Be kind.")
    full = encode_prompt(ChatFormat(tokenizer, chatml), ex, 1024)
    cut = encode_prompt(ChatFormat(tokenizer, chatml), ex, 12)
    assert len(full) > 12 and cut == full[-12:]
    with pytest.raises(ValueError, match="must end with a user turn"):
        encode_prompt(ChatFormat(tokenizer, chatml), TWO_TURNS, 1024)


def test_pair_encoding(tokenizer):
    chatml = get_template("chatml")
    ex = Example(
        messages=[{"role": "user", "content": "Is this good?"}], chosen="Yes, it is good.", rejected="No."
    )
    chosen, rejected = encode_pair(ChatFormat(tokenizer, chatml), ex, 1024)
    prompt = encode_prompt(ChatFormat(tokenizer, chatml), ex, 1024)
    assert chosen[: len(prompt)] == prompt and rejected[: len(prompt)] == prompt
    assert tokenizer.decode(chosen[len(prompt) :]) == "Yes, it is good.<|im_end|>"
    assert tokenizer.decode(rejected[len(prompt) :]) == "No.<|im_end|>"
    short_c, short_r = encode_pair(ChatFormat(tokenizer, chatml), ex, 10)
    assert len(short_c) <= 10 and len(short_r) <= 10
    assert short_c[-1] == short_r[-1] == tokenizer.eos_token_id


# ---------------------------------------------------------------- collators


def test_pad_left():
    ids, mask = pad_left([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == torch.long


def test_sft_collator_right_pads():
    batch = SFTCollator(pad_id=0)(
        [
            {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
            {"input_ids": [8], "labels": [8]},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_pair_collator_common_length_and_margin():
    features = [
        {"chosen_ids": [1, 2, 3], "rejected_ids": [1, 2], "margin": 1.5},
        {"chosen_ids": [4], "rejected_ids": [4, 5, 6, 7]},
    ]
    batch = PairCollator(pad_id=0)(features)
    assert batch["chosen_input_ids"].tolist() == [[1, 2, 3, 0], [4, 0, 0, 0]]
    assert batch["rejected_attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["margin"].tolist() == [1.5, 0.0]
    assert "margin" not in PairCollator(pad_id=0)([{"chosen_ids": [1], "rejected_ids": [2]}])
