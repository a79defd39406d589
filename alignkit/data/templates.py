"""Chat templates: how a conversation becomes text, and which spans of it are trained on.

A built-in template is a row of data (``TEMPLATES``), not a code branch: format strings for
each role, the end-of-turn marker, and a default system prompt. ``auto`` defers to the
tokenizer's own jinja ``chat_template`` and recovers the assistant spans by rendering
prefixes of the conversation and diffing them.

Both kinds expose ``segments``: the rendered text cut into ``(text, supervised)`` pieces,
which the encoder tokenises piece by piece to build label masks.
"""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

Segments = list[tuple[str, bool]]

# Qwen3 emits this after the generation prompt when thinking is switched off, so the model
# answers directly (Qwen3 chat_template, `enable_thinking` branch).
EMPTY_THINK = "<think>\n\n</think>\n\n"
_THINK_BLOCK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)


class _ChatTemplate:
    """What every template shares: the call signature, a leading system message taken as the
    system prompt, and empty pieces dropped. A subclass renders already-split messages."""

    def segments(
        self, messages: list[dict], system: str | None = None,
        add_generation_prompt: bool = False, enable_thinking: bool | None = None, tokenizer: Any = None,
    ) -> Segments:
        """Render to ``(text, supervised)`` pieces, none of them empty."""
        messages, system = _split_system(messages, system)
        out = self._segments(messages, system, add_generation_prompt, enable_thinking, tokenizer)
        return [(text, sup) for text, sup in out if text]

    def render(
        self, messages: list[dict], system: str | None = None,
        add_generation_prompt: bool = False, enable_thinking: bool | None = None,
    ) -> str:
        """The conversation as one string."""
        messages, system = _split_system(messages, system)
        return self._render(messages, system, add_generation_prompt, enable_thinking)

    def _segments(
        self, messages: list[dict], system: str | None, gen: bool, enable_thinking: bool | None, tokenizer: Any
    ) -> Segments:
        raise NotImplementedError

    def _render(self, messages: list[dict], system: str | None, gen: bool, enable_thinking: bool | None) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Template(_ChatTemplate):
    """A chat format as data. ``{content}`` in a slot is replaced by the message text.

    An assistant turn renders as ``assistant_start + content + eot + turn_sep``; the content
    and ``eot`` are supervised, ``turn_sep`` (a newline in ChatML) is not, as in the model's
    own generation where decoding stops at ``eot``.
    """

    name: str
    system: str  # slot for the system prompt
    user: str
    tool: str  # slot for tool / observation results
    assistant_start: str  # the generation prompt
    eot: str | None  # end-of-turn marker; None: the encoder appends tokenizer.eos_token
    turn_sep: str = ""
    prefix: str = ""  # emitted once before everything (e.g. <|begin_of_text|>)
    default_system: str | None = None
    thinking: bool = False  # Qwen3-style <think> handling

    def _segments(
        self, messages: list[dict], system: str | None, gen: bool, enable_thinking: bool | None, tokenizer: Any
    ) -> Segments:
        """``system=None`` uses the template's default; ``""`` renders no system block. With
        ``tokenizer`` given and ``eot is None``, each response is followed by its eos token."""
        system = self.default_system if system is None else system
        eot = self.eot if self.eot is not None else (tokenizer.eos_token if tokenizer is not None else "")
        last_user = max((i for i, m in enumerate(messages) if m["role"] != "assistant"), default=-1)
        out: Segments = []
        prompt = self.prefix
        if system:
            prompt += self.system.replace("{content}", system)
        for i, m in enumerate(messages):
            role, content = m["role"], m["content"]
            if role == "user":
                prompt += self.user.replace("{content}", content)
            elif role == "tool":
                prompt += self.tool.replace("{content}", content)
            elif role == "assistant":
                prompt += self.assistant_start
                if self.thinking:
                    extra, content = _think_turn(content, i < last_user, enable_thinking)
                    prompt += extra
                out.append((prompt, False))
                out.append((content + eot, True))
                prompt = self.turn_sep
            else:
                raise ValueError(f"template {self.name!r}: unsupported role {role!r} at message {i}")
        if gen:
            prompt += self.assistant_start
            if self.thinking and enable_thinking is False:
                prompt += EMPTY_THINK
        out.append((prompt, False))
        return out

    def _render(self, messages: list[dict], system: str | None, gen: bool, enable_thinking: bool | None) -> str:
        # Without a tokenizer: for ``empty`` (eot None), no eos tokens.
        return "".join(text for text, _ in self._segments(messages, system, gen, enable_thinking, None))


def _think_turn(content: str, history: bool, enable_thinking: bool | None) -> tuple[str, str]:
    """A thinking template's assistant turn: ``(added to the prompt, the response)``.

    LLaMA-Factory's ``ReasoningTemplate`` and the Qwen3 chat_template agree: reasoning of turns
    before the latest user query is dropped; thinking off drops the thought and puts the empty
    think block in the (unsupervised) prompt; thinking on gives a response without a thought the
    empty think block as part of the response. ``None`` renders the response as the data has it.
    """
    if history:
        return "", _THINK_BLOCK.sub("", content).lstrip("\n")
    if enable_thinking is False:
        return EMPTY_THINK, _THINK_BLOCK.sub("", content).lstrip("\n")
    if enable_thinking and "<think>" not in content and "</think>" not in content:
        return "", EMPTY_THINK + content
    return "", content


