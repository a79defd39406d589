"""The offline preference stages' configs: DPO (and IPO, hinge, ORPO, SimPO through ``pref_loss``) and KTO.

Keys are LLaMA-Factory's (``pref_beta``, ``pref_loss``, ``pref_ftx``, ``simpo_gamma``,
``dpo_label_smoothing``, ``kto_chosen_weight``, ``ref_model``) plus TRL's
``precompute_ref_logprobs``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from alignkit.config import StageConfig, register_stage

PrefLoss = Literal["sigmoid", "hinge", "ipo", "orpo", "simpo"]
# Losses with no reference model at all (Hong et al. 2024; Meng et al. 2024): no reference pass.
REFERENCE_FREE = {"orpo", "simpo"}
# Losses defined on length-normalised (average per-token) log-probs.
LENGTH_NORMALISED = {"ipo", "orpo", "simpo"}


class PreferenceConfig(StageConfig):
    """Keys DPO and KTO share: the temperature beta, the SFT term and where the reference comes from."""

    pref_beta: float = Field(0.1, gt=0.0, description="beta: how far the policy may move from the reference "
                             "(DPO/IPO/KTO), the reward scale (SimPO), or the odds-ratio weight lambda (ORPO).")
    pref_ftx: float = Field(0.0, ge=0.0, description="Weight of an SFT loss (mean NLL of the chosen/desirable "
                            "response) added to the preference loss (0 = off).")
    ref_model: str | None = Field(None, description="A separate reference model directory (default: the policy's "
                                  "base with adapter_name_or_path merged, the LoRA adapter disabled: no second copy).")
    ref_model_adapters: list[str] | None = Field(None, description="Adapters merged into ref_model, in order (comma list).")
    precompute_ref_logprobs: bool = Field(False, description="Compute reference log-probs once for the whole dataset "
                                          "before training (a full fine-tune then frees its reference copy).")
    learning_rate: float = Field(5e-6, gt=0, description="Peak learning rate.")

    @field_validator("ref_model_adapters", mode="before")
    @classmethod
    def _comma_ref_adapters(cls, v: Any) -> Any:
        return [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check_reference(self) -> PreferenceConfig:
        if self.ref_model_adapters and not self.ref_model:
            raise ValueError("ref_model_adapters needs ref_model (the base they are merged into)")
        return self

    @property
    def uses_reference(self) -> bool:
        return True

    @property
    def length_normalised(self) -> bool:
        """The loss reads average (per-token) log-probs rather than sums."""
        return False


class DPOConfig(PreferenceConfig):
    stage: Literal["dpo"] = Field("dpo", description="Training stage.")
    pref_loss: PrefLoss = Field("sigmoid", description="sigmoid (DPO) | hinge (SLiC) | ipo | orpo | simpo "
                                "(orpo and simpo use no reference model).")
    simpo_gamma: float = Field(0.5, ge=0.0, description="SimPO's target reward margin gamma (pref_loss: simpo).")
    dpo_label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="Conservative DPO: probability that a "
                                       "preference label is flipped, in [0, 0.5) (pref_loss: sigmoid).")

    @model_validator(mode="after")
    def _check_loss_keys(self) -> DPOConfig:
        if self.dpo_label_smoothing and self.pref_loss != "sigmoid":
            raise ValueError(f"dpo_label_smoothing applies to pref_loss: sigmoid, not {self.pref_loss}; remove it")
        if not self.uses_reference and (self.ref_model or self.precompute_ref_logprobs):
            key = "ref_model" if self.ref_model else "precompute_ref_logprobs"
            raise ValueError(f"pref_loss: {self.pref_loss} uses no reference model; remove {key}")
        return self

    @property
    def uses_reference(self) -> bool:
        return self.pref_loss not in REFERENCE_FREE

    @property
    def length_normalised(self) -> bool:
        return self.pref_loss in LENGTH_NORMALISED


class KTOConfig(PreferenceConfig):
    stage: Literal["kto"] = Field("kto", description="Training stage.")
    kto_chosen_weight: float = Field(1.0, gt=0.0, description="Weight of desirable rows' losses (TRL desirable_weight).")
    kto_rejected_weight: float = Field(1.0, gt=0.0, description="Weight of undesirable rows' losses "
                                       "(TRL undesirable_weight); keep w_d * n_d / (w_u * n_u) in [1, 4/3].")


register_stage("dpo", DPOConfig)
register_stage("kto", KTOConfig)
