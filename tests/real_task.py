"""The brief task the real-model tests train on; it lives in alignkit.rewards.brief (``alignkit demo --real``
uses it too). Re-exported here so ``reward_model=tests.real_task:brief_answer`` and ``real_task.SCORED`` work."""

from alignkit.rewards.brief import (  # noqa: F401
    MAX_WORDS,
    PROMPT,
    SCORED,
    TOPICS,
    ZERO_AT,
    brief_answer,
    brief_judge,
    repeated_bigram_share,
    success,
    topic_of,
    write_dataset,
)