def _turn_slots(header: str, end: str, tool_role: str = "tool") -> dict[str, str]:
    """The role slots of a format whose every turn is ``header`` (naming the role) + content + ``end``."""

    def turn(role: str) -> str:
        return header.format(role=role) + "{content}" + end

    return dict(system=turn("system"), user=turn("user"), tool=turn(tool_role),
                assistant_start=header.format(role="assistant"))


CHATML = dict(**_turn_slots("<|im_start|>{role}\n", "<|im_end|>\n"), eot="<|im_end|>", turn_sep="\n")
QWEN_TOOL = "<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n"

TEMPLATES: dict[str, Template] = {
    "chatml": Template(name="chatml", **CHATML),
    "qwen": Template(
        name="qwen",
        **{**CHATML, "tool": QWEN_TOOL},
        default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    ),
    "qwen2_vl": Template(name="qwen2_vl", **{**CHATML, "tool": QWEN_TOOL}, default_system="You are a helpful assistant."),
    "qwen3": Template(name="qwen3", **{**CHATML, "tool": QWEN_TOOL}, thinking=True),
    # LLaMA-Factory's qwen3_nothink: the Qwen3 slots without any think handling (no empty think block).
    "qwen3_nothink": Template(name="qwen3_nothink", **{**CHATML, "tool": QWEN_TOOL}),
    "llama3": Template(
        name="llama3",
        prefix="<|begin_of_text|>",
        **_turn_slots("<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>", tool_role="ipython"),
        eot="<|eot_id|>",
    ),
    "empty": Template(
        name="empty", system="{content}", user="{content}", tool="{content}", assistant_start="", eot=None
    ),
}


class AutoTemplate(_ChatTemplate):
    """The tokenizer's own ``chat_template``, rendered with ``tokenizer.apply_chat_template``."""

    name = "auto"

    def __init__(self, tokenizer: Any):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "template 'auto' needs a tokenizer with a chat_template; "
                f"set template to one of {sorted(TEMPLATES)} instead"
            )
        self.tokenizer = tokenizer

    def _apply(self, messages: list[dict], add_generation_prompt: bool, enable_thinking: bool | None) -> str:
        kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )

    def _render(self, messages: list[dict], system: str | None, gen: bool, enable_thinking: bool | None) -> str:
        # system=None leaves the tokenizer template's own default in place.
        msgs = ([{"role": "system", "content": system}] if system else []) + messages
        return self._apply(msgs, gen, enable_thinking)

    def _segments(
        self, messages: list[dict], system: str | None, gen: bool, enable_thinking: bool | None, tokenizer: Any
    ) -> Segments:
        """Assistant spans found by diffing: ``render(msgs[:i], gen)`` is the prompt of turn i.

        The response ends where ``render(msgs[:i+1])`` ends; its trailing whitespace after the
        end-of-turn marker is not supervised. Templates that rewrite earlier turns (Qwen3
        strips old reasoning) fall back to the tokenizer's eos token as the end of the turn.
        """
        head = [{"role": "system", "content": system}] if system else []
        full = self.render(head + messages, None, gen, enable_thinking)
        out: Segments = []
        pos = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self._apply(head + messages[:i], True, enable_thinking)
            if not full.startswith(prompt):
                # Thinking off adds an empty think block to the generation prompt, but
                # Qwen3 renders earlier turns without one.
                prompt = self._apply(head + messages[:i], True, None)
            if not full.startswith(prompt) or len(prompt) < pos:
                raise ValueError(
                    f"template 'auto': the chat_template does not render turn {i}'s prompt as a "
                    "prefix of the conversation; use a built-in template instead"
                )
            end = self._turn_end(head + messages[: i + 1], full, len(prompt), enable_thinking)
            response = full[len(prompt) : end].rstrip()
            out.append((full[pos : len(prompt)], False))
            out.append((response, True))
            pos = len(prompt) + len(response)
        out.append((full[pos:], False))
        return out

    def _turn_end(self, upto: list[dict], full: str, start: int, enable_thinking: bool | None) -> int:
        text = self._apply(upto, False, enable_thinking)
        if full.startswith(text) and len(text) > start:
            return len(text)
        eos = self.tokenizer.eos_token
        found = full.find(eos, start) if eos else -1
        if found < 0:
            raise ValueError(
                "template 'auto': cannot find the end of an assistant turn; use a built-in template"
            )
        return found + len(eos)


def _split_system(messages: list[dict], system: str | None) -> tuple[list[dict], str | None]:
    """A leading system message counts as the system prompt unless one is passed explicitly."""
    if messages and messages[0]["role"] == "system":
        return messages[1:], system if system is not None else messages[0]["content"]
    return messages, system


