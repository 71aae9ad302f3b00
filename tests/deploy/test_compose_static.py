"""What can be checked in the deployment files without a Docker engine: every variable the compose
file reads is documented, no password is written down anywhere, the dashboard and the database
are published on loopback only, the workers reserve GPUs, restart and get time to checkpoint, and
the image installs the torch that pyproject.toml pins."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.deploy import (
    COMPOSE_FILE,
    DOCKERFILE,
    ENV_EXAMPLE,
    HPO_SERVICES,
    ROOT,
    InterpolationError,
    environment,
    image_env,
    load_compose,
    read_env_file,
    secret_paths,
    service,
    variables_read,
    volume_targets,
)

REQUIRED = {"HPO_STUDY": "c10", "HPO_SPACE": "cifar10-resnet.toml"}  # no default on purpose
# Two ways the file is read: with .env copied from .env.example, and with no .env at all (only
# the variables that have no default), so both the documented values and compose's defaults pass.
ENVS = {"env.example": read_env_file(), "defaults only": REQUIRED}
MIN_GRACE_SECONDS = 60  # Docker's default is 10 s: too short to write a big checkpoint
DEPLOY_FILES = [COMPOSE_FILE, ENV_EXAMPLE, ROOT / ".dockerignore"]


def _strings(value: Any) -> Iterator[str]:
    """Every string value in parsed YAML: what compose interpolates (keys are not)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)


# ---- variables ----------------------------------------------------------------------------------


def test_every_variable_the_compose_file_reads_is_in_env_example() -> None:
    read = set().union(*(variables_read(s) for s in _strings(load_compose())))
    documented = set(read_env_file())
    assert read, "docker-compose.yml reads no variable: the parse went wrong"
    assert not read - documented, f"read by docker-compose.yml, missing in .env.example: " \
                                  f"{sorted(read - documented)}"
    assert not documented - read, f"in .env.example, never read by docker-compose.yml: " \
                                  f"{sorted(documented - read)}"


def test_every_variable_has_a_default_or_a_message() -> None:
    """A bare ${VAR} that is unset becomes "" silently (a worker for study "", a mount of ""):
    each use must say its default (:-) or refuse to start with a message (:?)."""
    bare = []
    for text in _strings(load_compose()):
        for m in re.finditer(r"\$(\$|\{[^}]*\}|[A-Za-z_]\w*)", text):
            token = m.group(1)
            if token != "$" and not re.fullmatch(r"\{\w+:[-?][^}]+\}", token):
                bare.append(token)
    assert not bare, f"variables without a default or an error message: {bare}"


def test_every_variable_in_env_example_is_explained() -> None:
    """Each KEY=VALUE line sits in a paragraph (lines between blank lines) with a comment."""
    paragraphs = ENV_EXAMPLE.read_text().split("\n\n")
    for paragraph in paragraphs:
        lines = [line for line in paragraph.splitlines() if line.strip()]
        assigns = [line for line in lines if not line.startswith("#")]
        if assigns:
            assert any(line.startswith("#") for line in lines), f"undocumented: {assigns}"


def test_a_missing_study_name_stops_compose_instead_of_running_study_nothing() -> None:
    compose = load_compose()
    for name in ("create", "worker"):
        with pytest.raises(InterpolationError, match="HPO_STUDY"):
            service(compose, name, {k: v for k, v in REQUIRED.items() if k != "HPO_STUDY"})


# ---- no password written down ----------------------------------------------------------------

_ASSIGNMENT = re.compile(
    r"(?i)(?P<key>[\w.-]*(?:password|passwd|pwd)[\w.-]*)[\"']?[ \t]*[:=][ \t]*"
    r"(?P<value>[^\s#,\]}]*)"
)
_URL_CREDENTIALS = re.compile(r"(?i)\b[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@")


def password_literals(text: str) -> list[str]:
    """Lines that give a password a value. Allowed: a key ending in _FILE (it names a file, never
    holds the password), a value under /run/secrets/, and a key with no value (a YAML mapping such
    as the `db_password:` secret's declaration)."""
    found = []
    for line in text.splitlines():
        for m in _ASSIGNMENT.finditer(line):
            value = m.group("value").strip("\"'")
            if value and not m.group("key").upper().endswith("_FILE") \
                    and not value.startswith("/run/secrets/"):
                found.append(line.strip())
        if _URL_CREDENTIALS.search(line):
            found.append(line.strip())
    return found


