"""Build the configured reward source, wrapped the same way whichever kind it is.

The only place that knows which kinds exist (``reward_model_type``); callers get a
``RewardSource`` (or the trainer's ``RewardService``) and never branch on the kind.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from alignkit.rewards.api.client import PROBE_ANSWER, PROBE_PROMPT, build_api_reward
from alignkit.rewards.base import RewardSource, Score, ScoreMeta
from alignkit.rewards.cache import ScoreCache, identity_of
from alignkit.rewards.rules import RuleReward
from alignkit.rewards.spec import RewardContext, RewardSpec
from alignkit.rewards.text import ThinkFilter, decode_for_reward, joint_responses
from alignkit.rewards.wrappers import CacheScores, CountFailures, StripThink

HealthCheck = Callable[[], Coroutine[Any, Any, Score]]


@dataclass
class BuiltReward:
    """A wrapped reward source, and the start-up probe of its judge when it has one enabled."""

    source: CountFailures
    health_check: HealthCheck | None


def build_reward(spec: RewardSpec, context: RewardContext, policy_model=None) -> BuiltReward:
    """``reward_model_type`` → rule | api | lora (RM adapter on ``policy_model``'s base) | full (own model),
    wrapped as ``CountFailures(StripThink(CacheScores(source)))`` where configured."""
    source, identity, health_check = _bare_source(spec, context, policy_model)
    if spec.reward_cache:
        source = CacheScores(source, ScoreCache(spec.reward_cache), identity)
    if spec.strip_think:
        source = StripThink(source, ThinkFilter(spec.think_tags, spec.think_truncated, spec.think_truncated_score))
    return BuiltReward(CountFailures(source), health_check)


def templated_probe(context: RewardContext) -> ScoreMeta:
    """The start-up probe as the trainer would send it: the probe question in the run's chat
    template and system prompt, the answer "4" with its end-of-turn token, decoded jointly."""
    from alignkit.data.chat_format import ChatFormat  # tokenizer and templates: only for a full-text judge
    from alignkit.data.encode import encode_prompt
    from alignkit.data.loader import Example
    from alignkit.models.loading import load_tokenizer

    tokenizer = load_tokenizer(context.base_model)
    fmt = ChatFormat.of(context, tokenizer)
    query = encode_prompt(fmt, Example(messages=[{"role": "user", "content": PROBE_PROMPT}]), context.cutoff_len)
    eot = getattr(fmt.template, "eot", None) or tokenizer.eos_token or ""
    response = tokenizer.encode(PROBE_ANSWER + eot, add_special_tokens=False)
    return ScoreMeta(labels=[PROBE_ANSWER], templated_prompts=decode_for_reward(tokenizer, [query], True),
                     full_responses=joint_responses(tokenizer, [query], [response]))


def build_reward_source(spec: RewardSpec, context: RewardContext, policy_model=None) -> RewardSource:
    """The configured source with its wrappers (for ``compare``, ``score`` and tests)."""
    return build_reward(spec, context, policy_model).source


def _bare_source(
    spec: RewardSpec, context: RewardContext, policy_model
) -> tuple[RewardSource, str, HealthCheck | None]:
    """The source itself, its cache identity (what a score means), and its enabled start-up probe."""
    kind = spec.reward_model_type
    if kind == "rule":
        rule = RuleReward(spec.reward_model)
        return rule, identity_of({"rule": rule.name}), None
    if kind == "api":
        api = build_api_reward(spec.api_settings())
        if not api.cfg.health_check:
            return api, api.identity, None
        # A full-text judge (llamafactory, openrlhf) is probed with a templated sample, as it will be
        # scored: a server that parses chat markers rejects a bare "What is 2 + 2?4".
        probe_meta = templated_probe(context) if api.preset.full_text and context.base_model else None
        return api, api.identity, partial(api.health_check, probe_meta)
    from alignkit.rewards.model import build_model_reward  # torch and transformers: only when an RM is used

    rm = build_model_reward(spec, context, policy_model)
    return rm, identity_of({"reward_model": str(Path(spec.reward_dir).resolve()), "type": kind}), None
