"""Migration of a legacy governance.db to PostgreSQL.

- ``source``: read the legacy file without stalling its writers.
- ``clean``: the one cleaning module (backfill, graph export and verify):
  every legacy row becomes a PostgreSQL row, repaired with each repair
  recorded, or a quarantine reason.
- ``backfill``: resumable bulk load into the relational tables.
"""

from __future__ import annotations

from ..errors import GovdbError


class MigrationError(GovdbError):
    """The migration cannot start or go on; the message names the fix."""


class SourceError(MigrationError):
    """The legacy SQLite file is missing, unreadable or not a governance.db."""


__all__ = ["MigrationError", "SourceError"]
