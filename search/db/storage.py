"""Where studies live. The storage URL is the only thing that differs between a laptop (SQLite,
the default) and a fleet (PostgreSQL); this module builds it safely and opens it with settings
that keep many workers and short outages harmless.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import optuna
import sqlalchemy
from sqlalchemy.engine import URL, make_url

from search.db import registry

DEFAULT_URL = "sqlite:///hpo.db"  # in the working directory: the embedded default
HEARTBEAT_SECONDS = int(os.environ.get("HPO_HEARTBEAT", "10"))
GRACE_SECONDS = int(os.environ.get("HPO_GRACE", "40"))
# How long a worker keeps retrying a database call before it gives up on the database.
OUTAGE_SECONDS = float(os.environ.get("HPO_OUTAGE_TOLERANCE", "600"))
PING_IDLE_SECONDS = 2.0  # a pooled connection unused for longer is checked before use

log = logging.getLogger(__name__)
T = TypeVar("T")
# Heartbeats, the stale-trial reaper and grouped TPE are marked experimental in Optuna; we rely on
# them knowingly. The worker beats for ask/tell trials itself (search/runtime/beat.py), which
# Optuna's "heartbeat is supposed to be used with Study.optimize" warning does not know about.
for _pattern in (".*heartbeat_interval.*", ".*fail_stale_trials.*", ".*``group``.*",
                 "Heartbeat of storage is supposed to be used with Study.optimize"):
    warnings.filterwarnings("ignore", message=_pattern)


class StorageError(RuntimeError):
    """The storage URL is malformed or the database cannot be reached; says which, never the
    password."""


def resolve_url(explicit: str | None = None) -> str:
    """`--storage`, else HPO_STORAGE, else a URL from HPO_DB_* parts, else SQLite in the cwd."""
    if explicit:
        return explicit
    if os.environ.get("HPO_STORAGE"):
        return os.environ["HPO_STORAGE"]
    if os.environ.get("HPO_DB_HOST"):
        return build_url(
            host=os.environ["HPO_DB_HOST"],
            port=int(os.environ.get("HPO_DB_PORT", "5432")),
            database=os.environ.get("HPO_DB_NAME", "hpo"),
            user=os.environ.get("HPO_DB_USER", "hpo"),
            password_file=os.environ.get("HPO_DB_PASSWORD_FILE") or None,
        )
    return DEFAULT_URL


def build_url(
    *,
    host: str,
    port: int,
    database: str,
    user: str,
    password_file: str | None = None,
    password: str | None = None,
) -> str:
    """A PostgreSQL URL with the password escaped, so `@ : / { } %` in it are harmless. The
    password comes from a file (a compose secret) rather than the environment or the command line,
    where the process list would show it."""
    if password_file is not None:
        try:
            password = Path(password_file).read_text().rstrip("\r\n")
        except OSError as e:
            raise StorageError(f"password file {password_file!r}: {e.strerror}") from e
    url = URL.create(
        "postgresql+psycopg2", username=user, password=password, host=host, port=port,
        database=database,
    )
    return url.render_as_string(hide_password=False)


def redact(url: str) -> str:
    """The URL as it may appear in logs and messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<malformed storage URL>"


def normalize_url(url: str) -> str:
    """Check the URL's shape and pick the PostgreSQL driver we ship (psycopg2): SQLAlchemy 2.1
    maps a bare postgresql:// to psycopg 3. A SQLite file's folder must exist: SQLite would only
    say 'unable to open database file'."""
    try:
        parsed = make_url(url)
    except Exception:
        raise StorageError(
            "storage URL is malformed; expected e.g. sqlite:///hpo.db or"
            " postgresql://user@host:5432/db"
        ) from None
    backend = parsed.get_backend_name()
    if backend == "postgresql" and parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg2")
    elif backend == "sqlite":
        path = parsed.database
        if path and path != ":memory:" and not Path(path).resolve().parent.is_dir():
            raise StorageError(
                f"storage {redact(url)}: folder {str(Path(path).parent)!r} does not exist"
            )
    elif backend not in ("postgresql", "mysql"):
        raise StorageError(f"storage {redact(url)}: unsupported database {backend!r}")
    return parsed.render_as_string(hide_password=False)


