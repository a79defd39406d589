"""The hf engine in a rollout worker process (``rollout: {engine: hf, worker: process}``).

The worker holds its own copy of the policy and receives weights the way a server does: after
each update, the LoRA policy adapter alone (``get_peft_model_state_dict``), or for full
fine-tuning the whole state dict, cloned and sent through ``torch.multiprocessing`` shared memory.
Weights and rollout requests travel in one queue, in order, and the worker applies a weight
message only between two rollouts, so no batch is ever sampled from half-updated weights; each
rollout comes back with the version of the weights that sampled it and the worker's own
(behaviour) log-probs. With ``async_level >= 1`` the loop requests a batch k versions ahead and
trains meanwhile (``PipelinedSource``), so rollout compute overlaps the update; finished responses
stream back as they finish and a dispatcher thread hands them to the scorer at once.

Cost of a sync: one copy of the adapter (or of the full weights) into shared memory, per update.
"""

from __future__ import annotations

import copy
import itertools
import queue
import threading
import time
import traceback
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp
from torch import nn

from alignkit.generation.engine import SamplingParams, engine_sync_check
from alignkit.generation.sampling import OnFinished, Rollout, request_seeds, sample
from alignkit.generation.weights import POLICY_ADAPTER, SyncCheck, plain_model, policy_lm
from alignkit.models.architectures import placeholder_token_ids


class WorkerDied(RuntimeError):
    pass


def _policy_weights(lm: nn.Module) -> tuple[dict[str, torch.Tensor], bool]:
    """What a sync sends, cloned (sharing the live parameters would let the worker see an update
    half done): the policy adapter when the policy is LoRA, else the full state dict."""
    from peft import get_peft_model_state_dict

    _, is_lora = plain_model(lm)
    state = get_peft_model_state_dict(lm, adapter_name=POLICY_ADAPTER) if is_lora else lm.state_dict()
    return {k: v.detach().clone() for k, v in state.items()}, is_lora


def _worker_main(lm: nn.Module, pad_token_id: int, threads: int, inbox, outbox) -> None:
    """The worker's loop: apply weights, or sample a request and send back its rows as they finish,
    then the Rollout with the version that sampled it. Any error goes back as text."""
    from peft import set_peft_model_state_dict

    torch.set_num_threads(threads)
    version, suppress = 0, placeholder_token_ids(lm)
    idle_since = time.perf_counter()  # when the worker last had nothing to do
    try:
        while (msg := inbox.get()) is not None:
            if msg[0] == "weights":
                _, version, state, is_lora = msg
                if is_lora:
                    set_peft_model_state_dict(lm, state, adapter_name=POLICY_ADAPTER)
                else:
                    lm.load_state_dict(state)
                idle_since = time.perf_counter()  # loading weights is work, not waiting
                continue
            waited = time.perf_counter() - idle_since
            _, ticket, q_ids, q_mask, s, seed = msg
            torch.manual_seed(seed)
            roll = sample(lm, pad_token_id, q_ids, q_mask, s.max_new_tokens, s.temperature, s.top_k, s.top_p,
                          list(s.eos_ids), None, suppress, True,
                          lambda row, ids, t=ticket: outbox.put(("finished", t, row, ids)))
            roll.producer_wait_s = waited
            outbox.put(("rollout", ticket, version, roll))
            idle_since = time.perf_counter()
    except BaseException:  # noqa: BLE001 - reported to the trainer, which stops with it
        outbox.put(("error", traceback.format_exc()))


@dataclass
class _Pending:
    on_finished: OnFinished | None
    rollout: Rollout | None = None
    version: int = -1


