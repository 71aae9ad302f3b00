"""Tests of the deployment files (docker/Dockerfile, docker-compose.yml, .env.example) without a
Docker engine, and the helpers they share: reading the compose file, interpolating its
${VARIABLES} as Docker Compose does, and reading the image's ENV lines.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
HPO_SERVICES = ("create", "worker", "dashboard", "hpo")  # the services that run the image
SECRETS_DIR = "/run/secrets"

# Compose's interpolation: $$ (a literal $), ${VAR}, ${VAR:-default}, ${VAR-default},
# ${VAR:?error}, ${VAR?error}, ${VAR:+alt}, ${VAR+alt}, and bare $VAR. Nested defaults are not
# needed by our file and not supported here.
_VAR = re.compile(
    r"\$(?:(?P<dollar>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class InterpolationError(ValueError):
    """A ${VAR:?message} whose variable is unset, as `docker compose` would refuse it."""


def load_compose() -> dict[str, Any]:
    """docker-compose.yml parsed (YAML merge keys resolved), not yet interpolated."""
    yaml = pytest.importorskip("yaml", reason="PyYAML reads docker-compose.yml: pip install pyyaml")
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict), f"{COMPOSE_FILE} is not a YAML mapping"
    return data


def read_env_file(path: Path = ENV_EXAMPLE) -> dict[str, str]:
    """KEY=VALUE lines of a compose .env file; comments and blank lines skipped, quotes removed."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f"{path}:{number}: {line!r}"
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key] = value
    return values


def variables_read(text: str) -> set[str]:
    """Names of the variables a compose file interpolates ($$ is an escaped dollar, not one)."""
    names = set()
    for m in _VAR.finditer(text):
        name = m.group("braced") or m.group("bare")
        if name:
            names.add(name)
    return names


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """`value` with every string interpolated from `env`, recursively, as compose does."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: _substitute(m, env), value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def _substitute(m: re.Match[str], env: dict[str, str]) -> str:
    if m.group("dollar"):
        return "$"
    name = m.group("braced") or m.group("bare")
    op, arg = m.group("op") or "", m.group("arg") or ""
    is_set = name in env
    present = is_set and env[name] != ""  # the ':' forms treat empty as unset
    usable = present if op.startswith(":") else is_set
    if op.endswith("-"):
        return env[name] if usable else arg
    if op.endswith("?"):
        if not usable:
            raise InterpolationError(f"required variable {name} is missing a value: {arg}")
        return env[name]
    if op.endswith("+"):
        return arg if usable else ""
    return env.get(name, "")


def service(compose: dict[str, Any], name: str, env: dict[str, str]) -> dict[str, Any]:
    """One service of the compose file, interpolated from `env`."""
    assert name in compose["services"], f"docker-compose.yml has no service {name!r}"
    return interpolate(compose["services"][name], env)


def environment(svc: dict[str, Any]) -> dict[str, str]:
    """A service's `environment:` as a dict, whichever of compose's two forms it uses."""
    raw = svc.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.partition("=")[::2] for item in raw)
    return {str(k): "" if v is None else str(v) for k, v in raw.items()}


def volume_targets(svc: dict[str, Any]) -> dict[str, str]:
    """target path -> source (a host path or a named volume) for a service's volumes."""
    targets = {}
    for volume in svc.get("volumes") or []:
        if isinstance(volume, dict):
            targets[volume["target"]] = str(volume.get("source", ""))
        else:
            source, _, rest = volume.partition(":")
            targets[rest.partition(":")[0]] = source
    return targets


def secret_paths(svc: dict[str, Any]) -> set[str]:
    """Where a service's secrets appear inside its container (/run/secrets/<name> by default)."""
    paths = set()
    for secret in svc.get("secrets") or []:
        if isinstance(secret, dict):
            target = secret.get("target") or secret["source"]
            paths.add(target if target.startswith("/") else f"{SECRETS_DIR}/{target}")
        else:
            paths.add(f"{SECRETS_DIR}/{secret}")
    return paths


def image_env() -> dict[str, str]:
    """The image's `ENV KEY=VALUE` lines (the Dockerfile writes one variable per ENV line)."""
    env = {}
    for line in DOCKERFILE.read_text().splitlines():
        m = re.fullmatch(r"ENV\s+([A-Za-z_][A-Za-z0-9_]*)=(\S+)\s*", line)
        if m:
            env[m.group(1)] = m.group(2)
    return env
