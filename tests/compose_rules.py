"""How docker-compose reads this repository's files: the assignments of .env.example, ``${VAR}``
interpolation with its defaults, and the variables a compose file uses. Shared by the static
checks (test_compose.py), the local-process imitation (test_topology.py) and the container
end-to-end test (e2e/test_compose_stack.py)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?msg}, ${VAR?msg}; `$${...}` is an escaped
# dollar that reaches the container as `${...}` and is not compose's business.
INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def load_compose(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text())


def env_example() -> dict[str, str]:
    """The assignments of .env.example (commented-out lines excluded)."""
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def interpolate(value: str, env: dict[str, str]) -> str:
    """What compose makes of a string: defaults applied, `$$` unescaped."""

    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        current = env.get(name)
        if op in (":-", ":?"):
            missing = not current
        else:
            missing = current is None
        if missing and op in (":-", "-"):
            return arg
        if missing and op in (":?", "?"):
            raise KeyError(f"required variable {name} unset: {arg}")
        return current or ""

    return INTERPOLATION.sub(sub, value).replace("$$", "$")


def strings(node, path=""):
    """Every (path, string) in a loaded YAML document, keys excluded."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from strings(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from strings(v, f"{path}[{i}]")
    elif isinstance(node, str):
        yield path, node


def variables_used(path: Path) -> set[str]:
    return {m.group(1) for _, s in strings(load_compose(path)) for m in INTERPOLATION.finditer(s)}
