"""Policy, critic and reference on one base model.

LoRA (the default): the policy is a peft adapter; the critic is a value head on the policy's
last hidden state (or on its own adapter, ``critic_adapter``); the reference is the same
weights with the adapter disabled. An SFT adapter given as ``adapter_name_or_path`` is merged
into the base first, so "adapter disabled" *is* the frozen SFT model and the policy starts from
it. Full fine-tuning keeps a separate frozen reference copy.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from alignkit.config import StageConfig
from alignkit.models.architectures import image_forward_kwargs, rope_positions
from alignkit.models.io import restore_model
from alignkit.models.loading import attach_lora, lora_config, trainable_in_float32
from alignkit.models.reference import adapters_disabled, keep_grad_flags

VALUE_HEAD_FILE = "value_head.safetensors"
CRITIC = "critic"


class ValueHead(nn.Module):
    """A linear map from the last hidden state to a scalar value per token."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        # Zero init: the critic starts predicting 0 and cannot disturb early advantages
        # (Huang et al. 2023, "N implementation details", detail on value head init).
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T)
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)

    def save(self, out: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(out / VALUE_HEAD_FILE))

    def load(self, path: Path) -> None:
        self.load_state_dict(load_file(str(path / VALUE_HEAD_FILE)))


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on the first real token of a left-padded row."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class ActorCritic(nn.Module):
    """``forward`` returns policy logits and values; ``reference_logits`` the frozen reference's.

    ``value_head=False`` (critic-free estimators such as GRPO) builds no value head at all:
    ``forward`` returns ``None`` values and skips the hidden states the head would read.
    """

    def __init__(self, lm: nn.Module, ref_lm: nn.Module | None = None, critic_adapter: bool = False,
                 value_head: bool = True):
        super().__init__()
        self.lm = lm
        self.ref_lm = ref_lm
        self.critic_adapter = critic_adapter
        self.v_head = ValueHead(lm.config.get_text_config().hidden_size) if value_head else None
        if self.v_head is not None:
            self.v_head.to(next(lm.parameters()).device)
        # A reward-model adapter on this same base (reward_model_type: lora) is scored on the
        # reward thread; it switches adapters, so it and the trainer's passes take turns.
        self.adapter_lock = threading.Lock()
        if ref_lm is not None:
            ref_lm.requires_grad_(False).eval()

    @property
    def has_critic(self) -> bool:
        return self.v_head is not None

    @property
    def is_lora(self) -> bool:
        return isinstance(self.lm, PeftModel)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("ref_lm.")]

    def _lm_forward(self, model, input_ids, attention_mask, pixels: dict | None, hidden: bool, keep: int):
        """One forward of ``model`` (the policy, or the reference); ``pixels`` are the rows' image
        inputs (Qwen-VL), whose 3-D rope positions are the sampler's (``rope_positions``)."""
        return model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=rope_positions(model, input_ids, attention_mask, (pixels or {}).get("image_grid_thw")),
            output_hidden_states=hidden,
            use_cache=False,
            logits_to_keep=keep,
            **image_forward_kwargs(model, input_ids, pixels),
        )

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int, pixels: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T) tokens -> logits (B, R, V) and values (B, R) at the positions that predict the
        response tokens ``input_ids[:, response_start:]`` (position t predicts token t+1);
        values are ``None`` without a value head. ``pixels``: the rows' image inputs, if any.

        The LM head runs only on those R positions (``logits_to_keep``), not on the prompt.
        """
        R = input_ids.shape[1] - response_start
        shared = self.has_critic and not self.critic_adapter  # the value head reads the policy's hidden states
        out = self._lm_forward(self.lm, input_ids, attention_mask, pixels, hidden=shared, keep=R + 1)
        logits = out.logits[:, :-1]
        if not self.has_critic:
            return logits, None
        if shared:
            hidden = out.hidden_states[-1]
        elif pixels:  # the decoder alone cannot place the images: the whole model, hidden states kept
            with self.use_adapter(CRITIC):
                hidden = self._lm_forward(self.lm, input_ids, attention_mask, pixels, True, 1).hidden_states[-1]
        else:
            with self.use_adapter(CRITIC):
                hidden = self.lm.base_model.model.get_decoder()(
                    input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                ).last_hidden_state
        return logits, self.v_head(hidden[:, response_start - 1 : -1])

    @torch.no_grad()
    def reference_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int,
                         pixels: dict | None = None) -> torch.Tensor:
        """The reference model's (B, R, V) logits at the positions that predict the response."""
        if self.ref_lm is not None:
            model, ctx = self.ref_lm, nullcontext()
        else:
            model, ctx = self.lm, adapters_disabled(self.lm)
        with ctx:
            keep = input_ids.shape[1] - response_start + 1
            return self._lm_forward(model, input_ids, attention_mask, pixels, False, keep).logits[:, :-1]

    @contextmanager
    def use_adapter(self, name: str):
        """Run with another adapter active (critic, reward), keeping every adapter trainable."""
        with keep_grad_flags(self.lm):
            self.lm.base_model.set_adapter(name)
            try:
                yield
            finally:
                self.lm.base_model.set_adapter("default")

    def save_policy(self, out: Path) -> None:
        """Policy weights (adapter or full model) + value head (if any); no critic adapter in the policy dir."""
        out.mkdir(parents=True, exist_ok=True)
        if self.is_lora:
            self.lm.save_pretrained(out, selected_adapters=["default"], safe_serialization=True)
            if self.critic_adapter:
                self.lm.save_pretrained(out / "critic_adapter", selected_adapters=[CRITIC], safe_serialization=True)
        else:
            self.lm.save_pretrained(out, safe_serialization=True)
        if self.v_head is not None:
            self.v_head.save(out)

    def load_trainable(self, ckpt: Path) -> None:
        """Restore what ``save_policy`` wrote (policy/critic adapters or full weights, value head)."""
        restore_model(self.lm, ckpt)
        if self.critic_adapter:
            from peft import set_peft_model_state_dict

            state = load_file(str(ckpt / "critic_adapter" / CRITIC / "adapter_model.safetensors"))
            set_peft_model_state_dict(self.lm, state, adapter_name=CRITIC)
        if self.v_head is not None:
            self.v_head.load(ckpt)


def build_actor_critic(lm: nn.Module, cfg: StageConfig, ref_lm: nn.Module | None = None) -> ActorCritic:
    """Wrap the policy with a value head (and, with ``critic_adapter``, a critic LoRA of its own).

    ``lm`` is normally ``build_policy_model(cfg, merge_all=True)``; a bare base gets a new policy
    LoRA here, through the same helpers.
    """
    critic_adapter = cfg.critic_adapter and cfg.finetuning_type == "lora"
    if cfg.finetuning_type == "lora":
        if not isinstance(lm, PeftModel):
            lm = attach_lora(lm, cfg)
        if critic_adapter:
            # The policy adapter's own module names: ``all`` cannot be expanded again on a model
            # whose linear layers are already wrapped in LoRA layers (it would find their insides).
            targets = sorted(lm.peft_config["default"].target_modules)
            lm.add_adapter(CRITIC, lora_config(lm.base_model.model, cfg.lora_rank, cfg.alpha, 0.0, targets))
            # add_adapter leaves the new adapter frozen (only the active one trains); the critic must learn.
            for n, p in lm.named_parameters():
                if f".{CRITIC}." in n:
                    p.requires_grad_(True)
            trainable_in_float32(lm)
    return ActorCritic(lm, ref_lm, critic_adapter=critic_adapter, value_head=cfg.has_critic)