# LLaMA-Factory template names: the built-in with the same format, or ``auto`` (the model's own
# chat_template, which is what those formats were copied from) where alignkit has no built-in.
LLAMAFACTORY_TEMPLATES = {
    "default": "auto", "alpaca": "auto", "vicuna": "auto", "llama2": "auto", "llama2_zh": "auto",
    "llama3": "llama3", "llama4": "auto", "mistral": "auto", "mistral_small": "auto", "ministral": "auto",
    "gemma": "auto", "gemma2": "auto", "gemma3": "auto", "glm4": "auto", "chatglm3": "auto",
    "deepseek": "auto", "deepseek3": "auto", "deepseekr1": "auto", "phi": "auto", "phi_small": "auto",
    "phi4": "auto", "yi": "chatml", "qwen": "qwen", "qwen2_vl": "qwen2_vl", "qwen3": "qwen3",
    # The Qwen3 family renders a conversation's text with the same slots; they differ in the vision
    # plugin (images are the model processor's business here) and in tool-call formats.
    "qwen3_nothink": "qwen3_nothink", "qwen3_vl": "qwen3", "qwen3_vl_nothink": "qwen3_nothink",
    "qwen3_5": "qwen3", "qwen3_5_nothink": "qwen3_nothink", "qwen3_6": "qwen3",
    "qwen3_omni": "qwen3", "qwen3_omni_nothink": "qwen3_nothink", "chatml": "chatml", "chatml_de": "auto", "empty": "empty", "baichuan2": "auto",
    "internlm2": "auto", "intern2": "auto", "cohere": "auto", "falcon": "auto", "olmo": "auto", "granite3": "auto",
    "starchat": "auto", "zephyr": "auto", "openchat": "auto", "openchat-3.6": "auto", "orion": "auto",
    "xverse": "auto", "yuan": "auto", "codegeex4": "auto", "gpt_oss": "auto", "hunyuan": "auto", "kimi_vl": "auto",
}


# LLaMA-Factory's other template names (its data/template.py, August 2026): no built-in here renders
# them, so they are refused with the way out (``auto``) rather than guessed at.
LLAMAFACTORY_OTHER_TEMPLATES = frozenset("""
    bailing bailing_v2 breeze cpm4 dbrx hy3 deepseekcoder dots_ocr ernie ernie_nothink ernie_vl exaone falcon_h1
    fewshot gemma3n gemma4 gemma4n glm4_moe glm4v glm4_5v glm_ocr glm4_7 glmz1 granite3_vision granite4 index
    hunyuan_small hy_dense_1_8b hy_dense_7b intern_vl intern_s1 keye_vl lfm2 lfm2_vl mllama moonlight moss_vl llava
    llava_next llava_next_llama3 llava_next_mistral llava_next_qwen llava_next_yi llava_next_video
    llava_next_video_mistral llava_next_video_yi mimo mimo_v2 mimo_vl minicpm_v minicpm_v_4_6 minicpm_o minimax1
    minimax2 ministral3 opencoder paligemma paligemma_chat phi4_mini pixtral qwen2_audio qwen2_omni sailor
    seed_coder seed_oss smollm smollm2 solar telechat2 video_llava xuanyuan yi_vl youtu youtu_vl aeva
""".split())


def known_template_names() -> list[str]:
    """Every name ``template`` accepts: alignkit's own and LLaMA-Factory's."""
    return sorted({"auto", *TEMPLATES, *LLAMAFACTORY_TEMPLATES})


def get_template(name: str, tokenizer: Any = None) -> Template | AutoTemplate:
    """A built-in template by name, ``'auto'`` for the tokenizer's own chat_template, or a
    LLaMA-Factory template name mapped to one of those (with a note saying which)."""
    if name not in TEMPLATES and name in LLAMAFACTORY_TEMPLATES:
        mapped = LLAMAFACTORY_TEMPLATES[name]
        how = "the tokenizer's own chat_template" if mapped == "auto" else f"the built-in {mapped!r} template"
        logger.info("template %r (LLaMA-Factory's name): using %s", name, how)
        name = mapped
    if name == "auto":
        return AutoTemplate(tokenizer)
    if name not in TEMPLATES:
        raise ValueError(unknown_template_message(name))
    return TEMPLATES[name]


def is_thinking_template(name: str) -> bool:
    """A built-in template (by its name or LLaMA-Factory's) whose model writes ``<think>`` blocks."""
    name = LLAMAFACTORY_TEMPLATES.get(name, name) if name not in TEMPLATES else name
    return name in TEMPLATES and TEMPLATES[name].thinking


def unknown_template_message(name: str) -> str:
    """One paragraph for a template name alignkit does not know, with the closest known names."""
    known = known_template_names()
    if name in LLAMAFACTORY_OTHER_TEMPLATES:
        return (f"template {name!r} is LLaMA-Factory's, and no built-in template here renders the same text. "
                "Set template: auto to render with the model's own chat_template (which LLaMA-Factory's "
                f"templates are copied from), or one of: {', '.join(known)}")
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown template {name!r}{hint} Set template to one of: {', '.join(known)}"
