"""The hf rollout worker process (``rollout.worker: process``) on the tiny real model: it samples
from exactly the trainer's weights after every update (its log-probs match the trainer's), runs
ahead under async_level within the staleness bound while the learner trains, and a worker that
dies stops the run with one clear error."""

from __future__ import annotations

import os
import signal

import pytest

from alignkit.generation.worker import HFWorkerEngine, WorkerDied
from alignkit.train import ppo
from alignkit.train.ppo.source import PipelinedSource
from alignkit.train.tracking import read_metrics
from tests.test_critic_free import grpo_config

# fp32 worker and trainer run the same weights through the same kernels; a skipped sync (the
# previous step's adapter) measured far above this on the tiny model.
TOLERANCE = 1e-4


def worker_config(tiny_model_dir, sft_adapter, out, *overrides):
    return grpo_config(tiny_model_dir, sft_adapter, out, "count_good", "rollout.worker=process", "max_new_tokens=8",
                       f"rollout.sync_tolerance={TOLERANCE}", "seed=0", *overrides)


def test_worker_runs_ahead_within_the_bound_on_whole_weight_versions(tiny_model_dir, sft_adapter, tmp_path,
                                                                     monkeypatch):
    seen = []  # (learner step, trainer version that requested the batch, worker weight version that sampled it)
    real = PipelinedSource.experience

    def recorded(self, step, policy_version):
        exp = real(self, step, policy_version)
        seen.append((step, exp.policy_version, exp.stats.sync))
        return exp

    monkeypatch.setattr(PipelinedSource, "experience", recorded)
    out = ppo.run(worker_config(tiny_model_dir, sft_adapter, tmp_path / "k1", "async_level=1", "max_steps=3"))
    assert [(s, v) for s, v, _ in seen] == [(0, 0), (1, 0), (2, 1)]  # one version behind once the pipeline is full
    # The first batch is fresh: the worker's log-probs are the trainer's, so it held exactly its weights.
    assert seen[0][2] is not None and seen[0][2].logprob_diff < TOLERANCE
    rows = read_metrics(out)
    assert [r["async/staleness"] for r in rows] == [0.0, 1.0, 1.0]
    assert all(r["async/producer_wait_s"] >= 0 for r in rows)  # the worker's own idle time, every batch
    # The behaviour log-probs are the worker's, one version old: weights near 1, not exactly 1.
    assert all(0.9 < r["is/ratio_mean"] < 1.1 for r in rows)
    assert any(r["is/ratio_mean"] != 1.0 for r in rows[1:])


@pytest.mark.slow
def test_on_policy_worker_samples_the_trainers_weights_after_every_update(tiny_model_dir, sft_adapter, tmp_path):
    out = ppo.run(worker_config(tiny_model_dir, sft_adapter, tmp_path / "k0", "max_steps=3"))
    diffs = [r["rollout/engine_logprob_diff"] for r in read_metrics(out)]
    assert len(diffs) == 3 and max(diffs) < TOLERANCE, diffs  # checked by the loop at every step too


@pytest.mark.slow
def test_a_worker_that_dies_stops_the_run_with_a_clear_error(tiny_model_dir, sft_adapter, tmp_path, monkeypatch):
    real = HFWorkerEngine.sync_weights

    def kill_after_first_update(self, policy):
        real(self, policy)
        if self.process.is_alive():
            os.kill(self.process.pid, signal.SIGKILL)

    monkeypatch.setattr(HFWorkerEngine, "sync_weights", kill_after_first_update)
    with pytest.raises(WorkerDied, match=r"rollout worker process \(rollout.worker: process, pid \d+\) stopped "
                                         r"with exit code -9.*resume_from_checkpoint"):
        ppo.run(worker_config(tiny_model_dir, sft_adapter, tmp_path / "dies", "async_level=1", "max_steps=4"))