def engine_kwargs(url: str) -> dict[str, Any]:
    """Small pools (at most 2 connections per worker, so 100 workers fit PostgreSQL's default
    max_connections) and timeouts so a dead network fails a call instead of hanging it. (Idle
    connections are pinged before use: see `ping_when_idle`.)"""
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        # Several worker processes share the file: wait for the write lock instead of failing.
        return {"connect_args": {"timeout": 60}}
    kwargs: dict[str, Any] = {
        "pool_size": 1,
        "max_overflow": 1,
        "pool_timeout": 60,
        "pool_recycle": 600,
    }
    if backend == "postgresql":
        kwargs["connect_args"] = {
            "connect_timeout": 10,
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
            "application_name": "resnet-hpo",
        }
    return kwargs


def open_storage(url: str, *, create_schema: bool = False) -> optuna.storages.RDBStorage:
    """Open the storage with heartbeats on (the worker's reaper, `search.runtime.beat`, fails and
    re-queues the trials whose heartbeat went stale).

    Workers pass create_schema=False: they need only read/write rights, and a missing schema means
    `hpo create` has not run, which they report instead of creating tables.
    """
    url = normalize_url(url)
    if not create_schema:
        _check_schema_exists(url)
    try:
        with _schema_lock(url if create_schema else None):
            storage = optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs(url),
                skip_table_creation=not create_schema,
                heartbeat_interval=HEARTBEAT_SECONDS,
                grace_period=GRACE_SECONDS,
            )
            if create_schema:
                registry.create_schema(storage.engine)
    except ImportError as e:
        raise StorageError(f"storage {redact(url)}: no driver for this database ({e})") from None
    except Exception as e:  # connection refused, unknown database, schema mismatch, ...
        raise StorageError(f"cannot use storage {redact(url)}: {root_cause(e)}") from None
    ping_when_idle(storage.engine)
    if storage.engine.dialect.name == "sqlite":
        _sqlite_wal(storage.engine)
    return storage


# The PostgreSQL advisory lock key under which the schema is created (any constant; "hpo" in
# ASCII), so that two `hpo create` at once on a new database do not both create tables.
SCHEMA_LOCK_KEY = 0x68706F


@contextlib.contextmanager
def _schema_lock(url: str | None) -> Iterator[None]:
    """Let one process at a time create the schema, for the block: creating tables checks for
    each, then creates it, so two processes doing that at once on a new database both create
    one, and the second fails ("already exists", a duplicate type name or version row).
    PostgreSQL: its advisory lock SCHEMA_LOCK_KEY, on a connection of its own. SQLite: an
    exclusive flock on the database file's folder (it creates no file, and SQLite's own locks
    are fcntl locks on the file, which flock does not touch); where the folder cannot be locked
    (some network file systems, on which SQLite's WAL mode does not work anyway), none. `url`
    None, or another database: no lock."""
    parsed = None if url is None else make_url(url)
    if url is None or parsed is None or parsed.get_backend_name() not in ("sqlite", "postgresql"):
        yield
        return
    if parsed.get_backend_name() == "sqlite":
        with _folder_lock(parsed.database):
            yield
        return
    engine = sqlalchemy.create_engine(url, **engine_kwargs(url))
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"),
                         {"key": SCHEMA_LOCK_KEY})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"),
                             {"key": SCHEMA_LOCK_KEY})
    finally:
        engine.dispose()


