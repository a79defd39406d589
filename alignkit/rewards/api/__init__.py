"""The HTTP judge client: ``config`` (the ``reward_api`` keys), ``client`` (concurrent, retried,
validated scoring), ``presets`` (request and reply shapes), ``transport`` and ``headers``."""
