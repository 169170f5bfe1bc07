"""Backends are imported only when chosen: SQLite needs no asyncpg."""

from __future__ import annotations

from ..config import Settings
from .base import Database


def create_backend(settings: Settings) -> Database:
    """Return an unconnected backend for ``settings.backend``."""
    if settings.backend == "sqlite":
        from .sqlite import SQLiteDatabase
        return SQLiteDatabase(settings.sqlite_path)
    if settings.backend == "postgres":
        from .postgres import PostgresDatabase
        return PostgresDatabase.from_settings(settings)
    if settings.backend == "dual":
        from .dual import DualDatabase
        return DualDatabase.from_settings(settings)
    raise AssertionError(settings.backend)  # Settings.from_env refuses others
