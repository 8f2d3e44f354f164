"""Study specs shipped with sweeper: one TOML file per study (see docs and sweeper/spec.py)."""
