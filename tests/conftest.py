"""Fixtures shared by every test file.

The PostgreSQL server comes from one environment variable,
GOVDB_TEST_POSTGRES_URL (scripts/test.sh sets it from `govdb pg url`).
Without it, a local server started by `govdb pg start` in .govdb/pg is used.
With GOVDB_REQUIRE_POSTGRES=1 or CI set, a missing server fails the tests
that need it instead of skipping them.

`DB_BACKEND` narrows the backend matrix the way the spec runs the suite:
`DB_BACKEND=postgres pytest tests/test_db_integration.py` runs only the
PostgreSQL configurations.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from govdb.config import SecretUrl, Settings

REPO = Path(__file__).resolve().parent.parent
#: dual: SQLite + PostgreSQL (AGE), reads from PostgreSQL, writes applied behind (DB_DUAL_APPLY
#: background, the default); dual-sqlite-read: reads from SQLite, writes applied before they return (sync).
DUAL_CONFIGS = ("dual", "dual-sqlite-read")
ALL_CONFIGS = ("sqlite", "postgres", "postgres-noage", *DUAL_CONFIGS)
_BY_BACKEND = {
    "sqlite": ("sqlite",),
    "postgres": ("postgres", "postgres-noage"),
    "dual": DUAL_CONFIGS,
}


def selected_configs() -> tuple[str, ...]:
    backend = os.environ.get("DB_BACKEND", "").strip().lower()
    return _BY_BACKEND.get(backend, ALL_CONFIGS) if backend else ALL_CONFIGS


def postgres_required() -> bool:
    return bool(os.environ.get("GOVDB_REQUIRE_POSTGRES") or os.environ.get("CI"))


def _server_url() -> str | None:
    url = os.environ.get("GOVDB_TEST_POSTGRES_URL", "").strip()
    if url:
        return url
    try:
        from govdb import localpg
        status = localpg.status(REPO / ".govdb" / "pg")
        if status:
            return localpg.url(REPO / ".govdb" / "pg")
    except Exception:  # noqa: BLE001 - no local server is a normal state here
        pass
    return os.environ.get("DB_POSTGRES_URL", "").strip() or None


def with_database(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, parts.fragment))


@dataclass
class PgServer:
    url: str
    templates: dict[str, str]  # config name -> template database

    async def admin(self):
        import asyncpg
        return await asyncpg.connect(self.url)

    async def create_database(self, config: str) -> str:
        name = f"govdb_t_{uuid.uuid4().hex[:12]}"
        conn = await self.admin()
        try:
            template = self.templates["postgres" if config in DUAL_CONFIGS else config]
            await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        finally:
            await conn.close()
        return name

    async def drop_database(self, name: str) -> None:
        await _drop_databases(self.url, [name])


def settings_for(config: str, *, tmp_path: Path | None = None, pg_url: str | None = None) -> Settings:
    """Settings as an operator would set them for one test configuration."""
    env = {"DB_BACKEND": "sqlite" if config == "sqlite" else "dual" if config in DUAL_CONFIGS else "postgres"}
    if tmp_path is not None:
        env["DB_SQLITE_PATH"] = str(tmp_path / "governance.db")
    if pg_url is not None:
        env["DB_POSTGRES_URL"] = pg_url
        env["DB_POSTGRES_MIN_CONN"] = "1"
        env["DB_POSTGRES_MAX_CONN"] = "20"
    if config == "postgres-noage":
        env["DB_AGE_ENABLED"] = "0"
    if config == "dual-sqlite-read":
        env["DB_DUAL_READ_PRIMARY"] = "sqlite"
        env["DB_DUAL_APPLY"] = "sync"
    env["DB_AGE_GRAPH"] = "governance"
    return Settings.from_env(env)


async def _build_templates(url: str) -> dict[str, str]:
    import asyncpg
    from govdb.backends.postgres import PostgresDatabase

    # Named per test run, so runs sharing one server do not drop each other's.
    templates = {"postgres": f"govdb_tpl_age_{os.getpid()}", "postgres-noage": f"govdb_tpl_noage_{os.getpid()}"}
    conn = await asyncpg.connect(url)
    try:
        for name in templates.values():
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    for config, name in templates.items():
        db = PostgresDatabase.from_settings(settings_for(config, pg_url=with_database(url, name)))
        await db.connect()
        await db.close()
    return templates


async def _drop_databases(url: str, names) -> None:
    import asyncpg
    conn = await asyncpg.connect(url)
    try:
        for name in names:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def _in_thread(coro):
    # A thread of its own: session fixtures may first be requested from
    # inside a running event loop (an async fixture).
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


@pytest.fixture(scope="session")
def pg_server():
    url = _server_url()
    if not url:
        message = ("no PostgreSQL for the tests: set GOVDB_TEST_POSTGRES_URL "
                   "or run `govdb pg start` (scripts/test.sh does both)")
        if postgres_required():
            pytest.fail(message)
        pytest.skip(message)
    try:
        templates = _in_thread(_build_templates(url))
    except OSError as exc:
        pytest.fail(f"PostgreSQL at {SecretUrl(url)} is not reachable: {exc}")
    yield PgServer(url=url, templates=templates)
    _in_thread(_drop_databases(url, templates.values()))


def pytest_generate_tests(metafunc):
    """Parametrise `config` over the selected configurations.

    `@pytest.mark.backends("postgres", ...)` limits a test to the engines
    whose storage it inspects, so it is not even collected for the others.
    """
    if "config" not in metafunc.fixturenames:
        return
    configs = selected_configs()
    marker = metafunc.definition.get_closest_marker("backends")
    if marker:
        configs = tuple(c for c in configs if c in marker.args)
    metafunc.parametrize("config", configs)


@dataclass
class Store:
    """One fresh store of a configuration; `open()` gives connected backends on it."""

    config: str
    settings: Settings
    pg_server: PgServer | None = None
    dbname: str | None = None
    opened: list[Any] = field(default_factory=list)

    async def open(self):
        from govdb.backends import create_backend
        db = create_backend(self.settings)
        await db.connect()
        self.opened.append(db)
        return db

    async def _settled(self) -> None:
        """Wait until the dual backends opened here applied their acknowledged writes to
        PostgreSQL (DB_DUAL_APPLY=background), so a look straight into it sees them."""
        for db in self.opened:
            if hasattr(db, "flush"):
                await db.flush()

    async def execute(self, script: str) -> None:
        """Run SQL statements straight on the underlying PostgreSQL store."""
        import asyncpg
        await self._settled()
        conn = await asyncpg.connect(self.settings.postgres_url.reveal())
        try:
            await conn.execute(script)
        finally:
            await conn.close()

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """Read a value straight from the underlying store (for storage checks)."""
        if self.config == "sqlite":
            import sqlite3
            with sqlite3.connect(self.settings.sqlite_path) as conn:
                row = conn.execute(sql, args).fetchone()
            return None if row is None else row[0]
        import asyncpg
        await self._settled()
        conn = await asyncpg.connect(self.settings.postgres_url.reveal())
        try:
            return await conn.fetchval(sql, *args)
        finally:
            await conn.close()


@pytest.fixture
async def store(config, tmp_path, request) -> AsyncIterator[Store]:
    if config == "sqlite":
        yield Store(config, settings_for(config, tmp_path=tmp_path))
        return
    server: PgServer = request.getfixturevalue("pg_server")
    name = await server.create_database(config)
    try:
        yield Store(config, settings_for(config, tmp_path=tmp_path, pg_url=with_database(server.url, name)),
                    server, name)
    finally:
        await server.drop_database(name)


@pytest.fixture
async def db(store: Store):
    database = await store.open()
    try:
        yield database
    finally:
        await database.close()


def _free_port() -> int:
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def throwaway_postgres(tmp_path_factory):
    """A PostgreSQL 17 + AGE cluster of this test alone: yields (url, data_dir, port); stopped at the end.

    For tests that stop or kill the server (the shared test server must never
    be). Needs what `govdb pg start` needs; fails (not skips) with
    GOVDB_REQUIRE_POSTGRES=1 when it cannot start.
    """
    from govdb import localpg
    data_dir = tmp_path_factory.mktemp("throwaway-pg")
    port = _free_port()
    try:
        server = localpg.start(data_dir, port=port, log=lambda _: None)
    except Exception as exc:  # noqa: BLE001 - any failure to start means "no server for this test"
        message = f"cannot start a throwaway PostgreSQL in {data_dir} ({type(exc).__name__}: {exc})"
        if postgres_required():
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield server.url, data_dir, port
    finally:
        localpg.stop(data_dir)


def generate_legacy_file(path: Path, scale: float) -> Path:
    """Write a legacy governance.db with bench/generate_legacy.py (every dirty case included)."""
    import sys
    sys.path.insert(0, str(REPO / "bench"))
    from generate_legacy import generate
    generate(path, scale=scale, dirty=True)
    return path


@pytest.fixture(scope="session")
def dirty_legacy_template(tmp_path_factory) -> Path:
    """A small dirty legacy file (scale 0.002), made once per run. Never write to it: copy it."""
    return generate_legacy_file(tmp_path_factory.mktemp("legacy") / "dirty.db", 0.002)


def copy_of(template: Path, directory: Path, name: str = "governance.db") -> Path:
    """Return a copy of ``template`` in ``directory`` (a test may change its copy)."""
    import shutil
    return Path(shutil.copy(template, directory / name))
