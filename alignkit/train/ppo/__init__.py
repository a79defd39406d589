"""PPO and its critic-free relatives, as named phases over one ``Experience``.

``loop.run(cfg)`` reads top to bottom; ``experience`` makes the rollout batch, ``shaping``
turns scores into rewards and advantages (through ``alignkit.algos.advantages``' registry),
``update`` runs the epochs over mini-batches, ``metrics`` names what is logged.
"""

from alignkit.train.ppo.experience import Experience, PromptSet, make_experience
from alignkit.train.ppo.loop import build_models, run

__all__ = ["Experience", "PromptSet", "build_models", "make_experience", "run"]