@contextlib.contextmanager
def _folder_lock(database: str | None) -> Iterator[None]:
    if database in (None, "", ":memory:"):
        yield
        return
    try:
        fd = os.open(Path(database).resolve().parent, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):  # not lockable here: go on without
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def ping_when_idle(engine: sqlalchemy.Engine, idle_seconds: float = PING_IDLE_SECONDS) -> None:
    """Before a pooled connection is used, check it with `SELECT 1` if it sat unused for more
    than `idle_seconds`, and replace it if the check fails: a connection killed by a restart or
    by a firewall while the worker trained is replaced silently. SQLAlchemy's pool_pre_ping does
    this before every use, which for a worker is 30 extra round trips per trial; a connection
    used a moment ago is alive, and if the server died since, the call fails and `with_retry`
    repeats it on a new connection."""

    def checkin(_dbapi: Any, record: Any) -> None:
        record.info["returned"] = time.monotonic()

    def checkout(dbapi: Any, record: Any, _proxy: Any) -> None:
        if time.monotonic() - record.info.get("returned", -math.inf) <= idle_seconds:
            return
        try:
            cursor = dbapi.cursor()
            try:
                cursor.execute("SELECT 1")
            finally:
                cursor.close()
        except Exception as e:
            # The pool discards this connection and checks out (or opens) another.
            raise sqlalchemy.exc.DisconnectionError(str(e)) from e

    sqlalchemy.event.listen(engine, "checkin", checkin)
    sqlalchemy.event.listen(engine, "checkout", checkout)


def _check_schema_exists(url: str) -> None:
    """Readers and workers never create a database: a missing one means `hpo create` has not run
    against this URL (or the URL is wrong), and creating an empty one would hide that."""
    parsed = make_url(url)
    missing = StorageError(
        f"storage {redact(url)} holds no studies; run `hpo create` against it first"
    )
    if parsed.get_backend_name() == "sqlite":
        if parsed.database not in (None, "", ":memory:") and not Path(parsed.database).exists():
            raise missing
        return
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool,
                                      **{k: v for k, v in engine_kwargs(url).items()
                                         if k == "connect_args"})
    try:
        if not sqlalchemy.inspect(engine).has_table("version_info"):
            raise missing
    except sqlalchemy.exc.SQLAlchemyError as e:
        raise StorageError(f"cannot use storage {redact(url)}: {root_cause(e)}") from None
    finally:
        engine.dispose()


def _sqlite_wal(engine: sqlalchemy.Engine) -> None:
    """WAL lets readers (status, dashboard) run while a worker writes. It is a property of the
    file, so setting it once on any connection is enough."""
    if engine.url.database in (None, "", ":memory:"):
        return
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA journal_mode=WAL")


def with_retry(
    what: str, fn: Callable[[], T], *, budget: float = OUTAGE_SECONDS,
    landed: Callable[[], T | None] | None = None,
) -> T:
    """Call `fn`, retrying with backoff while the database is unreachable (restart, network
    blip). Errors that are not about the connection propagate at once.

    A write that must happen once passes `landed`: before each retry it returns what the failed
    attempt wrote, if its commit landed and only the reply was lost (then that is the result),
    or None (then `fn` runs again)."""
    delay, deadline = 0.5, time.monotonic() + budget
    failed = False
    while True:
        try:
            if failed and landed is not None and (found := landed()) is not None:
                return found
            return fn()
        except Exception as e:
            if not is_connection_error(e) or time.monotonic() + delay > deadline:
                raise
            log.warning("database unavailable during %s (%s); retrying in %.1fs", what,
                        root_cause(e), delay)
        failed = True
        time.sleep(delay)
        delay = min(delay * 2, 10.0)


def is_connection_error(e: BaseException) -> bool:
    """Whether `e`, or what it wraps (Optuna wraps driver errors in StorageInternalError), says
    the connection failed, rather than that the statement was wrong."""
    seen: set[int] = set()
    current: BaseException | None = e
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        # SQLAlchemy's wrappers, and the driver's own (psycopg2, sqlite3) when a pool reconnect
        # raises them bare: DB-API names these two classes the same in every driver.
        if type(current).__name__ in ("OperationalError", "InterfaceError"):
            return True
        if isinstance(current, sqlalchemy.exc.DBAPIError) and current.connection_invalidated:
            return True
        current = current.__cause__ or current.__context__
    return False


def root_cause(e: BaseException) -> str:
    """The first line of the innermost error: Optuna wraps the driver's words ("connection
    refused", "database does not exist") in a generic message of its own."""
    while True:
        inner = getattr(e, "orig", None) or e.__cause__ or e.__context__
        if inner is None or inner is e:
            return _first_line(e)
        e = inner


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
