"""The chat template written into an export: jinja that renders exactly like the run's ``Template``."""

from __future__ import annotations

import json

from alignkit.data.templates import EMPTY_THINK, TEMPLATES, Template


def _lit(s: str | None) -> str:
    """A jinja string literal (JSON escaping is valid jinja escaping)."""
    return "none" if s is None else json.dumps(s, ensure_ascii=False)


def template_jinja(template: Template, default_system: str | None, eos_token: str) -> str:
    """A jinja ``chat_template`` that renders exactly like ``template.render`` (with the eos token
    closing assistant turns where the template has no end-of-turn marker, as in training)."""
    system = template.default_system if default_system is None else default_system
    eot = template.eot if template.eot is not None else eos_token
    head, tail = template.system.split("{content}")
    parts = [
        f"{{%- set default_system = {_lit(system)} -%}}",
        f"{{{{- {_lit(template.prefix)} -}}}}",
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}{%- set system = default_system -%}{%- set loop_messages = messages -%}{%- endif -%}",
        f"{{%- if system -%}}{{{{- {_lit(head)} + system + {_lit(tail)} -}}}}{{%- endif -%}}",
        "{%- set ns = namespace(last_user=-1) -%}"
        "{%- for m in loop_messages -%}{%- if m['role'] != 'assistant' -%}{%- set ns.last_user = loop.index0 -%}"
        "{%- endif -%}{%- endfor -%}",
        "{%- for m in loop_messages -%}",
    ]
    for role in ("user", "tool"):
        before, after = getattr(template, role).split("{content}")
        keyword = "if" if role == "user" else "elif"
        parts.append(f"{{%- {keyword} m['role'] == '{role}' -%}}{{{{- {_lit(before)} + m['content'] + {_lit(after)} -}}}}")
    parts.append("{%- elif m['role'] == 'assistant' -%}{%- set content = m['content'] -%}")
    if template.thinking:
        # Qwen3 drops the reasoning of turns before the latest user query; thinking off marks
        # answers without a thought with an empty think block (Template.segments).
        parts.append(
            "{%- if loop.index0 < ns.last_user and '</think>' in content -%}"
            "{%- set content = content.split('</think>')[-1].lstrip() -%}"
            "{%- elif enable_thinking is defined and enable_thinking is false and '<think>' not in content -%}"
            f"{{%- set content = {_lit(EMPTY_THINK)} + content -%}}{{%- endif -%}}"
        )
    parts += [
        f"{{{{- {_lit(template.assistant_start)} + content + {_lit(eot + template.turn_sep)} -}}}}",
        "{%- endif -%}{%- endfor -%}",
        f"{{%- if add_generation_prompt -%}}{{{{- {_lit(template.assistant_start)} -}}}}",
    ]
    if template.thinking:
        parts.append(f"{{%- if enable_thinking is defined and enable_thinking is false -%}}{{{{- {_lit(EMPTY_THINK)} -}}}}{{%- endif -%}}")
    parts.append("{%- endif -%}")
    return "".join(parts)


def system_override_jinja(chat_template: str, default_system: str) -> str:
    """Wrap a tokenizer's own template so a conversation without a system message gets ``default_system``."""
    return (
        "{%- if not (messages and messages[0]['role'] == 'system') -%}"
        f"{{%- set messages = [{{'role': 'system', 'content': {_lit(default_system)}}}] + messages -%}}"
        "{%- endif -%}" + chat_template
    )


def export_chat_template(tokenizer, template_name: str, default_system: str | None) -> str | None:
    """The chat template to save, or ``None`` to keep the tokenizer's own."""
    if template_name in TEMPLATES:
        return template_jinja(TEMPLATES[template_name], default_system, tokenizer.eos_token or "")
    if default_system is not None and getattr(tokenizer, "chat_template", None):
        return system_override_jinja(tokenizer.chat_template, default_system)
    return None
