"""The `govdb` command as a user runs it: real subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import _drop_databases, _in_thread, with_database

GOVDB = [sys.executable, "-m", "govdb.cli"]


def run(args, env_extra, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DB_")} | env_extra
    return subprocess.run(GOVDB + args, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_demo_on_default_sqlite_writes_and_reads_every_record(tmp_path: Path):
    out = run(["demo"], {}, tmp_path)
    assert out.returncode == 0, out.stderr
    for record in ("identity", "session", "agent state", "calibration", "audit event",
                   "tool usage", "discovery", "dialectic session", "health"):
        assert record in out.stdout
    assert (tmp_path / "data" / "governance.db").exists()  # the spec's default path
    again = run(["demo"], {}, tmp_path)
    assert again.returncode == 0, again.stderr
    assert "version 2" in again.stdout  # calibration moved on; earlier rows kept


def test_sqlite_only_install_runs_without_asyncpg(tmp_path: Path):
    """A SQLite-only user never needs asyncpg: the CLI starts and the demo runs with it unimportable."""
    no_asyncpg = [sys.executable, "-c", "import sys; sys.modules['asyncpg'] = None;"
                  " from govdb.cli import main; main(sys.argv[1:])"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DB_")}
    for args in (["--help"], ["demo"], ["status"]):
        out = subprocess.run(no_asyncpg + args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, (args, out.stderr)
    assert (tmp_path / "data" / "governance.db").exists()


def test_bad_setting_is_one_clear_line(tmp_path: Path):
    out = run(["health"], {"DB_BACKEND": "postgres", "DB_POSTGRES_URL": "postgresql://u:hunter2@h:99999/x"}, tmp_path)
    assert out.returncode == 1
    assert out.stderr.startswith("error: DB_POSTGRES_URL")
    assert "Traceback" not in out.stderr and "hunter2" not in out.stderr + out.stdout


def test_settings_hide_the_password(tmp_path: Path):
    out = run(["settings"], {"DB_POSTGRES_URL": "postgresql://gov:hunter2@db:5432/governance"}, tmp_path)
    assert out.returncode == 0 and "gov:***@db" in out.stdout and "hunter2" not in out.stdout


def test_init_twice_against_postgres(pg_server, tmp_path: Path):
    name = f"govdb_cli_{os.getpid()}"

    async def recreate():
        conn = await pg_server.admin()
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    _in_thread(recreate())
    env = {"DB_BACKEND": "postgres", "DB_POSTGRES_URL": with_database(pg_server.url, name)}
    first = run(["init"], env, tmp_path)
    assert first.returncode == 0, first.stderr
    second = run(["init"], env, tmp_path)
    assert second.returncode == 0, second.stderr
    assert "on" in second.stdout  # graph column: AGE is active
    assert first.stdout == second.stdout
    _in_thread(_drop_databases(pg_server.url, [name]))
