"""Chat templates against literal expected strings."""

from __future__ import annotations

import re

import pytest

from alignkit.data import ChatFormat, Example, encode_supervised, get_template
from alignkit.models.tiny import build_tokenizer

CONV = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "See you"},
]
QWEN_DEFAULT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


EXPECTED = {
    "chatml": (
        "<|im_start|>system\nBe kind.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nSee you<|im_end|>\n"
    ),
    "qwen": (
        "<|im_start|>system\nBe kind.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nSee you<|im_end|>\n"
    ),
    "qwen3": (
        "<|im_start|>system\nBe kind.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nSee you<|im_end|>\n"
    ),
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe kind.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nSee you<|eot_id|>"
    ),
    "empty": "Be kind.HiHelloByeSee you",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_multi_turn_render(name):
    assert get_template(name).render(CONV, system="Be kind.") == EXPECTED[name]


@pytest.mark.parametrize("name", ["chatml", "qwen", "qwen3", "llama3"])
def test_leading_system_message_is_the_system_prompt(name):
    messages = [{"role": "system", "content": "Be kind."}, *CONV]
    assert get_template(name).render(messages) == EXPECTED[name]


def test_generation_prompts():
    prompt = [{"role": "user", "content": "Hi"}]
    assert get_template("chatml").render(prompt, add_generation_prompt=True) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert get_template("llama3").render(prompt, add_generation_prompt=True) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_qwen_default_system_and_override():
    qwen = get_template("qwen")
    assert qwen.render(CONV[:2]) == (
        f"<|im_start|>system\n{QWEN_DEFAULT}<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    )
    overridden = qwen.render(CONV[:2], system="Answer in one word.")
    assert overridden.startswith("<|im_start|>system\nAnswer in one word.<|im_end|>\n")
    assert QWEN_DEFAULT not in overridden
    assert qwen.render(CONV[:2], system="").startswith("<|im_start|>user\nHi")


def test_qwen3_thinking_off_and_history_think_stripped():
    qwen3 = get_template("qwen3")
    prompt = [{"role": "user", "content": "Hi"}]
    assert qwen3.render(prompt, add_generation_prompt=True, enable_thinking=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert qwen3.render(prompt, add_generation_prompt=True, enable_thinking=True) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    conv = [dict(m) for m in CONV]
    conv[1]["content"] = "<think>\nsay hello\n</think>\n\nHello"
    conv[3]["content"] = "<think>\nsay bye\n</think>\n\nSee you"
    assert qwen3.render(conv) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nsay bye\n</think>\n\nSee you<|im_end|>\n"
    )
    # Thinking off: the final answer follows the same empty think block the model generates after.
    assert qwen3.render(CONV[:2], enable_thinking=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|im_end|>\n"
    )


def test_empty_template_supervised_appends_eos(tokenizer):
    ex = Example(messages=CONV)
    ids, labels = encode_supervised(ChatFormat.named(tokenizer, "empty"), ex, 512)
    assert tokenizer.decode(ids) == "Hi" + "Hello<|im_end|>" + "Bye" + "See you<|im_end|>"
    assert tokenizer.decode([t for t in labels if t != -100]) == "Hello<|im_end|>See you<|im_end|>"


def test_auto_matches_chatml_for_tiny_tokenizer(tokenizer):
    auto, chatml = get_template("auto", tokenizer), get_template("chatml")
    for system in (None, "Be kind."):
        assert auto.render(CONV, system=system) == chatml.render(CONV, system=system)
        assert auto.render(CONV[:3], system, add_generation_prompt=True) == chatml.render(
            CONV[:3], system, add_generation_prompt=True
        )
        ex = Example(messages=CONV, system=system)
        assert encode_supervised(ChatFormat(tokenizer, auto), ex, 512) == encode_supervised(
            ChatFormat(tokenizer, chatml), ex, 512
        )


def test_unknown_template_lists_known_names():
    with pytest.raises(ValueError, match="chatml.*llama3"):
        get_template("vicuna")


def test_auto_needs_a_chat_template(tokenizer):
    with pytest.raises(ValueError, match="chat_template"):
        get_template("auto", None)


# A cut-down Qwen3 chat_template: reasoning is dropped from turns before the last user query,
# the final turn always carries a think block, and thinking off adds an empty one.
QWEN3_LIKE = (
    "{%- set ns = namespace(last=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}{%- if m.role == 'assistant' -%}"
    "{%- set c = m.content.split('</think>')[-1].lstrip('\n') -%}"
    "{%- if loop.index0 > ns.last and loop.last and '</think>' not in m.content -%}"
    "{%- set c = '<think>\n\n</think>\n\n' + c -%}{%- endif -%}"
    "{{ '<|im_start|>assistant\n' + c + '<|im_end|>\n' }}"
    "{%- else -%}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{ '<think>\n\n</think>\n\n' }}"
    "{%- endif -%}{%- endif -%}"
)


@pytest.mark.parametrize(
    ("enable_thinking", "supervised"),
    [
        (None, ["Hello<|im_end|>", "<think>\n\n</think>\n\nSee you<|im_end|>"]),
        (False, ["Hello<|im_end|>", "See you<|im_end|>"]),
    ],
)
def test_auto_masks_a_template_that_rewrites_history(enable_thinking, supervised):
    tok = build_tokenizer()
    tok.chat_template = QWEN3_LIKE
    conv = [dict(m) for m in CONV]
    conv[1]["content"] = "<think>\nsay hello\n</think>\n\nHello"
    auto = get_template("auto", tok)
    segments = auto.segments(conv, None, False, enable_thinking, tokenizer=tok)
    assert "".join(text for text, _ in segments) == auto.render(conv, enable_thinking=enable_thinking)
    assert [text for text, sup in segments if sup] == supervised


# -- LLaMA-Factory's Qwen3 family, by its own rendering rules ------------------------------
# Written from LLaMA-Factory's data/template.py (read, not imported): every Qwen3-family template
# has the ChatML slots (user turn ends with the assistant header, assistant slot is
# "{content}<|im_end|>\n"); the reasoning ones (ReasoningTemplate) with enable_thinking on give a
# response without a thought an empty one in the response, with it off drop the thought and put
# the empty one in the prompt; the *_nothink ones have no think handling at all. qwen2_vl has a
# default system prompt, the Qwen3 ones none.
LF_THOUGHT = ("<think>\n", "\n</think>\n\n")
LF_REASONING = {"qwen3", "qwen3_vl", "qwen3_5", "qwen3_6", "qwen3_omni"}
LF_PLAIN = {"qwen3_nothink", "qwen3_vl_nothink", "qwen3_5_nothink", "qwen3_omni_nothink", "qwen2_vl"}
LF_DEFAULT_SYSTEM = {"qwen2_vl": "You are a helpful assistant."}


def lf_oneturn(name: str, system: str | None, user: str, response: str, enable_thinking: bool) -> tuple[str, str]:
    """(prompt, response) text as LLaMA-Factory's encode_oneturn builds it for one exchange."""
    system = system or LF_DEFAULT_SYSTEM.get(name, "")
    prompt = (f"<|im_start|>system\n{system}<|im_end|>\n" if system else "")
    prompt += f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    if name in LF_REASONING:
        if enable_thinking is False:
            response = re.sub(re.escape(LF_THOUGHT[0]) + "(.*?)" + re.escape(LF_THOUGHT[1]), "", response,
                              flags=re.DOTALL).lstrip("\n")
        if "<think>" not in response and "</think>" not in response:
            if enable_thinking:
                response = "".join(LF_THOUGHT) + response
            else:
                prompt += "".join(LF_THOUGHT)
    return prompt, response + "<|im_end|>\n"


@pytest.mark.parametrize("name", sorted(LF_REASONING | LF_PLAIN))
@pytest.mark.parametrize("enable_thinking", [True, False])
@pytest.mark.parametrize("response", ["4", "<think>\nadd them\n</think>\n\n4"])
@pytest.mark.parametrize("system", [None, "Be brief."])
def test_llamafactory_qwen_family_renders_byte_identical(name, enable_thinking, response, system, tokenizer):
    template = get_template(name)
    conv = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": response}]
    want_prompt, want_response = lf_oneturn(name, system, "What is 2 + 2?", response, enable_thinking)
    assert template.render(conv, system=system, enable_thinking=enable_thinking) == want_prompt + want_response
    segments = template.segments(conv, system, False, enable_thinking, tokenizer=tokenizer)
    supervised = "".join(text for text, sup in segments if sup)
    assert supervised + "\n" == want_response  # the newline after <|im_end|> is not trained on (turn_sep)
    generation = template.render(conv[:1], system=system, add_generation_prompt=True, enable_thinking=enable_thinking)
    assert generation == lf_oneturn(name, system, "What is 2 + 2?", "", enable_thinking)[0]


def test_qwen3_nothink_is_not_qwen3_with_thinking_off():
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert get_template("qwen3_nothink").render(conv, enable_thinking=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n")
    assert "<think>" in get_template("qwen3").render(conv, enable_thinking=False)


def test_template_names_did_you_mean_and_llamafactory_names_refused_with_the_way_out():
    with pytest.raises(ValueError, match=r"unknown template 'qwen3_nothnk'; did you mean 'qwen3_nothink'"):
        get_template("qwen3_nothnk")
    with pytest.raises(ValueError, match=r"'sailor' is LLaMA-Factory's.*template: auto"):
        get_template("sailor")


def test_a_qwen3_config_renders_as_llamafactory_by_default():
    """LLaMA-Factory's enable_thinking defaults to true; a config that does not set it gets the same text."""
    from alignkit.config import load_config

    base = ["stage=sft", "model_name_or_path=/m", "dataset=a", "output_dir=/o"]
    assert load_config(None, [*base, "template=qwen3"]).enable_thinking is True
    assert load_config(None, [*base, "template=qwen3_vl"]).enable_thinking is True
    assert load_config(None, [*base, "template=qwen3", "enable_thinking=false"]).enable_thinking is False
    assert load_config(None, [*base, "template=qwen3_nothink"]).enable_thinking is None
    assert load_config(None, [*base, "template=chatml"]).enable_thinking is None
