"""A study's trials: how they are enqueued (``enqueue``), searched per cell (``cellsearch``), claimed,
kept alive and retried (``claims``), and where the study stands (``outcomes``, ``summary``).

Built on ``sweeper.storage``; nothing here touches Optuna's internals.
"""
