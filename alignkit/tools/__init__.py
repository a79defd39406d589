"""The commands that use a trained model rather than train one: ``chat`` and ``predict``
(``infer``), ``compare``, ``pairs`` and ``demo``, with the generator they share and their config
plumbing (``tools.config``, which ``export`` uses too). Above ``train`` and ``export``, below ``cli``.

Nothing is imported here: ``alignkit.tools.config`` must load without pulling in the commands.
"""
