"""Health checks: small pure functions over a run's metric series, each returning a ``Check``.

Every check looks at one symptom and says ``ok``, ``warn`` or ``fail`` with the numbers that led
to it, or ``n/a`` when the metrics it needs were not logged (or the run is too short to judge a
trend). Windows are over logged points in step order: "last third" is the last ceil(n/3) points,
"first/last decile" the first/last max(1, n // 10).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from statistics import fmean, median

from alignkit.report.data import Series, ratio_series

OK, WARN, FAIL, NA = "ok", "warn", "fail", "n/a"
SEVERITY = {NA: 0, OK: 0, WARN: 1, FAIL: 2}

MIN_TREND_POINTS = 5  # fewer logged points than this: trend checks say n/a
KL_BAND = (0.01, 0.05)  # nats per token; the usual rule of thumb for a policy that learns but stays close
KL_FAIL = 0.2  # per-token KL this far above the band is runaway drift
CLIPFRAC_WARN, CLIPFRAC_FAIL = 0.3, 0.5
REWARD_RISE_MIN = 0.1  # last-minus-first decile, in units of the reward std: less is "flat"
REWARD_DROP_FAIL = 0.5  # ending this many stds below the start is a collapse
REWARD_PEAK_DROP = 1.0  # falling this many stds from the best decile is worth a look
ENTROPY_FAIL_RATIO, ENTROPY_WARN_RATIO, ENTROPY_FLOOR = 0.1, 0.25, 0.01
VALUE_LOSS_WARN, VALUE_LOSS_FAIL = 3.0, 10.0  # last-third median / first-third median, while growing
LENGTH_MIN_TOKENS, LENGTH_MAX_FRAC, LENGTH_RATIO = 2.0, 0.95, 3.0
FRAC_WARN, FRAC_FAIL = 0.2, 0.5  # no-EOS and truncated-thought fractions
GROUP_ZERO_WARN, GROUP_ZERO_FAIL = 0.5, 0.9  # share of groups whose rewards are all equal
FAILURE_WARN, FAILURE_FAIL, FAILURE_WORST_STEP = 0.05, 0.2, 0.5
LOSS_DIVERGE = 2.0  # SFT/RM: last-decile loss over first-decile loss
RM_CHANCE, RM_OVERFIT_GAP = 0.55, 0.15
LOGPS_DROP_WARN, LOGPS_DROP_FAIL = 0.25, 1.0  # DPO/KTO: chosen log-probs falling by this share of their start
# Metrics whose NaN/inf means the run is broken (explained variance or latency may be NaN legitimately).
MUST_BE_FINITE = ("ppo/loss/", "train/loss", "eval/loss", "train/grad_norm", "env/reward_mean", "objective/kl")

Metrics = dict[str, Series]


@dataclass(frozen=True)
class Check:
    name: str
    verdict: str  # ok | warn | fail | n/a
    detail: str


def _vals(m: Metrics, key: str) -> list[float] | None:
    s = m.get(key)
    vals = s.finite() if s is not None else []
    return vals or None


def _last_third(v: list[float]) -> list[float]:
    return v[-math.ceil(len(v) / 3):]


def _first_third(v: list[float]) -> list[float]:
    return v[: math.ceil(len(v) / 3)]


def _decile(v: list[float]) -> int:
    return max(1, len(v) // 10)


def _missing(name: str, *keys: str) -> Check:
    return Check(name, NA, f"not logged (or never finite): {', '.join(keys)}")


def _too_short(name: str, n: int) -> Check:
    return Check(name, NA, f"only {n} logged point(s); a trend needs {MIN_TREND_POINTS}")


def _series(m: Metrics, name: str, key: str, trend: bool = False, logged: tuple[str, ...] = ()
            ) -> list[float] | Check:
    """The finite values of ``key``, or check ``name``'s n/a verdict: none logged (naming ``logged``,
    what ``key`` is derived from, if given) or, for a ``trend``, fewer than MIN_TREND_POINTS."""
    v = _vals(m, key)
    if v is None:
        return _missing(name, *(logged or (key,)))
    if trend and len(v) < MIN_TREND_POINTS:
        return _too_short(name, len(v))
    return v


def _decile_medians(v: list[float]) -> tuple[float, float]:
    """Medians of the first and of the last decile."""
    k = _decile(v)
    return median(v[:k]), median(v[-k:])


def _frac(v: list[float], pred: Callable[[float], bool]) -> float:
    return sum(map(pred, v)) / len(v)


def check_kl_band(m: Metrics, settings: dict[str, float]) -> Check:
    name, (lo, hi) = "kl_band", KL_BAND
    # Judged as a trend: step 1 has KL 0 by construction (policy == reference).
    kl = _series(m, name, "objective/kl_per_token", trend=True, logged=("objective/kl", "rollout/response_len_mean"))
    if isinstance(kl, Check):
        return kl
    tail = _last_third(kl)
    med, above, below = median(tail), _frac(tail, lambda x: x > hi), _frac(tail, lambda x: x < lo)
    where = f"median {med:.3g} nats/token over the last third"
    if above > 0.5:
        return Check(name, FAIL if med > KL_FAIL else WARN,
                     f"per-token KL above {hi} in {above:.0%} of the last third ({where}); the policy drifts "
                     "from the reference: raise init_kl_coef, lower ppo_target or learning_rate")
    if below > 0.5:
        hint = ("negative KL means rollout sampling and log-probs disagree: check temperature/top_k/top_p"
                if med < -lo / 2 else "the policy barely moves: lower init_kl_coef or raise learning_rate")
        return Check(name, WARN, f"per-token KL below {lo} in {below:.0%} of the last third ({where}); {hint}")
    return Check(name, OK, f"{where}, within {lo}-{hi}")


def _score_spread(m: Metrics) -> float | None:
    """Median within-batch std of the scores (``env/reward_std``), when logged and non-zero."""
    stds = [s for s in (_vals(m, "env/reward_std") or []) if s > 0]
    return median(stds) if stds else None


def check_reward_trend(m: Metrics, settings: dict[str, float]) -> Check:
    name = "reward_trend"
    if isinstance(r := _series(m, name, "env/reward_mean", trend=True), Check):
        return r
    k = _decile(r)
    first, last = fmean(r[:k]), fmean(r[-k:])
    peak = max(fmean(r[i:i + k]) for i in range(len(r) - k + 1))
    # Scale by the within-batch spread of scores when logged: a rise is meaningful relative to it.
    scale = _score_spread(m) or math.sqrt(fmean([(x - fmean(r)) ** 2 for x in r])) or 1.0
    rise, drop = (last - first) / scale, (peak - last) / scale
    nums = f"first decile {first:.3g} -> last decile {last:.3g}, peak {peak:.3g}, std {scale:.3g}"
    if rise < -REWARD_DROP_FAIL:
        return Check(name, FAIL, f"reward collapsed ({rise:+.2f} std; {nums}); look for reward hacking, "
                                 "truncated thoughts or failing scores around the drop")
    if drop > REWARD_PEAK_DROP:
        return Check(name, WARN, f"reward fell {drop:.2f} std from its peak ({nums})")
    if rise < REWARD_RISE_MIN:
        return Check(name, WARN, f"reward flat ({rise:+.2f} std, want > {REWARD_RISE_MIN}; {nums}); "
                                 "check the reward signal, learning_rate and KL coefficient")
    return Check(name, OK, f"reward rose {rise:+.2f} std ({nums})")


def check_entropy(m: Metrics, settings: dict[str, float]) -> Check:
    name = "entropy"
    ent = _vals(m, "ppo/policy/entropy")
    if ent is None:  # objective/entropy is summed over the response; make it per token
        seq, length = m.get("objective/entropy"), m.get("rollout/response_len_mean")
        if seq is None or length is None:
            return _missing(name, "ppo/policy/entropy")
        ent = ratio_series(seq, length).finite() or None
        if ent is None:
            return _missing(name, "ppo/policy/entropy")
    if len(ent) < MIN_TREND_POINTS:
        return _too_short(name, len(ent))
    start, end = _decile_medians(ent)
    if start <= 0:
        return Check(name, NA, f"starting entropy {start:.3g} is not positive")
    ratio = end / start
    nums = f"per-token entropy {start:.3g} -> {end:.3g} nats ({ratio:.0%} of start)"
    if ratio < ENTROPY_FAIL_RATIO or end < ENTROPY_FLOOR:
        return Check(name, FAIL, f"entropy collapsed: {nums}; the policy became near-deterministic "
                                 "(raise init_kl_coef, add ent_coef, lower learning_rate)")
    if ratio < ENTROPY_WARN_RATIO:
        return Check(name, WARN, f"entropy falling fast: {nums}")
    return Check(name, OK, nums)


def check_value_loss(m: Metrics, settings: dict[str, float]) -> Check | None:
    name = "value_loss"
    if _vals(m, "ppo/loss/value") is None and "group/zero_std_frac" in m:
        return None  # a critic-free run has no value head to check
    if isinstance(vl := _series(m, name, "ppo/loss/value", trend=True), Check):
        return vl
    early, late = median(_first_third(vl)), median(_last_third(vl))
    ratio = late / max(early, 1e-12)
    growing = _slope(_last_third(vl)) > 0
    nums = f"value loss median {early:.3g} (first third) -> {late:.3g} (last third), x{ratio:.2g}"
    if ratio > VALUE_LOSS_WARN and growing:
        return Check(name, FAIL if ratio > VALUE_LOSS_FAIL else WARN,
                     f"value loss diverging: {nums} and still growing; lower learning_rate or "
                     "cliprange_value, or enable ppo_score_norm")
    return Check(name, OK, nums)


def _slope(v: list[float]) -> float:
    """Least-squares slope of ``v`` against its index."""
    if len(v) < 2:
        return 0.0
    xm, ym = (len(v) - 1) / 2, fmean(v)
    return sum((i - xm) * (y - ym) for i, y in enumerate(v)) / sum((i - xm) ** 2 for i in range(len(v)))


def check_response_length(m: Metrics, settings: dict[str, float]) -> Check:
    name = "response_length"
    if isinstance(length := _series(m, name, "rollout/response_len_mean"), Check):
        return length
    late, max_new = median(_last_third(length)), settings.get("max_new_tokens")
    nums = f"mean response length {late:.3g} tokens over the last third"
    if late < LENGTH_MIN_TOKENS:
        return Check(name, FAIL, f"responses collapsed to ~1 token ({nums}); the policy found a degenerate answer")
    if max_new and late >= LENGTH_MAX_FRAC * max_new:
        return Check(name, FAIL, f"responses hit the limit ({nums}, max_new_tokens {max_new:g}); "
                                 "set missing_eos_penalty or raise max_new_tokens")
    if len(length) >= MIN_TREND_POINTS:
        start = median(length[:_decile(length)])
        ratio = late / start if start > 0 else math.inf
        if ratio > LENGTH_RATIO or ratio < 1 / LENGTH_RATIO:
            verb = "grew" if ratio > 1 else "shrank"
            return Check(name, WARN, f"responses {verb} x{ratio:.2g} ({start:.3g} -> {late:.3g} tokens); "
                                     "check whether the reward favours length")
        nums += f", x{ratio:.2g} of the start"
    return Check(name, OK, nums)


def _threshold_check(name: str, key: str, what: str, hint: str, warn: float = FRAC_WARN, fail: float = FRAC_FAIL,
                     fmt: str = ".0%") -> Callable[[Metrics, dict[str, float]], Check]:
    """A check of ``key``'s median over the last third: above ``warn`` warns, above ``fail`` fails.
    ``hint`` follows the numbers (with its own lead-in punctuation); ``fmt`` formats the values."""
    def check(m: Metrics, settings: dict[str, float]) -> Check:
        if isinstance(v := _series(m, name, key), Check):
            return v
        med = median(_last_third(v))
        detail = f"median {what} {med:{fmt}} over the last third"
        if med > warn:
            return Check(name, FAIL if med > fail else WARN, f"{detail} (> {warn:{fmt}}){hint}")
        return Check(name, OK, f"{detail} (<= {warn:{fmt}})")

    check.__name__ = f"check_{name}"
    return check


check_clipfrac = _threshold_check(
    "clipfrac", "ppo/policy/clipfrac", "policy clip fraction",
    ": updates are too large; lower learning_rate, ppo_epochs or cliprange",
    warn=CLIPFRAC_WARN, fail=CLIPFRAC_FAIL, fmt=".3g")
check_no_eos = _threshold_check(
    "no_eos", "rollout/no_eos_frac", "share of responses without EOS",
    "; responses run into max_new_tokens: raise it or set missing_eos_penalty")
_group_signal = _threshold_check(
    "group_signal", "group/zero_std_frac", "share of groups with equal rewards (no learning signal)",
    "; the task is too easy or too hard for the policy: raise num_generations or temperature, or change the reward",
    warn=GROUP_ZERO_WARN, fail=GROUP_ZERO_FAIL)


def check_group_signal(m: Metrics, settings: dict[str, float]) -> Check | None:
    """Critic-free runs: a group whose responses all score the same has zero advantage (no signal)."""
    return _group_signal(m, settings) if "group/zero_std_frac" in m else None


check_think_truncated = _threshold_check(
    "think_truncated", "rollout/think_truncated_frac", "share of responses cut inside <think>",
    "; thoughts use up the token budget: raise max_new_tokens or turn thinking off")


IS_DRIFT_WARN, IS_DRIFT_FAIL = 0.2, 0.5  # |mean importance ratio - 1|, last third
IS_CUT_WARN, IS_CUT_FAIL = 0.05, 0.2  # share of tokens truncated (TIS) or dropped (MIS), last third


def check_is_weights(m: Metrics, settings: dict[str, float]) -> Check | None:
    """Off-policy runs (async_level, an engine's log-probs): the importance ratio pi / pi_behaviour
    should stay near 1; far from it, the samples are too stale or the engine's weights are not the
    policy's, and the correction truncates (or drops) much of the batch."""
    ratio = _vals(m, "is/ratio_mean")
    if ratio is None:
        return None
    cut = _vals(m, "is/clipped_frac") or [0.0]
    dropped = _vals(m, "is/masked_frac") or [0.0]
    drift = median(abs(r - 1) for r in _last_third(ratio))
    lost = max(median(_last_third(cut)), median(_last_third(dropped)))
    nums = f"mean ratio off 1 by {drift:.3f}, {lost:.1%} of tokens truncated or dropped (last third)"
    if drift > IS_DRIFT_WARN or lost > IS_CUT_WARN:
        bad = drift > IS_DRIFT_FAIL or lost > IS_CUT_FAIL
        return Check("is_weights", FAIL if bad else WARN, f"{nums}; samples are too far off-policy: lower "
                     "async_level or ppo_epochs, or check the engine's weight sync (rollout.sync_tolerance)")
    return Check("is_weights", OK, nums)


SCORE_LEN_CORR_WARN, SCORE_LEN_CORR_FAIL = 0.5, 0.8  # score-length correlation, while length grows
LENGTH_GROWTH_HACK = 1.5  # last-third median length over the first decile's
REPEAT_WARN, REPEAT_FAIL = 0.1, 0.3  # repeated 3-gram share of responses, last third
DISTINCT_WARN, DISTINCT_FAIL = 0.5, 0.2  # distinct-2 of a batch (mode collapse), last third
PROBE_DRIFT = 0.1  # probe score change, as a share of its first value (or of 1 when that is ~0)


def check_score_length(m: Metrics, settings: dict[str, float]) -> Check:
    """Hacking by length: the score follows length (within each batch) and the policy makes answers longer."""
    name = "score_length"
    if isinstance(corr := _series(m, name, "rollout/score_len_corr", trend=True), Check):
        return corr
    length = _vals(m, "rollout/response_len_mean") or [1.0]
    r, growth = median(_last_third(corr)), median(_last_third(length)) / max(median(length[:_decile(length)]), 1e-9)
    nums = f"score-length correlation r={r:.2f} (last-third median), length x{growth:.2g} of the start"
    if r > SCORE_LEN_CORR_WARN and growth > LENGTH_GROWTH_HACK:
        return Check(name, FAIL if r > SCORE_LEN_CORR_FAIL else WARN,
                     f"{nums}: the reward pays for length and the policy lengthens its answers (length hacking); "
                     "set overlong_buffer_len, a length budget in the reward, or raise init_kl_coef")
    return Check(name, OK, f"{nums}: length is not what the policy is optimising")


@dataclass(frozen=True)
class _Degradation:
    """A text statistic that gets worse as the run goes on: judged on its last third against its
    first decile (so a model that always repeated a little is not blamed for it)."""

    name: str
    key: str
    what: str  # how the numbers read, "{start} -> {late}" formatted with ``fmt``
    fmt: str
    worse: Callable[[float, float], bool]  # (start, late) -> has it degraded?
    fail: Callable[[float], bool]  # late -> bad enough to fail
    meaning: str  # what it means and what to change

    def __call__(self, m: Metrics, settings: dict[str, float]) -> Check:
        if isinstance(v := _series(m, self.name, self.key, trend=True), Check):
            return v
        start, late = median(v[:_decile(v)]), median(_last_third(v))
        nums = f"{self.what} {start:{self.fmt}} -> {late:{self.fmt}} (first decile -> last third)"
        if self.worse(start, late):
            return Check(self.name, FAIL if self.fail(late) else WARN, f"{nums}: {self.meaning}")
        return Check(self.name, OK, nums)


# Degenerate repetition ("good good good"): the reward pays for repeating itself.
check_repetition = _Degradation(
    "repetition", "rollout/repeat_3gram_frac", "repeated 3-gram share of responses", ".0%",
    lambda start, late: late > REPEAT_WARN and late > 2 * start, lambda late: late > REPEAT_FAIL,
    "answers repeat themselves more as the reward rises (degenerate text); set score_repetition_penalty, "
    "penalise repetition in the reward, or raise init_kl_coef")
# Mode collapse: every response of a batch alike, whatever each one reads like.
check_diversity = _Degradation(
    "diversity", "rollout/distinct_2", "distinct-2 of a batch", ".2f",
    lambda start, late: late < DISTINCT_WARN and late < 0.75 * start, lambda late: late < DISTINCT_FAIL,
    "the responses converge on the same few phrases (mode collapse); raise init_kl_coef or temperature, "
    "add ent_coef, or lower learning_rate")


def check_reward_probe(m: Metrics, settings: dict[str, float]) -> Check | None:
    """Fixed reference answers re-scored by the judge (``reward_probe``): their score must not move,
    and a policy scoring well above them is more likely gaming the judge than beating the references."""
    name = "reward_probe"
    if "probe/score_mean" not in m:
        return None  # no reward_probe configured
    if isinstance(probe := _series(m, name, "probe/score_mean"), Check):
        return probe
    drift = (max(probe) - min(probe)) / max(abs(probe[0]), 1.0)
    nums = f"probe score {probe[0]:.3g} -> {probe[-1]:.3g} over {len(probe)} probes"
    if drift > PROBE_DRIFT:
        return Check(name, FAIL, f"{nums} (moved {drift:.0%}): the judge scores the same answers differently "
                                 "now (model or rubric changed mid-run); pin the judge's version, restart the run")
    reward = _vals(m, "env/reward_mean")
    if reward and len(reward) >= MIN_TREND_POINTS:
        ahead = (fmean(reward[-_decile(reward):]) - fmean(probe)) / (_score_spread(m) or 1.0)
        if ahead > REWARD_PEAK_DROP:
            return Check(name, WARN, f"{nums}; the policy now scores {ahead:.2f} std above the reference answers: "
                                     "read the top samples for reward hacking before trusting the reward")
    return Check(name, OK, f"{nums}: the judge is stable and the policy does not outscore the references")


PROBE_RANK_WARN, PROBE_RANK_FAIL = 0.9, 0.7  # Spearman of the probe's scores with its first probe


def check_probe_rank_agreement(m: Metrics, settings: dict[str, float]) -> Check | None:
    """The reward probe's answers must keep their order (``probe/spearman_vs_first``): a judge that
    reshuffles fixed answers has changed, even when their mean has not."""
    name = "probe_rank_agreement"
    if "probe/spearman_vs_first" not in m:
        return None
    rho = [v for v in m["probe/spearman_vs_first"].values if math.isfinite(v)]
    if not rho:
        return Check(name, NA, "fewer than 3 probe answers scored twice, or all scored alike: no rank to compare")
    low = min(rho)
    step = m["probe/spearman_vs_first"].steps[m["probe/spearman_vs_first"].values.index(low)]
    nums = f"Spearman vs the first probe: lowest {low:.2f} (step {step}), last {rho[-1]:.2f}, over {len(rho)} probes"
    if low < PROBE_RANK_FAIL:
        return Check(name, FAIL, f"{nums}: the judge orders the same answers differently now; pin its model and "
                                 "rubric, then restart the run")
    if low < PROBE_RANK_WARN:
        return Check(name, WARN, f"{nums}: the judge's order of the fixed answers moved; check its version and "
                                 "temperature")
    return Check(name, OK, f"{nums}: the judge keeps its order")


def check_judge_canaries(m: Metrics, settings: dict[str, float]) -> Check | None:
    """Degenerate answers (``canary/<name>``, alignkit/rewards/canaries.py) must score below the median
    real response of the same step; one that does not is a master key the policy can learn."""
    name = "judge_canaries"
    if "canary/real_median" not in m:
        return None  # canaries off (judge_canaries: false, or not an api judge)
    real = dict(zip(m["canary/real_median"].steps, m["canary/real_median"].values, strict=True))
    keys = sorted(k for k in m if k.startswith("canary/") and k not in ("canary/real_median", "canary/failures"))
    hits, highest = [], None  # (margin, canary, score, median, step)
    for key in keys:
        for step, value in zip(m[key].steps, m[key].values, strict=True):
            med = real.get(step, math.nan)
            if not (math.isfinite(value) and math.isfinite(med)):
                continue
            row = (value - med, key.removeprefix("canary/"), value, med, step)
            highest = max(highest or row, row)
            if value >= med:
                hits.append(row)
    if highest is None:
        return Check(name, WARN, "no canary got a score (every canary call failed, or no real response was "
                                 "valid): the judge's blind spots are unknown; see canaries.jsonl and reward failures")
    if hits:
        _, canary, value, med, step = max(hits)
        others = sorted({h[1] for h in hits} - {canary})
        return Check(name, FAIL, f"canary {canary!r} (reply {_canary_reply(canary)}) scored {value:.3g} at step {step}, "
                                 f"at or above the median real response ({med:.3g})"
                                 + (f"; also {', '.join(others)}" if others else "")
                                 + ": the judge rewards a degenerate answer the policy can learn; fix the rubric "
                                 "(ask for a score of 0 for empty or off-topic answers) or use a stronger judge "
                                 "(canaries.jsonl has every canary score)")
    _, canary, value, med, step = highest
    return Check(name, OK, f"{len(keys)} canaries scored below the median real response at every probe "
                           f"(closest: {canary!r} {value:.3g} vs {med:.3g} at step {step})")


def _canary_reply(name: str) -> str:
    from alignkit.rewards.canaries import describe  # the report does not import the trainer; rewards is light

    return describe(name)


def check_reward_failures(m: Metrics, settings: dict[str, float]) -> Check:
    name = "reward_failures"
    rate = _vals(m, "reward/failure_rate")
    if rate is None:
        counts = _vals(m, "reward/failures")
        if counts is None:
            return _missing(name, "reward/failures")
        if sum(counts) == 0:
            return Check(name, OK, "no failed scores")
        return Check(name, WARN, f"{sum(counts):.0f} failed scores; no config with the rollout batch size, so no rate")
    mean_rate, worst = fmean(rate), max(rate)
    nums = f"{mean_rate:.1%} of scores failed on average (worst step {worst:.0%})"
    if mean_rate > FAILURE_WARN:
        return Check(name, FAIL if mean_rate > FAILURE_FAIL else WARN,
                     f"{nums}; check the judge's logs, timeout and rate limits (docs/reward_api.md)")
    if worst > FAILURE_WORST_STEP:
        return Check(name, WARN, f"{nums}; at least one step lost most of its scores")
    return Check(name, OK, nums)


def check_non_finite(m: Metrics, settings: dict[str, float]) -> Check:
    name = "non_finite"
    keys = sorted(k for k in m if k.startswith(MUST_BE_FINITE))
    if not keys:
        return _missing(name, "losses")
    bad = []
    for k in keys:
        s = m[k]
        first = next((step for step, v in zip(s.steps, s.values, strict=True) if not math.isfinite(v)), None)
        if first is not None:
            bad.append(f"{k} (first at step {first})")
    if bad:
        return Check(name, FAIL, "NaN/inf in " + ", ".join(bad) + "; lower learning_rate, check fp16 overflow")
    return Check(name, OK, f"{len(keys)} loss/reward series all finite")


def check_loss_trend(m: Metrics, settings: dict[str, float]) -> Check:
    name = "loss_trend"
    if isinstance(loss := _series(m, name, "train/loss", trend=True), Check):
        return loss
    start, end = _decile_medians(loss)
    nums = f"train/loss {start:.3g} (first decile) -> {end:.3g} (last decile)"
    if end > LOSS_DIVERGE * start:
        return Check(name, FAIL, f"loss diverging: {nums}; lower learning_rate or raise warmup")
    if end > start:
        return Check(name, WARN, f"loss not decreasing: {nums}")
    return Check(name, OK, nums)


def check_rm_accuracy(m: Metrics, settings: dict[str, float]) -> Check:
    name = "rm_accuracy"
    ev, tr = _vals(m, "eval/accuracy"), _vals(m, "train/accuracy")
    if ev is None and tr is None:
        return _missing(name, "eval/accuracy", "train/accuracy")
    acc, which = (ev[-1], "final eval") if ev else (median(_last_third(tr)), "train (last third)")
    nums = f"{which} accuracy {acc:.1%}"
    if acc <= RM_CHANCE:
        return Check(name, FAIL, f"{nums}: no better than chance; check chosen/rejected order and the data")
    if ev and tr and median(_last_third(tr)) - acc > RM_OVERFIT_GAP:
        return Check(name, WARN, f"{nums} vs train {median(_last_third(tr)):.1%}: overfitting; "
                                 "fewer epochs or more data")
    return Check(name, OK, nums)


def _decile_check(name: str, key: str, verdict: Callable[[float, float], tuple[str, str]]
                  ) -> Callable[[Metrics, dict[str, float]], Check]:
    """A trend check of ``key``: ``verdict(first-decile median, last-decile median)`` gives the
    verdict and what follows the numbers (with its own lead-in punctuation)."""
    def check(m: Metrics, settings: dict[str, float]) -> Check:
        if isinstance(v := _series(m, name, key, trend=True), Check):
            return v
        start, end = _decile_medians(v)
        what, hint = verdict(start, end)
        return Check(name, what, f"{key.removeprefix('train/')} {start:.3g} (first decile) -> {end:.3g} (last decile){hint}")

    check.__name__ = f"check_{name}"
    return check


def _margins_verdict(start: float, end: float) -> tuple[str, str]:
    """DPO/KTO: the implicit reward margin (chosen minus rejected) should grow."""
    if end > start:
        return OK, ""
    return FAIL if end < 0 else WARN, ": margins not rising; check the chosen/rejected order, raise learning_rate or pref_beta"


def _chosen_logps_verdict(start: float, end: float) -> tuple[str, str]:
    """DPO/KTO: the known failure where the margin grows while the chosen answer's log-prob falls too."""
    drop = (start - end) / max(abs(start), 1e-6)
    if drop <= LOGPS_DROP_WARN:
        return OK, f", {-drop:+.0%}"
    return (FAIL if drop > LOGPS_DROP_FAIL else WARN,
            f", {-drop:+.0%}: chosen log-probs collapsing, the margin grows by pushing both answers down; "
            "lower learning_rate, raise pref_beta or add pref_ftx")


check_pref_margins = _decile_check("pref_margins", "train/rewards/margins", _margins_verdict)
check_chosen_logps = _decile_check("chosen_logps", "train/logps/chosen", _chosen_logps_verdict)


STAGE_CHECKS: dict[str, list[Callable[[Metrics, dict[str, float]], Check | None]]] = {
    "ppo": [check_kl_band, check_clipfrac, check_reward_trend, check_entropy, check_value_loss,
            check_response_length, check_no_eos, check_think_truncated, check_reward_failures, check_group_signal,
            check_score_length, check_repetition, check_diversity, check_reward_probe, check_is_weights,
            check_judge_canaries, check_probe_rank_agreement, check_non_finite],
    "sft": [check_loss_trend, check_non_finite],
    "rm": [check_loss_trend, check_rm_accuracy, check_non_finite],
    "dpo": [check_loss_trend, check_pref_margins, check_chosen_logps, check_non_finite],
    "kto": [check_loss_trend, check_pref_margins, check_chosen_logps, check_non_finite],
}


def run_checks(metrics: Metrics, settings: dict[str, float], stage: str) -> list[Check]:
    """The checks that apply to ``stage`` and to this run (a check returns None where it does not,
    e.g. the value loss of a critic-free run), in report order. ``settings``: numeric config keys."""
    results = (check(metrics, settings) for check in STAGE_CHECKS.get(stage, [check_non_finite]))
    return [c for c in results if c is not None]


def worst(checks: list[Check]) -> str:
    """The run's overall verdict: the most severe of its checks (ok if none applied)."""
    return max((c.verdict for c in checks if c.verdict != NA), key=SEVERITY.__getitem__, default=OK)
