"""Passwords and database rights: special characters survive the URL builder, no password leaks
into logs, output, errors or the process list, and a worker needs no schema rights."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import psycopg2
import pytest
from sqlalchemy.engine import make_url

from search.db.storage import build_url, redact
from tests.helpers import admin, hpo, hpo_env, tiny_space

HOSTILE = "p@ss:w/rd{x}%41 é;'\""


def test_url_builder_keeps_every_character_of_the_password(tmp_path: Path) -> None:
    secret = tmp_path / "db_password"
    secret.write_text(HOSTILE + "\n")  # a trailing newline, as `echo pw > file` writes
    url = build_url(host="127.0.0.1", port=5432, database="test", user="postgres",
                    password_file=str(secret))
    parsed = make_url(url)
    assert parsed.password == HOSTILE
    assert (parsed.host, parsed.port, parsed.database) == ("127.0.0.1", 5432, "test")
    assert HOSTILE not in redact(url) and "***" in redact(url)
    # The driver receives the same password the file holds.
    assert parsed.translate_connect_args()["password"] == HOSTILE


def test_no_password_in_logs_output_errors_or_process_list(pg_url: str, tmp_path: Path) -> None:
    secret = tmp_path / "db_password"
    secret.write_text(HOSTILE)
    db = make_url(pg_url)
    # The URL comes from parts and a password file, as in the compose deployment. (The local
    # server trusts 127.0.0.1, so the password is sent and ignored: what matters is where it
    # shows up.)
    parts = {"HPO_DB_HOST": "127.0.0.1", "HPO_DB_PORT": str(db.port or 5432),
             "HPO_DB_NAME": db.database, "HPO_DB_USER": "postgres",
             "HPO_DB_PASSWORD_FILE": str(secret)}
    env = {k: v for k, v in hpo_env("").items() if k != "HPO_STORAGE"} | parts
    space = tiny_space(tmp_path / "s.toml", trials1=1, trials2=1, epochs=1)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "search.cli", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)

    create = run("create", "--space", str(space), "--study", "sec")
    worker = subprocess.Popen(
        [sys.executable, "-m", "search.cli", "worker", "--study", "sec", "--device", "cpu",
         "--threads", "1", "--artifacts", str(tmp_path / "a")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cmdline = Path(f"/proc/{worker.pid}/cmdline").read_bytes().decode(errors="replace")
    out, _ = worker.communicate(timeout=600)
    status = run("status", "sec")
    unreachable = subprocess.run(
        [sys.executable, "-m", "search.cli", "status", "sec"], cwd=tmp_path,
        env=env | {"HPO_DB_PORT": "1"}, capture_output=True, text=True, timeout=120)

    assert create.returncode == 0, create.stderr
    assert worker.returncode == 0, out[-3000:]
    assert status.returncode == 0, status.stderr
    assert unreachable.returncode == 2 and "Connection refused" in unreachable.stderr
    texts = {"create": create.stdout + create.stderr, "worker log": out,
             "status": status.stdout + status.stderr, "error": unreachable.stderr,
             "process list": cmdline}
    for where, text in texts.items():
        assert HOSTILE not in text, f"password leaked into {where}"
        assert "p@ss" not in text, f"part of the password leaked into {where}"


@pytest.fixture
def worker_role(pg_url: str) -> str:
    """A role that may read and write rows but not change the schema, like a fleet's workers."""
    role = f"hpo_worker_{uuid.uuid4().hex[:8]}"
    conn = admin()
    with conn.cursor() as cur:
        cur.execute(f'CREATE ROLE "{role}" LOGIN')
    conn.close()
    yield role
    db = make_url(pg_url)
    # Its grants live in the test database: revoke them there, then the role can go.
    conn = psycopg2.connect(host=db.host, port=db.port or 5432, user="postgres",
                            dbname=db.database)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP OWNED BY "{role}"')
    conn.close()
    conn = admin()
    with conn.cursor() as cur:
        cur.execute(f'DROP ROLE IF EXISTS "{role}"')
    conn.close()


def test_worker_needs_no_schema_rights(pg_url: str, worker_role: str, tmp_path: Path) -> None:
    space = tiny_space(tmp_path / "s.toml", trials1=2, trials2=1, epochs=1)
    created = hpo("create", "--space", str(space), "--study", "r", url=pg_url, cwd=tmp_path)
    assert created.returncode == 0, created.stderr

    db = make_url(pg_url)
    with psycopg2.connect(host=db.host, port=db.port or 5432, user="postgres",
                          dbname=db.database) as conn, conn.cursor() as cur:
        # What the README tells an operator to grant a worker role: data, never DDL.
        cur.execute(f'GRANT CONNECT ON DATABASE "{db.database}" TO "{worker_role}"')
        cur.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public'
                    f' TO "{worker_role}"')
        cur.execute(f'GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO "{worker_role}"')
        cur.execute(f'REVOKE CREATE ON SCHEMA public FROM PUBLIC, "{worker_role}"')
    conn.close()

    as_worker = db.set(username=worker_role).render_as_string(hide_password=False)
    with psycopg2.connect(host=db.host, port=db.port or 5432, user=worker_role,
                          dbname=db.database) as conn, conn.cursor() as cur, \
            pytest.raises(psycopg2.errors.InsufficientPrivilege):
        cur.execute("CREATE TABLE intruder (x int)")
    conn.close()

    worker = subprocess.run(
        [sys.executable, "-m", "search.cli", "worker", "--study", "r", "--device", "cpu",
         "--threads", "1", "--artifacts", str(tmp_path / "a")],
        cwd=tmp_path, env=hpo_env(as_worker), capture_output=True, text=True, timeout=600)
    assert worker.returncode == 0, worker.stderr[-3000:]
    status = hpo("status", "r", "--json", url=as_worker, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert '"complete": ' in status.stdout

