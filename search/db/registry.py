"""The service's own tables, beside Optuna's in the same database: pipelines (the space file a
study was created from), opened stages (the values they carry over, written once so every worker
uses the same ones) and workers (for `hpo status`).

Only `hpo create` creates these tables; workers need read/write rights alone.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, Text

metadata = MetaData()
pipelines = Table(
    "hpo_pipelines", metadata,
    Column("name", String(256), primary_key=True),
    Column("spec", Text, nullable=False),  # Pipeline.to_json()
    Column("digest", String(64), nullable=False),
    Column("source", Text, nullable=False),  # the space file it came from, for messages
    Column("created_at", DateTime, nullable=False, server_default=sa.func.now()),
)
stages = Table(
    "hpo_stages", metadata,
    Column("pipeline", String(256), primary_key=True),
    Column("stage", String(128), primary_key=True),
    Column("carried", Text, nullable=False),  # JSON: TrainConfig values from earlier stages
    Column("source", Text, nullable=False),  # JSON: which trial they came from
    Column("opened_at", DateTime, nullable=False, server_default=sa.func.now()),
)
workers = Table(
    "hpo_workers", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("pipeline", String(256), nullable=False, index=True),
    Column("host", String(256), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("device", String(64), nullable=False),
    Column("state", String(32), nullable=False),  # running | done | stopped | failed
    Column("trials_done", Integer, nullable=False, default=0),
    Column("current", String(256), nullable=False, default=""),  # "<stage>#<trial number>"
    Column("started_at", DateTime, nullable=False, server_default=sa.func.now()),
    Column("last_seen", DateTime, nullable=False, server_default=sa.func.now()),
)


@dataclass(frozen=True)
class OpenedStage:
    carried: dict[str, Any]
    source: dict[str, Any]
    # `grid.key` of the configuration the stage's trials start from, when the trial it carried
    # from trained exactly it (set by `search.db.pipeline.open_stage`, not stored here)
    trained: str | None = None


def create_schema(engine: sa.Engine) -> None:
    metadata.create_all(engine)


def has_schema(engine: sa.Engine) -> bool:
    return sa.inspect(engine).has_table("hpo_pipelines")


def get_pipeline_row(engine: sa.Engine, name: str) -> dict[str, Any] | None:
    if not has_schema(engine):
        return None
    with engine.connect() as conn:
        row = conn.execute(sa.select(pipelines).where(pipelines.c.name == name)).mappings().first()
    return dict(row) if row else None


def insert_pipeline(engine: sa.Engine, name: str, spec: str, digest: str, source: str) -> bool:
    """Insert the pipeline; False when one of that name was already there (nothing changed)."""
    try:
        with engine.begin() as conn:
            conn.execute(
                pipelines.insert().values(name=name, spec=spec, digest=digest, source=source)
            )
    except sa.exc.IntegrityError:
        return False
    return True


def list_pipelines(engine: sa.Engine) -> list[str]:
    if not has_schema(engine):
        return []
    with engine.connect() as conn:
        return list(conn.execute(sa.select(pipelines.c.name).order_by(pipelines.c.name)).scalars())


def get_stage(engine: sa.Engine, pipeline: str, stage: str) -> OpenedStage | None:
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(stages).where(stages.c.pipeline == pipeline, stages.c.stage == stage)
        ).mappings().first()
    if row is None:
        return None
    return OpenedStage(carried=json.loads(row["carried"]), source=json.loads(row["source"]))


def open_stage(
    engine: sa.Engine, pipeline: str, stage: str, carried: dict[str, Any], source: dict[str, Any]
) -> OpenedStage:
    """Record what `stage` carries over; the first writer wins and everyone gets its values, so
    two workers opening the stage at once cannot start it from different configurations."""
    try:
        with engine.begin() as conn:
            conn.execute(stages.insert().values(
                pipeline=pipeline, stage=stage, carried=json.dumps(carried, sort_keys=True),
                source=json.dumps(source, sort_keys=True),
            ))
    except sa.exc.IntegrityError:
        pass
    opened = get_stage(engine, pipeline, stage)
    assert opened is not None
    return opened


def register_worker(engine: sa.Engine, pipeline: str, device: str) -> int:
    with engine.begin() as conn:
        result = conn.execute(workers.insert().values(
            pipeline=pipeline, host=socket.gethostname(), pid=os.getpid(), device=device,
            state="running", trials_done=0, current="",
        ))
        key = result.inserted_primary_key
        assert key is not None  # an INSERT of one row
        return int(key[0])


def touch_worker(engine: sa.Engine, worker_id: int, **values: Any) -> None:
    """Update `last_seen` (the database's clock) and any of state, trials_done, current."""
    with engine.begin() as conn:
        conn.execute(
            workers.update().where(workers.c.id == worker_id)
            .values(last_seen=sa.func.now(), **values)
        )


def list_workers(engine: sa.Engine, pipeline: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        now = conn.execute(sa.select(sa.func.now())).scalar_one()
        rows = conn.execute(
            sa.select(workers).where(workers.c.pipeline == pipeline).order_by(workers.c.id)
        ).mappings().all()
    out = []
    for row in rows:
        item = dict(row)
        item["seconds_since_seen"] = _seconds_between(row["last_seen"], now)
        out.append(item)
    return out


def _seconds_between(earlier: datetime | str, later: datetime | str) -> float:
    # SQLite hands back strings for func.now(); PostgreSQL hands back datetimes.
    def as_dt(v: datetime | str) -> datetime:
        return datetime.fromisoformat(v) if isinstance(v, str) else v.replace(tzinfo=None)

    return (as_dt(later) - as_dt(earlier)).total_seconds()
