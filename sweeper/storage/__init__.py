"""The Optuna storage: everything that knows how trials and studies are stored.

``connect`` opens it (URL, schema checks, SQLite set-up); ``locks`` is sweeper's one lock helper
(file locks on one machine, PostgreSQL advisory locks across machines); ``dberrors`` classifies and
retries database errors; ``stale`` is the retry of a dead worker's trial; ``internals`` holds the
fast paths through Optuna's private API. No other module of sweeper touches Optuna's internals.
"""