@pytest.mark.parametrize("line, leaks", [
    ("POSTGRES_PASSWORD: hunter2", True),
    ("HPO_DB_PASSWORD=s3cret", True),
    ("password = 's3cret'", True),
    ('ENV PGPASSWORD="x"', True),
    ("HPO_STORAGE=postgresql+psycopg2://hpo:s3cret@db:5432/hpo", True),
    ("POSTGRES_PASSWORD: ${PG_PASSWORD}", True),  # an environment variable is not a secret
    ("POSTGRES_PASSWORD_FILE: /run/secrets/db_password", False),
    ("HPO_DB_PASSWORD_FILE=docker/secrets/db_password", False),
    ("  db_password:", False),
    ("secrets: [db_password]", False),
    ("HPO_STORAGE=postgresql://hpo@db:5432/hpo", False),
])
def test_the_password_scan_tells_a_literal_from_a_reference(line: str, leaks: bool) -> None:
    assert bool(password_literals(line)) is leaks


def _deploy_files() -> list[Path]:
    secrets = ROOT / "docker" / "secrets"
    in_docker = [p for p in sorted((ROOT / "docker").rglob("*"))
                 if p.is_file() and secrets not in p.parents]
    return [*in_docker, *DEPLOY_FILES]


@pytest.mark.parametrize("path", _deploy_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_password_literal_in_deployment_files(path: Path) -> None:
    assert not password_literals(path.read_text()), f"{path.relative_to(ROOT)} holds a password"


def test_the_password_is_a_compose_secret_for_every_service_that_uses_the_database() -> None:
    compose = load_compose()
    declared = compose["secrets"]["db_password"]["file"]
    assert declared.lstrip("./").startswith("docker/secrets/")
    postgres = service(compose, "postgres", ENVS["env.example"])
    pg_env = environment(postgres)
    assert "POSTGRES_PASSWORD" not in pg_env
    assert pg_env["POSTGRES_PASSWORD_FILE"] in secret_paths(postgres)
    for name in HPO_SERVICES:
        svc = service(compose, name, ENVS["env.example"])
        env = environment(svc)
        assert env["HPO_DB_PASSWORD_FILE"] in secret_paths(svc), name
        assert not {"HPO_STORAGE", "HPO_DB_PASSWORD"} & set(env), name


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_env_and_secrets_are_git_ignored() -> None:
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse"], capture_output=True).returncode:
        pytest.skip(f"{ROOT} is not a git work tree")
    for path in (".env", "docker/secrets/db_password"):
        ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", path])
        assert ignored.returncode == 0, f"{path} is not git-ignored"


def _docker_ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase(c, pattern) for c in candidates):
            ignored = not negate
    return ignored


def test_the_build_context_holds_the_source_and_no_secrets() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for path in (".env", "docker/secrets/db_password", ".venv/bin/python", "data/cifar/x.bin",
                 "hpo.db", "hpo-artifacts/c10/x.pt", ".git/config", "search/__pycache__/a.pyc"):
        assert _docker_ignored(path, patterns), f"{path} would be sent to the image build"
    copied = [src for line in DOCKERFILE.read_text().splitlines()
              if (m := re.match(r"COPY\s+(?!--from)(.+)\s+\S+$", line))
              for src in m.group(1).split()]
    assert copied, "the Dockerfile copies nothing"
    for src in copied:
        assert (ROOT / src).exists(), f"the Dockerfile copies {src}, which does not exist"
        assert not _docker_ignored(src, patterns), f".dockerignore leaves out {src}"


# ---- ports ------------------------------------------------------------------------------------


