"""Learning on the real model: GRPO makes SmolLM2-135M-Instruct follow a verifiable instruction.

Task (tests/real_task.py): "Describe TOPIC in at most ten words." SmolLM2 answers in ~17 words, so
the strict check (3-10 words, one line, names the topic, no repeated bigram) passes for a minority
of its answers. The reward is graded (length, topic, form, repetition: each bounded), so groups of
four have a spread from the first step. The test reads every scored answer of the run and asserts:
the success rate of the last steps is at least twice the first steps', KL per token stays bounded,
and the text does not degenerate (repeated 3-grams and distinct-2 against the first steps, which
are the base model's answers: the LoRA starts at zero, so step 1 samples the base model).

Recipe (found by trying, below): GRPO with groups of 8 on 2 prompts a step (16 answers), 24 new tokens,
T 0.8, LoRA r16 on q,k,v,o, constant lr 5e-4, KL in the loss (k3) at beta 0.15, and a score penalty on
repeated token 3-grams (score_repetition_penalty 1.0 from a share of 0). Groups of 8 rather than 4 give
each prompt's advantages a better baseline, and the constant learning rate keeps learning through the
last steps where a linear decay stopped it.

Measured (seed 0, 1 thread; the same figures in two runs; 8.9-9.9 min wall on 2 cores shared with 2-3
other runs): success per step
0.12 0.25 0.06 0.31 0.12 0.12 0.25 0.19 0 0.5 0.25 0.19 0.38 0.5, first 3 -> last 3 0.146 -> 0.354
(2.4x, +0.21); rule reward 0.543 -> 0.693; KL/token max 0.160; repeated 3-grams 0.015 -> 0.001;
distinct-2 0.863 -> 0.863; length 19.1 -> 15.1 tokens.

Recipes that missed a bar (success first 3 -> last 3, KL/token max, repeated 3-grams first -> last), groups
of 4 on 4 prompts unless said: lr 3e-4 beta 0.04 T 1.0: 0.06 -> 0.17 (2.7x but +0.10); lr 1e-3 beta 0.02:
0.23 -> 0.48, KL 0.71; lr 5e-4 beta 0.1: 0.21 -> 0.42, KL 0.27, 3-grams 0.007 -> 0.026; lr 5e-4 beta
0.2: 0.21 -> 0.35 (1.7x); lr 5e-4 beta 0.15: 0.21 -> 0.42, KL 0.21, 3-grams 0.009 -> 0.029; the same
with the repetition penalty: 0.21 -> 0.40 (1.9x), 3-grams 0.009 -> 0.020; beta 0.2 with the penalty,
20 steps: 0.21 -> 0.19; beta 0.15 with the penalty, constant lr and ppo_epochs 2: 0.25 -> 0.31, KL 0.25.
"""

from __future__ import annotations

from statistics import mean

from alignkit.config import load_config
from alignkit.models.gguf import convert_gguf
from alignkit.train import ppo
from alignkit.train.tracking import read_metrics
from tests import real_task

GGUF, pytestmark = real_task.smollm2_and_marks()

STEPS, PROMPTS, GROUP, EDGE = 14, 2, 8, 3  # EDGE: steps averaged at each end
RECIPE = [
    "advantage_estimator=grpo", f"num_generations={GROUP}", "per_device_train_batch_size=1", "ppo_buffer_size=2",
    "ppo_epochs=1", "max_new_tokens=24", "temperature=0.8", "learning_rate=5e-4", "lr_scheduler_type=constant",
    "beta=0.15", "score_repetition_penalty=1.0", "score_repetition_threshold=0.0", "lora_rank=16", "lora_alpha=32",
    "lora_target=q_proj,k_proj,v_proj,o_proj", f"max_steps={STEPS}", "seed=0",
]


def test_grpo_on_smollm2_doubles_success_with_bounded_kl_and_healthy_text(tmp_path):
    data = real_task.write_dataset(tmp_path / "data")
    real_task.SCORED.clear()
    cfg = load_config(None, [
        "stage=ppo", f"model_name_or_path={convert_gguf(GGUF)}", "template=auto", "dataset=brief",
        f"dataset_dir={data}", "finetuning_type=lora", f"output_dir={tmp_path / 'run'}", "report_to=none",
        "plot_loss=false", "save_steps=1000", "reward_model_type=rule",
        "reward_model=tests.real_task:brief_answer", *RECIPE])
    run = ppo.run(cfg)

    per_step = PROMPTS * GROUP
    assert len(real_task.SCORED) == STEPS * per_step
    success = [mean(s for _, _, s in real_task.SCORED[i * per_step : (i + 1) * per_step]) for i in range(STEPS)]
    metrics = [m for m in read_metrics(run) if "env/reward_mean" in m]
    first, last = metrics[:EDGE], metrics[-EDGE:]

    def avg(rows, key):
        return mean(m[key] for m in rows)

    kl_per_token = [m["objective/kl"] / max(m["rollout/response_len_mean"], 1.0) for m in metrics]
    print(f"success per step: {[round(s, 2) for s in success]}")
    print(f"reward {avg(first, 'env/reward_mean'):.3f} -> {avg(last, 'env/reward_mean'):.3f}; KL/token last "
          f"{mean(kl_per_token[-EDGE:]):.4f}; repeat-3gram {avg(first, 'rollout/repeat_3gram_frac'):.3f} -> "
          f"{avg(last, 'rollout/repeat_3gram_frac'):.3f}; distinct-2 {avg(first, 'rollout/distinct_2'):.3f} -> "
          f"{avg(last, 'rollout/distinct_2'):.3f}; length {avg(first, 'rollout/response_len_mean'):.1f} -> "
          f"{avg(last, 'rollout/response_len_mean'):.1f} tokens")
    print("last answers:", [r for _, r, _ in real_task.SCORED[-6:]])
    s_first, s_last = mean(success[:EDGE]), mean(success[-EDGE:])
    assert s_last >= 2 * s_first and s_last >= s_first + 0.15, success
    assert avg(last, "env/reward_mean") > avg(first, "env/reward_mean")
    assert max(kl_per_token) < 0.2  # report.health's KL_FAIL: runaway drift from the reference
    assert avg(last, "rollout/repeat_3gram_frac") <= avg(first, "rollout/repeat_3gram_frac") + 0.01
    assert avg(last, "rollout/distinct_2") >= 0.8 * avg(first, "rollout/distinct_2")
    assert avg(last, "rollout/response_len_mean") >= 4  # answers shrink to the budget, not to nothing