class HFWorkerEngine:
    """``RolloutEngine`` whose sampling runs in a worker process (module doc). ``request`` starts a
    rollout and returns at once; ``result`` waits for it; ``generate`` is both."""

    reports_finished = True
    runs_ahead = True  # PipelinedSource requests its batches ahead and keeps training meanwhile

    def __init__(self, policy: nn.Module, pad_token_id: int, sync_tolerance: float = 0.05):
        lm = policy_lm(policy)
        # The weights go with the first request: a resumed run loads its checkpoint after the engine is built.
        self.to_sync: nn.Module | None = policy
        ctx = mp.get_context("spawn")
        self.inbox, self.outbox = ctx.Queue(), ctx.Queue()
        self.sync_tolerance, self.version = sync_tolerance, 0
        self.pending: dict[int, _Pending] = {}
        self.error: str | None = None  # what stopped the worker
        self.hand_on_error: str | None = None  # what stopped the dispatcher in a callback
        self.cond, self.tickets = threading.Condition(), itertools.count()
        # The worker's own copy: cloned so that moving it to shared memory leaves the trainer's alone.
        worker_lm = copy.deepcopy(lm).requires_grad_(False)
        self.process = ctx.Process(target=_worker_main, args=(worker_lm, pad_token_id,
                                                              torch.get_num_threads(), self.inbox, self.outbox),
                                   daemon=True, name="alignkit-rollout-worker")
        self.process.start()
        self.dispatcher = threading.Thread(target=self._dispatch, daemon=True, name="alignkit-rollout-dispatch")
        self.dispatcher.start()

    def _dispatch(self) -> None:
        """Hand each finished response to its callback as it arrives (scoring starts while the
        trainer is busy) and keep each Rollout for ``result``."""
        while True:
            try:
                msg = self.outbox.get(timeout=1.0)
            except queue.Empty:
                if not self.process.is_alive():
                    msg = ("error", f"the process exited with code {self.process.exitcode}")
                else:
                    continue
            except (EOFError, OSError):
                return
            with self.cond:
                if msg[0] == "error":
                    self.error = msg[1]
                    self.cond.notify_all()
                    return
                p = self.pending[msg[1]]
                if msg[0] == "rollout":
                    p.version, p.rollout = msg[2], msg[3]
                    self.cond.notify_all()
            if msg[0] == "finished" and p.on_finished is not None:
                try:
                    p.on_finished(msg[2], msg[3])
                except BaseException:  # noqa: BLE001 - the trainer waiting in result() stops with it
                    with self.cond:
                        self.hand_on_error = traceback.format_exc()
                        self.cond.notify_all()
                    return

    def request(self, query_ids: torch.Tensor, query_mask: torch.Tensor, sampling: SamplingParams,
                on_finished: OnFinished | None = None) -> int:
        """Queue a rollout (sampled after every weight sync sent before it); returns its ticket."""
        self._raise_if_dead()
        if self.to_sync is not None:
            self._send_weights(self.to_sync)
        ticket = next(self.tickets)
        with self.cond:
            self.pending[ticket] = _Pending(on_finished)
        self.inbox.put(("generate", ticket, query_ids.cpu().clone(), query_mask.cpu().clone(), sampling,
                        request_seeds(1)[0]))
        return ticket

    def result(self, ticket: int, device: torch.device | None = None) -> Rollout:
        """The Rollout of ``ticket`` (waits for it), with the worker's weights version that sampled it."""
        with self.cond:
            while self.pending[ticket].rollout is None:
                self._raise_if_dead()
                self.cond.wait(1.0)
            p = self.pending.pop(ticket)
        r = p.rollout
        if device is not None:
            r = Rollout(r.input_ids.to(device), r.attention_mask.to(device), r.response_mask.to(device),
                        r.no_eos.to(device), r.query_len, r.logprobs.to(device))
        r.policy_version, r.producer_wait_s = p.version, p.rollout.producer_wait_s
        return r

    def generate(self, query_ids: torch.Tensor, query_mask: torch.Tensor, sampling: SamplingParams,
                 pixels: dict[str, torch.Tensor] | None = None, on_finished: OnFinished | None = None) -> Rollout:
        if pixels is not None:
            raise ValueError("rollout.worker: process takes text prompts only; set rollout.worker: none for images")
        return self.result(self.request(query_ids, query_mask, sampling, on_finished), query_ids.device)

    def sync_weights(self, policy: nn.Module) -> None:
        """The next request samples from ``policy``'s current weights: they are sent (copied) then,
        ahead of it in the worker's queue, so the worker takes them between two rollouts."""
        self.to_sync = policy

    def _send_weights(self, policy: nn.Module) -> None:
        state, is_lora = _policy_weights(policy_lm(policy))
        self.version += 1
        self.inbox.put(("weights", self.version, state, is_lora))
        self.to_sync = None

    def check_sync(self, rollouts: list[Rollout], trainer_logprobs: list[torch.Tensor], sampling: SamplingParams
                   ) -> SyncCheck | None:
        """The worker's log-probs against the trainer's, for rollouts sampled by the weights the
        trainer holds now (a stale batch is off-policy by design: the IS correction handles it)."""
        if self.to_sync is not None or any(r.policy_version != self.version for r in rollouts):
            return None
        return engine_sync_check(self.sync_tolerance, rollouts, trainer_logprobs, sampling)

    def _raise_if_dead(self) -> None:
        if self.hand_on_error is not None:  # the worker is fine; handing a response to the scorer failed
            raise RuntimeError(f"handing a finished response to the scorer failed:\n{self.hand_on_error}")
        if self.error is not None or not self.process.is_alive():
            raise WorkerDied(
                f"the rollout worker process (rollout.worker: process, pid {self.process.pid}) stopped"
                f"{'' if self.process.is_alive() else f' with exit code {self.process.exitcode}'}: "
                f"{(self.error or 'no error was reported (killed?)').strip().splitlines()[-1]}. The run cannot "
                "sample without it; resume from the last checkpoint (resume_from_checkpoint: true).")

    def close(self) -> None:
        if self.process.is_alive():
            self.inbox.put(None)
            self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