def _published(svc: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host ip, host port, container port) of each published port; ip "" means every address."""
    out = []
    for port in svc.get("ports") or []:
        if isinstance(port, dict):
            out.append((port.get("host_ip", ""), str(port.get("published", "")),
                        str(port["target"])))
            continue
        parts = str(port).rsplit(":", 2)
        parts = [""] * (3 - len(parts)) + parts
        out.append((parts[0], parts[1], parts[2]))
    return out


@pytest.mark.parametrize("env_name", ENVS)
def test_published_ports_are_on_loopback_only(env_name: str) -> None:
    compose = load_compose()
    for name in compose["services"]:
        for ip, host_port, _ in _published(service(compose, name, ENVS[env_name])):
            where = ip or "every address"
            assert ip == "127.0.0.1", f"{name} publishes port {host_port} on {where}"
    dashboard = service(compose, "dashboard", ENVS[env_name])
    ((ip, host_port, container_port),) = _published(dashboard)
    assert host_port == ENVS["env.example"]["HPO_DASHBOARD_PORT"]
    cmd = dashboard["command"]
    # Inside the container it listens on every interface of the container, on the published port.
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--port") + 1] == container_port


# ---- services ---------------------------------------------------------------------------------


def _grace_seconds(text: str) -> float:
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def test_workers_reserve_gpus_restart_on_failure_and_have_time_to_checkpoint() -> None:
    compose = load_compose()
    worker = service(compose, "worker", ENVS["env.example"])
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
               and d.get("count") == "all" for d in devices), devices
    # Restarted after a crash, but not forever: a worker without data exits 3 again at once.
    policy, _, retries = str(worker["restart"]).partition(":")
    assert policy == "on-failure" and 1 <= int(retries) <= 10, worker["restart"]
    assert _grace_seconds(str(worker["stop_grace_period"])) >= MIN_GRACE_SECONDS
    assert worker["depends_on"]["create"]["condition"] == "service_completed_successfully"
    assert "replicas" not in worker.get("deploy", {}), "a fixed count would fight --scale"
    assert "container_name" not in worker, "a fixed name makes --scale impossible"

    # One worker per GPU without hand-editing: each claims a free index, with its lock file on a
    # named volume that every worker container on the host mounts.
    env = environment(worker)
    assert env["HPO_DEVICE"] == "cuda:free"
    lock_volume = volume_targets(worker)[env["HPO_GPU_LOCK_DIR"]]
    assert lock_volume in compose["volumes"], "the GPU lock folder must be a shared named volume"


def test_postgres_has_a_health_check_and_a_named_volume() -> None:
    compose = load_compose()
    postgres = service(compose, "postgres", ENVS["env.example"])
    assert str(postgres["image"]).startswith("postgres:15")
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    data = volume_targets(postgres)["/var/lib/postgresql/data"]
    assert data in compose["volumes"]


def test_create_runs_once_after_postgres_is_healthy() -> None:
    compose = load_compose()
    create = service(compose, "create", ENVS["env.example"])
    assert create["command"][0] == "create"
    assert create["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert str(create.get("restart", "no")) == "no"
    space = create["command"][create["command"].index("--space") + 1]
    assert any(space.startswith(target + "/") for target in volume_targets(create))
    # It checks the dataset before a worker starts, so it sees the workers' data folder.
    worker = service(compose, "worker", ENVS["env.example"])
    assert volume_targets(create)["/data"] == volume_targets(worker)["/data"]


@pytest.mark.parametrize("name", HPO_SERVICES)
def test_hpo_services_reach_the_compose_database_through_the_url_builder(name: str) -> None:
    compose = load_compose()
    postgres = environment(service(compose, "postgres", ENVS["env.example"]))
    svc = service(compose, name, ENVS["env.example"])
    env = environment(svc)
    assert env["HPO_DB_HOST"] == "postgres" and "postgres" in compose["services"]
    assert env["HPO_DB_NAME"] == postgres["POSTGRES_DB"]
    assert env["HPO_DB_USER"] == postgres["POSTGRES_USER"]
    assert svc["image"] == service(compose, "create", ENVS["env.example"])["image"]
    assert svc["init"] is True, "tini forwards SIGTERM to hpo and reaps child processes"
    if name != "create":  # checkpoints are shared: one named volume at one path everywhere
        assert volume_targets(svc)[env["HPO_ARTIFACTS"]] == "artifacts"


@pytest.mark.parametrize("name", HPO_SERVICES)
def test_each_service_command_is_one_the_cli_accepts(name: str) -> None:
    from search.cli import _parser

    svc = service(load_compose(), name, ENVS["env.example"])
    try:
        args = _parser().parse_args(svc["command"])
    except SystemExit:
        pytest.fail(f"`hpo {' '.join(svc['command'])}` (service {name}) is refused by the CLI")
    if name in ("create", "worker", "hpo"):
        assert getattr(args, "study", None) == ENVS["env.example"]["HPO_STUDY"]


# ---- the image --------------------------------------------------------------------------------


def _pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {name: version for dep in deps
            if (m := re.fullmatch(r"([A-Za-z0-9_.-]+)==([^;\s]+)", dep.strip()))
            for name, version in [m.groups()]}


def test_the_image_installs_the_torch_pyproject_pins() -> None:
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))
    pins = _pins()
    assert args["TORCH_VERSION"] == pins["torch"]
    assert args["TORCHVISION_VERSION"] == pins["torchvision"]
    # The pins are what the base image and the pip step actually use, not decoration.
    assert re.search(r"^FROM\s+pytorch/pytorch:\$\{TORCH_VERSION\}-\$\{CUDA_TAG\}", text, re.M)
    assert '"torch==${TORCH_VERSION}"' in text and '"torchvision==${TORCHVISION_VERSION}"' in text
    assert re.search(r"pip install /tmp/src\b", text), "the project itself is pip-installed"


def test_the_image_runs_hpo_as_a_non_root_user_with_its_folders_on_volumes() -> None:
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0"), "the image must end as a non-root user"
    assert re.search(r'^ENTRYPOINT \["hpo"\]$', text, re.M)
    (volumes,) = re.findall(r"^VOLUME\s+(\[.*\])$", text, re.M)
    env = image_env()
    for folder in ("/data", env["HPO_ARTIFACTS"], env["TORCH_HOME"]):
        assert f'"{folder}"' in volumes, f"{folder} is not a volume"
    assert env["HPO_ARTIFACTS"] == "/artifacts"
