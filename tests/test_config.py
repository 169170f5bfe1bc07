"""Settings from the environment: defaults, validation, secrets."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from govdb.config import Settings
from govdb.errors import ConfigError


def test_defaults_match_the_spec():
    s = Settings.from_env({})
    assert s.backend == "sqlite"
    assert s.postgres_url.reveal() == "postgresql://postgres:postgres@localhost:5432/governance"
    assert s.sqlite_path == Path("data/governance.db")
    assert (s.postgres_min_conn, s.postgres_max_conn) == (2, 10)
    assert s.age_graph == "governance"
    assert s.dual_read_primary == "postgres"
    assert s.postgres_statement_cache == 100 and s.age_enabled


@pytest.mark.parametrize("env,variable,fragment", [
    ({"DB_BACKEND": "mysql"}, "DB_BACKEND", "sqlite, postgres, dual"),
    ({"DB_POSTGRES_URL": "mysql://h/db"}, "DB_POSTGRES_URL", "postgresql://"),
    ({"DB_POSTGRES_URL": "postgresql://u:hunter2@h"}, "DB_POSTGRES_URL", "names no database"),
    ({"DB_POSTGRES_URL": "postgresql://u:hunter2@h:99999/db"}, "DB_POSTGRES_URL", "port"),
    ({"DB_POSTGRES_MIN_CONN": "5", "DB_POSTGRES_MAX_CONN": "2"}, "DB_POSTGRES_MIN_CONN", "must not exceed"),
    ({"DB_POSTGRES_MAX_CONN": "ten"}, "DB_POSTGRES_MAX_CONN", "whole number"),
    ({"DB_POSTGRES_MAX_CONN": "0"}, "DB_POSTGRES_MAX_CONN", "at least 1"),
    ({"DB_AGE_GRAPH": "gv"}, "DB_AGE_GRAPH", "3-63"),
    ({"DB_AGE_GRAPH": "bad-name"}, "DB_AGE_GRAPH", "3-63"),
    ({"DB_DUAL_READ_PRIMARY": "mongo"}, "DB_DUAL_READ_PRIMARY", "sqlite or postgres"),
    ({"DB_POSTGRES_STATEMENT_CACHE": "-1"}, "DB_POSTGRES_STATEMENT_CACHE", "at least 0"),
])
def test_bad_settings_name_the_variable(env, variable, fragment):
    with pytest.raises(ConfigError) as err:
        Settings.from_env(env)
    assert err.value.variable == variable
    assert str(err.value).startswith(variable) and fragment.lower() in str(err.value).lower()
    assert "hunter2" not in str(err.value)


def test_password_never_shown(caplog):
    s = Settings.from_env({"DB_POSTGRES_URL": "postgresql://gov:s3cr%40t@db.example:6432/governance"})
    assert s.postgres_url.reveal().endswith("@db.example:6432/governance")
    for text in (str(s.postgres_url), repr(s.postgres_url), repr(s), str(s.describe())):
        assert "s3cr" not in text
    assert s.postgres_url.masked == "postgresql://gov:***@db.example:6432/governance"
    with caplog.at_level(logging.INFO):
        logging.getLogger("govdb.test").info("connecting to %s", s.postgres_url)
    assert "s3cr" not in caplog.text


def test_statement_cache_can_be_turned_off_for_pgbouncer():
    assert Settings.from_env({"DB_POSTGRES_STATEMENT_CACHE": "0"}).postgres_statement_cache == 0
