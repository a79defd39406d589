"""The brief task the real-model tests train on; it lives in alignkit.rewards.brief (``alignkit demo --real``
uses it too). Re-exported here so ``reward_model=tests.real_task:brief_answer`` and ``real_task.SCORED`` work."""

import pytest

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


def smollm2_and_marks():
    """(the SmolLM2 GGUF path, the module's pytestmark): slow, and skipped without the model
    (``scripts/setup.sh --real``)."""
    from alignkit.models.gguf import smollm2_gguf

    try:
        gguf = smollm2_gguf()
        missing = None if gguf.is_file() else f"{gguf} is missing"
    except ModuleNotFoundError as e:
        gguf, missing = None, str(e)
    return gguf, [pytest.mark.slow, pytest.mark.skipif(missing is not None,
                                                       reason=f"{missing}: run scripts/setup.sh --real")]
