"""SQLAlchemy Core view of the index tables and the migration runner.

The tables are created by the numbered SQL files in ``migrations/index/`` (portable SQL run
unchanged on PostgreSQL and SQLite); the ``Table`` objects here only describe them for
queries. ``tests/contract/test_index.py`` checks that both agree.
"""

from __future__ import annotations

import logging
import re
from importlib import resources
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

log = logging.getLogger(__name__)
metadata = sa.MetaData()

_ID = sa.String(64)

state = sa.Table(
    "dicom_state_meta", metadata,
    sa.Column("tenant_id", _ID, primary_key=True),
    sa.Column("patient_id", _ID, nullable=False),
    sa.Column("study_uid", _ID, primary_key=True),
    sa.Column("series_uid", _ID, primary_key=True),
    sa.Column("study_uid_hash", sa.String(20), nullable=False),
    sa.Column("series_uid_hash", sa.String(20), nullable=False),
    sa.Column("patient_name", sa.Text),
    sa.Column("patient_sex", sa.String(16)),
    sa.Column("patient_birth_date", sa.Date),
    sa.Column("patient_birth_time", sa.String(32)),
    sa.Column("patient_age", sa.String(16)),
    sa.Column("patient_size", sa.Float),
    sa.Column("patient_weight", sa.Float),
    sa.Column("pregnancy_status", sa.Integer),
    sa.Column("study_date", sa.Date, nullable=False),
    sa.Column("study_date_origin", sa.String(16)),
    sa.Column("study_time", sa.String(32)),
    sa.Column("accession_number", _ID),
    sa.Column("study_id", _ID),
    sa.Column("study_description", sa.Text),
    sa.Column("modality", sa.String(16)),
    sa.Column("series_number", sa.Integer),
    sa.Column("series_date", sa.Date),
    sa.Column("series_time", sa.String(32)),
    sa.Column("series_description", sa.Text),
    sa.Column("body_part_examined", _ID),
    sa.Column("protocol_name", sa.Text),
    sa.Column("series_related_instances", sa.Integer, nullable=False),
    sa.Column("created_time", sa.DateTime, nullable=False),
    sa.Column("updated_time", sa.DateTime, nullable=False),
    sa.Column("referring_physician_name", sa.Text),
    sa.Column("specific_character_set", sa.String(128)),
    sa.Column("patient_name_lower", sa.Text),
)

instance = sa.Table(
    "dicom_instance", metadata,
    sa.Column("tenant_id", _ID, primary_key=True),
    sa.Column("sop_uid", _ID, primary_key=True),
    sa.Column("study_uid", _ID, nullable=False),
    sa.Column("series_uid", _ID, nullable=False),
    sa.Column("sop_class_uid", _ID, nullable=False),
    sa.Column("instance_number", sa.Integer),
    sa.Column("transfer_syntax_uid", _ID, nullable=False),
    sa.Column("number_of_frames", sa.Integer, nullable=False),
    sa.Column("image_rows", sa.Integer),
    sa.Column("image_columns", sa.Integer),
    sa.Column("bits_allocated", sa.Integer),
    sa.Column("file_path", sa.Text, nullable=False),
    sa.Column("file_size", sa.BigInteger, nullable=False),
    sa.Column("created_time", sa.DateTime, nullable=False),
    sa.Column("updated_time", sa.DateTime, nullable=False),
    sa.Column("pixel_offset", sa.BigInteger),
    sa.Column("frame_size", sa.BigInteger),
)

json_meta = sa.Table(
    "dicom_json_meta", metadata,
    sa.Column("tenant_id", _ID, primary_key=True),
    sa.Column("study_uid", _ID, primary_key=True),
    sa.Column("series_uid", _ID, primary_key=True),
    sa.Column("study_uid_hash", sa.String(20), nullable=False),
    sa.Column("series_uid_hash", sa.String(20), nullable=False),
    sa.Column("study_date_origin", sa.String(16)),
    sa.Column("flag_time", sa.DateTime, nullable=False),
    sa.Column("created_time", sa.DateTime, nullable=False),
    sa.Column("json_status", sa.Integer, nullable=False),
    sa.Column("retry_times", sa.Integer, nullable=False),
)

access_log = sa.Table(
    "access_log", metadata,
    sa.Column("trace_id", sa.String(64), primary_key=True),
    sa.Column("event_time", sa.DateTime, nullable=False),
    sa.Column("worker_node_id", sa.String(128)),
    sa.Column("tenant_id", _ID, nullable=False),
    sa.Column("protocol", sa.String(16), nullable=False),
    sa.Column("service", sa.String(128), nullable=False),
    sa.Column("route", sa.String(256), nullable=False),
    sa.Column("method", sa.String(16)),
    sa.Column("study_uid", _ID),
    sa.Column("series_uid", _ID),
    sa.Column("sop_uid", _ID),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("bytes_in", sa.BigInteger, nullable=False),
    sa.Column("bytes_out", sa.BigInteger, nullable=False),
    sa.Column("duration_ms", sa.Float, nullable=False),
    sa.Column("client_ip", _ID),
    sa.Column("principal", sa.String(256)),
    sa.Column("client_id", sa.String(256)),
    sa.Column("calling_ae", sa.String(16)),
    sa.Column("called_ae", sa.String(16)),
    sa.Column("user_agent", sa.String(256)),
    sa.Column("operations", sa.Integer, nullable=False),
)

_VERSIONS = sa.Table(
    "schema_migrations", sa.MetaData(),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("applied_time", sa.DateTime, nullable=False, server_default=sa.func.now()),
)
_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def migrations_dir() -> Path:
    """``migrations/index``: packaged in the wheel, or the repository's in a checkout."""
    packaged = resources.files("dicomcloud").joinpath("_migrations", "index")
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[3] / "migrations" / "index"


def migration_files() -> list[tuple[int, str, Path]]:
    """(version, name, path) of every migration, in order."""
    found = []
    for path in sorted(migrations_dir().glob("*.sql")):
        match = _FILE_RE.match(path.name)
        if match:
            found.append((int(match[1]), match[2], path))
    return found


def _statements(sql: str) -> list[str]:
    text = "\n".join(line for line in sql.splitlines() if not line.strip().startswith("--"))
    return [s.strip() for s in text.split(";") if s.strip()]


async def migrate(conn: AsyncConnection) -> list[str]:
    """Apply every migration not yet recorded in ``schema_migrations``; return their names.

    Each file runs in the caller's transaction. On PostgreSQL an advisory lock keeps two
    nodes starting at once from racing.
    """
    if conn.dialect.name == "postgresql":
        await conn.execute(sa.text("SELECT pg_advisory_xact_lock(7243519)"))
    await conn.run_sync(lambda c: _VERSIONS.create(c, checkfirst=True))
    done = set((await conn.execute(sa.select(_VERSIONS.c.version))).scalars())
    applied = []
    for version, name, path in migration_files():
        if version in done:
            continue
        for statement in _statements(path.read_text()):
            await conn.execute(sa.text(statement))
        await conn.execute(_VERSIONS.insert().values(version=version, name=name))
        applied.append(f"{version:04d}_{name}")
        log.info("applied index migration %04d_%s", version, name)
    return applied
