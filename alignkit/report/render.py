"""``report.html`` (self-contained: inline CSS, PNGs as data URIs) plus the PNGs under ``report/``."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from statistics import median

import yaml

from alignkit.report import health
from alignkit.report.data import Run, Series, load_run, rollout_batch_size
from alignkit.report.health import NA, Check, run_checks, worst

# Metric -> what the curve shows and what healthy looks like. Curves appear in this order.
EXPLAIN: dict[str, str] = {
    # PPO
    "env/reward_mean": "Mean score of each rollout batch. Healthy: rises, then plateaus; a sudden drop is a collapse.",
    "env/reward_std": "Spread of scores within a batch. Healthy: stays clearly above 0; near 0 the policy gets no signal.",
    "objective/kl": "KL from the reference, summed over the response (nats). Healthy: grows slowly, then levels off.",
    "objective/kl_per_token": "KL per response token (computed by the report). Healthy: inside the shaded 0.01-0.05 band.",
    "objective/kl_coef": "Weight of the KL penalty. Adaptive: rises when KL is above ppo_target, falls below it.",
    "ppo/loss/policy": "Clipped policy-gradient loss. Noisy around 0 is normal; no trend is expected.",
    "ppo/loss/value": "Value-head (critic) loss. Healthy: falls early, then stays low; steady growth means divergence.",
    "ppo/loss/total": "Policy loss + vf_coef x value loss (- entropy bonus). Follows whichever term dominates.",
    "ppo/policy/approxkl": "How far one update moves the policy (per token). Healthy: small, about 0.001-0.05.",
    "ppo/policy/clipfrac": "Share of tokens whose probability ratio hit the clip. Healthy: below ~0.2; above 0.3 steps are too big.",
    "ppo/val/clipfrac": "Share of value predictions clipped. Healthy: low; high means returns move faster than the critic.",
    "ppo/policy/entropy": "Per-token entropy of the policy (nats). Healthy: declines slowly; a fall to ~0 is collapse.",
    "objective/entropy": "Entropy of the sampled responses, summed over tokens. Tracks response length and diversity.",
    "ppo/returns/mean": "Mean GAE return the critic is trained towards. Should follow the reward.",
    "ppo/val/mean": "Mean value prediction. Healthy: tracks the returns curve.",
    "ppo/val/explained_variance": "How much of the returns' variance the critic explains. Healthy: rises towards 1; below 0 is worse than a constant.",
    "ppo/mean_scores": "Mean score after normalisation/clipping, as used in the shaped reward.",
    "ppo/mean_non_score_reward": "Mean KL penalty part of the shaped reward (negative). Grows in size with KL.",
    "ppo/advantages_mean": "Mean advantage before whitening. Near 0 once the critic has learned.",
    "ppo/learning_rate": "Learning rate schedule.",
    "rollout/response_len_mean": "Mean response length (tokens). Healthy: stable or slowly changing; ~1 token or the max is a failure.",
    "rollout/no_eos_frac": "Share of responses that ended without EOS (cut at max_new_tokens). Healthy: below 0.2.",
    "rollout/think_truncated_frac": "Share of responses cut inside <think>, before any answer. Healthy: near 0.",
    "rollout/repeat_3gram_frac": "Share of each response's 3-grams that repeat an earlier one. Healthy: low and flat; rising is \"good good good\" hacking.",
    "rollout/distinct_2": "Distinct bigrams / all bigrams over a batch. Healthy: stable; a fall means every answer looks alike (mode collapse).",
    "rollout/score_len_corr": "Correlation of score and length within a batch. Near 1 with growing length: the reward pays for length.",
    "probe/score_mean": "Judge score of the fixed reward_probe answers. Healthy: flat; a move means the judge changed.",
    "reward/failures": "Scores that failed per step (timeouts, HTTP errors, unparsable replies). Healthy: 0.",
    "reward/failure_rate": "Failed scores / rollout batch size. Healthy: below 0.05; above 0.2 the reward is unreliable.",
    "reward/retries": "Judge requests retried per step. Occasional retries are fine; many mean an overloaded judge.",
    "reward/cache_hits": "Scores served from the cache per step. High when the policy repeats itself.",
    "reward/latency_p50": "Median judge latency per request (s). Healthy: flat; growth means the judge is saturated.",
    "reward/latency_p95": "95th-percentile judge latency (s). Spikes here slow every step (see time/score_wait).",
    "time/step": "Wall time of one step (s). Healthy: flat.",
    "time/step_cpu": "CPU time of one step, all threads (s): its cost on a machine shared with other work.",
    "perf/tokens_per_s": "Response tokens generated and trained on per second. Healthy: flat.",
    # SFT / RM
    "train/loss": "Training loss. Healthy: falls quickly, then slowly; spikes or a rise mean the learning rate is too high.",
    "eval/loss": "Held-out loss. Healthy: falls with train/loss; rising while train/loss falls is overfitting.",
    "train/learning_rate": "Learning rate schedule (warmup, then decay).",
    "train/grad_norm": "Gradient norm before clipping. Healthy: bounded; repeated spikes precede divergence.",
    "train/accuracy": "Share of training pairs where chosen scores above rejected. Healthy: rises well above 0.5.",
    "eval/accuracy": "Held-out pair accuracy. Healthy: well above 0.5 and close to train/accuracy.",
    "eval/margin": "Mean score(chosen) - score(rejected) on held-out pairs. Healthy: positive and rising.",
    "eval/chosen": "Mean score of chosen responses.",
    "eval/rejected": "Mean score of rejected responses; should sit below eval/chosen.",
}
BANDS = {"objective/kl_per_token": health.KL_BAND}
# Dashed lines at the thresholds the health checks use (a config key names a per-run limit).
LIMITS: dict[str, list[float | str]] = {
    "ppo/policy/clipfrac": [health.CLIPFRAC_WARN], "rollout/no_eos_frac": [health.FRAC_WARN],
    "rollout/think_truncated_frac": [health.FRAC_WARN],
    "reward/failure_rate": [health.FAILURE_WARN, health.FAILURE_FAIL],
    "rollout/response_len_mean": ["max_new_tokens"],
    "rollout/repeat_3gram_frac": [health.REPEAT_WARN], "rollout/distinct_2": [health.DISTINCT_WARN],
    "rollout/score_len_corr": [health.SCORE_LEN_CORR_WARN],
}
FRONTIER = ("Reward against KL to the reference, one point per step (darker = later). The frontier a user tunes "
            "along: a KL coefficient or target that buys reward with little KL is healthy; reward that keeps "
            "climbing only with ever more KL is usually the policy gaming the reward.")
SAMPLE_COLUMNS = ("step", "pick", "score", "KL", "length", "prompt", "response")
TIMINGS = [  # metric, label, how to aggregate
    ("time/step", "step", "median"), ("time/rollout", "rollout (generate + forward passes)", "median"),
    ("time/generate", "generate (part of rollout)", "median"), ("time/score_wait", "waiting for scores", "median"),
    ("time/update", "PPO update", "median"), ("perf/tokens_per_s", "tokens/s", "median"),
    ("perf/peak_rss_mb", "peak RSS (MB)", "max"),
]
VERDICT_COLOURS = {"ok": "#1a7f37", "warn": "#9a6700", "fail": "#cf222e", "n/a": "#6e7781"}
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1180px;margin:24px auto;padding:0 16px;color:#1f2328}
h1{font-size:1.5em}h2{margin-top:1.6em;border-bottom:1px solid #d0d7de;padding-bottom:4px}
table{border-collapse:collapse}td,th{padding:4px 10px;border-bottom:1px solid #eaeef2;text-align:left;vertical-align:top}
.v{font-weight:600;color:#fff;border-radius:4px;padding:1px 8px;font-size:.85em;white-space:nowrap}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:14px}
figure{margin:0;border:1px solid #d0d7de;border-radius:6px;padding:8px}figure img{width:100%}
figcaption{font-size:.88em;color:#424a53}pre{background:#f6f8fa;padding:10px;overflow:auto;font-size:.85em}
.muted{color:#6e7781}td.resp{font-family:ui-monospace,monospace;font-size:.85em;max-width:520px}td.crit{font-size:.85em;white-space:nowrap}
"""


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html``, ``run_dir/report/*.png`` and ``report/health.json``; return the HTML path."""
    return render(*report_health(run_dir))


def report_health(run_dir: str | Path) -> tuple[Run, list[Check]]:
    """The loaded run and its checks, without writing anything."""
    run = load_run(run_dir)
    return run, run_checks(run.metrics, run.settings, run.stage)


def render(run: Run, checks: list[Check]) -> Path:
    out = run.run_dir / "report"
    out.mkdir(exist_ok=True)
    figures = [(key, _plot(key, run.metrics[key], out, run.settings)) for key in _plotted(run)]
    if (frontier := _frontier_plot(run, out)) is not None:
        figures.insert(1, ("frontier", frontier))
    if (timeline := _timeline_plot(run, out)) is not None:
        figures.append(("timeline", timeline))
    (out / "health.json").write_text(json.dumps(
        {"verdict": worst(checks), "checks": [c.__dict__ for c in checks]}, indent=2))
    path = run.run_dir / "report.html"
    path.write_text(_html(run, checks, figures))
    return path


def _plotted(run: Run) -> list[str]:
    return [k for k in EXPLAIN if k in run.metrics and run.metrics[k].finite()]


def _plot(key: str, s: Series, out: Path, settings: dict[str, float]) -> bytes:
    """Raw curve (faint) plus a trailing moving average over ~10% of the run; returns the PNG."""
    from matplotlib.figure import Figure  # the Agg canvas, without pyplot's global state

    pts = [(x, y) for x, y in zip(s.steps, s.values, strict=True) if math.isfinite(y)]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    fig = Figure(figsize=(5.2, 2.9), dpi=80)
    ax = fig.subplots()
    if key in BANDS:
        ax.axhspan(*BANDS[key], color="#2da44e", alpha=0.15, label="healthy band")
    for limit in LIMITS.get(key, []):
        y = settings.get(limit) if isinstance(limit, str) else limit
        if y is not None:
            ax.axhline(y, color="#cf222e", linestyle="--", linewidth=1, alpha=0.6,
                       label=limit if isinstance(limit, str) else None)
    smooth = len(ys) >= 10
    ax.plot(xs, ys, color="#0969da", alpha=0.35 if smooth else 1.0, marker="o" if len(ys) < 10 else None,
            markersize=3, label="raw")
    if smooth:
        w = max(2, len(ys) // 10)
        ax.plot(xs, [sum(ys[max(0, i - w + 1):i + 1]) / len(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))],
                color="#0969da", label=f"mean of {w}")
    if smooth or key in BANDS or key == "rollout/response_len_mean":
        ax.legend(fontsize=7, loc="best")
    ax.set_title(key, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.12, right=0.97, top=0.89, bottom=0.16)  # fixed: tight_layout costs a second draw
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    png = buf.getvalue()
    (out / (key.replace("/", "_") + ".png")).write_bytes(png)
    return png


def _frontier_plot(run: Run, out: Path) -> bytes | None:
    """Reward vs sequence KL per step (``report/reward_vs_kl.png``); None without both series."""
    reward, kl = run.metrics.get("env/reward_mean"), run.metrics.get("objective/kl")
    if reward is None or kl is None:
        return None
    kl_at = dict(zip(kl.steps, kl.values, strict=True))
    pts = [(kl_at[st], v, st) for st, v in zip(reward.steps, reward.values, strict=True)
           if st in kl_at and math.isfinite(v) and math.isfinite(kl_at[st])]
    if not pts:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 2.9), dpi=80)
    ax = fig.subplots()
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=[p[2] for p in pts], cmap="Blues", s=14,
               edgecolors="#0969da", linewidths=0.4)
    ax.set_title("reward vs KL (per step)", fontsize=10)
    ax.set_xlabel("objective/kl (nats per sequence)", fontsize=8)
    ax.set_ylabel("env/reward_mean", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.12, right=0.97, top=0.89, bottom=0.16)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    (out / "reward_vs_kl.png").write_bytes(buf.getvalue())
    return buf.getvalue()


TIMELINE_NOTE = ("Seconds per step: the producer's rollout (sampling and no-grad passes), the learner waiting for the "
                 "judge's scores, and the update. A tall red part means the judge is the bottleneck: async_level 1 or "
                 "2 lets the judge score while the next batches roll out and the learner updates.")
TIMELINE = (("time/rollout", "rollout (producer)", "#0969da"),
            ("time/score_wait", "waiting for the judge", "#cf222e"),
            ("time/update", "update (learner)", "#2da44e"))


def _timeline_plot(run: Run, out: Path) -> bytes | None:
    """Where each step's time goes, stacked per step (``report/timeline.png``): the producer's
    rollout, the learner's wait for scores, the update. With async_level k the red part shrinks:
    the judge scores while the next batches roll out and the learner updates."""
    series = [(run.metrics[k], label, color) for k, label, color in TIMELINE if k in run.metrics]
    if len(series) < len(TIMELINE):
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 2.9), dpi=80)
    ax = fig.subplots()
    bottom: dict[int, float] = {}
    for s, label, color in series:
        ys = [v if math.isfinite(v) else 0.0 for v in s.values]
        ax.bar(s.steps, ys, bottom=[bottom.get(x, 0.0) for x in s.steps], color=color, label=label, width=0.9)
        for x, y in zip(s.steps, ys, strict=True):
            bottom[x] = bottom.get(x, 0.0) + y
    ax.set_title("timeline: seconds per step", fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.legend(fontsize=7, loc="best")
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.subplots_adjust(left=0.12, right=0.97, top=0.89, bottom=0.16)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    (out / "timeline.png").write_bytes(buf.getvalue())
    return buf.getvalue()


def sample_sections(samples: list[dict]) -> list[tuple[str, list[dict]]]:
    """(title, rows) of the report's sample tables: the first, middle and last logged step, then the
    highest- and lowest-scored samples of the whole run (3 each)."""
    steps = sorted({r["step"] for r in samples})
    if not steps:
        return []
    picks = dict.fromkeys([steps[0], steps[len(steps) // 2], steps[-1]])
    names = ("start", "middle", "end")
    sections = [(f"{names[i]} of the run (step {st})", [r for r in samples if r["step"] == st])
                for i, st in enumerate(picks)]
    scored = sorted((r for r in samples if r.get("score") is not None), key=lambda r: r["score"])
    return [*sections, ("highest scored", scored[::-1][:3]), ("lowest scored", scored[:3])]


def _score_cell(score: float | None) -> str:
    return "failed" if score is None else f"{score:.3g}"


def _criteria_cell(row: dict) -> str:
    """Each criterion's score, one per line (``accuracy 8``)."""
    criteria = row.get("criteria") or {}
    lines = "<br>".join(f"{html.escape(str(k))}&nbsp;{v:.3g}" for k, v in criteria.items() if isinstance(v, int | float))
    return f'<td class="crit">{lines}</td>'


def _samples_html(samples: list[dict]) -> str:
    e = html.escape
    if not samples:
        return '<p class="muted">no samples.jsonl (PPO runs write it; see log_samples_every)</p>'
    # A judge with a rubric (reward_api.criteria) scored each criterion: one compact cell beside the score.
    rubric = any(r.get("criteria") for r in samples)
    columns = (*SAMPLE_COLUMNS[:3], "criteria", *SAMPLE_COLUMNS[3:]) if rubric else SAMPLE_COLUMNS
    head = "".join(f"<th>{c}</th>" for c in columns)
    parts = []
    for title, rows in sample_sections(samples):
        body = "".join(
            f"<tr><td>{r['step']}</td><td>{e(str(r.get('pick', '')))}</td>"
            f"<td>{_score_cell(r.get('score'))}</td>{_criteria_cell(r) if rubric else ''}<td>{r.get('kl', 0):.3g}</td>"
            f"<td>{r.get('length', '')}</td><td>{e(str(r.get('prompt', '')))}</td>"
            f"<td class=\"resp\">{e(str(r.get('response', '')))}</td></tr>" for r in rows)
        parts.append(f"<h3>{e(title)}</h3><table><tr>{head}</tr>{body}</table>")
    return "".join(parts)


def timings(run: Run) -> list[tuple[str, str]]:
    """(label, value) rows: medians of the per-step timings, throughput, memory, wall time."""
    rows = []
    step = run.metrics.get("time/step")
    step_med = median(step.finite()) if step and step.finite() else None
    for key, label, how in TIMINGS:
        vals = run.metrics[key].finite() if key in run.metrics else []
        if not vals:
            continue
        v = median(vals) if how == "median" else max(vals)
        text = f"{v:.3g} s" if key.startswith("time/") else f"{v:,.0f}"
        if key.startswith("time/") and key != "time/step" and step_med:
            text += f" ({v / step_med:.0%} of a step)"
        rows.append((f"{how} {label}", text))
    if len(run.wall_times) >= 2:
        rows.append(("wall time, first to last logged step", _duration(run.wall_times[-1] - run.wall_times[0])))
    steps = sorted({st for s in run.metrics.values() for st in s.steps})
    rows.append(("logged steps", f"{len(steps)} (last step {steps[-1]})" if steps else "0"))
    batch = rollout_batch_size(run.settings) if run.stage == "ppo" else None
    if batch:
        rows.append(("rollout batch (prompts per step per rank)", str(batch)))
    return rows + judge_cost(run)


def judge_cost(run: Run) -> list[tuple[str, str]]:
    """The judge's tokens and cost over the run: per-step counts (judge/*, from the replies' usage)
    summed over the logged rows, which already sum the steps between them."""
    total = {k: sum(run.metrics[k].finite()) for k in ("judge/prompt_tokens", "judge/completion_tokens",
                                                       "judge/cost_usd") if k in run.metrics}
    rows = []
    if "judge/prompt_tokens" in total:
        rows.append(("judge tokens, whole run (prompt / completion)",
                     f"{total['judge/prompt_tokens']:,.0f} / {total.get('judge/completion_tokens', 0):,.0f}"))
    if "judge/cost_usd" in total:
        rows.append(("judge cost, whole run (price_per_million)", f"${total['judge/cost_usd']:,.4f}"))
    return rows


def _duration(seconds: float) -> str:
    h, rem = divmod(int(round(seconds)), 3600)
    return f"{h}h {rem // 60:02d}m {rem % 60:02d}s" if h else f"{rem // 60}m {rem % 60:02d}s"


def _badge(verdict: str) -> str:
    return f'<span class="v" style="background:{VERDICT_COLOURS[verdict]}">{html.escape(verdict)}</span>'


CAPTIONS = {"frontier": FRONTIER, "timeline": TIMELINE_NOTE}


def _html(run: Run, checks: list[Check], figures: list[tuple[str, bytes]]) -> str:
    e = html.escape
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    check_rows = "".join(f"<tr><td>{_badge(c.verdict)}</td><td>{e(c.name)}</td><td>{e(c.detail)}</td></tr>"
                         for c in checks)
    applied = [c for c in checks if c.verdict != NA]
    timing_rows = "".join(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in timings(run))
    figs = "".join(
        f'<figure><img alt="{e(k)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{e(CAPTIONS[k] if k in CAPTIONS else EXPLAIN[k])}"
        f"{'' if k in CAPTIONS else _non_finite_note(run.metrics[k])}</figcaption></figure>"
        for k, png in figures)
    config = (e(yaml.safe_dump(run.config, sort_keys=False)) if run.config
              else "no alignkit_config.yaml in the run directory")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>alignkit report: {e(run.run_dir.name)}</title>
<style>{CSS}</style></head><body>
<h1>alignkit report: {e(run.run_dir.name)} {_badge(worst(checks))}</h1>
<p class="muted">{e(str(run.run_dir))} &middot; stage {e(run.stage)} &middot; metrics from {e(run.source)}
&middot; generated {now}</p>
<h2>Health checks</h2>
<p>{len(applied)} of {len(checks)} checks applied; {sum(c.verdict == "warn" for c in checks)} warn,
{sum(c.verdict == "fail" for c in checks)} fail.</p>
<table><tr><th>verdict</th><th>check</th><th>evidence</th></tr>{check_rows}</table>
<h2>Samples</h2>
<p class="muted">Rollouts as the reward saw them (samples.jsonl): read them before trusting a rising reward.</p>
{_samples_html(run.samples) if run.stage == "ppo" else '<p class="muted">PPO runs only</p>'}
<h2>Timings</h2>
<table>{timing_rows}</table>
<h2>Curves</h2>
<div class="grid">{figs or '<p class="muted">no metric with an explanation was logged</p>'}</div>
<h2>Resolved config (secrets redacted)</h2>
<pre>{config}</pre>
</body></html>
"""


def _non_finite_note(s: Series) -> str:
    n = sum(not math.isfinite(v) for v in s.values)
    return f' <b>{n} NaN/inf value(s) not drawn.</b>' if n else ""


def summary_lines(checks: list[Check]) -> list[str]:
    """One line per check for the terminal."""
    return [f"  {c.verdict:<5} {c.name:<16} {c.detail}" for c in checks]

