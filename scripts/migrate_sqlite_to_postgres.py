#!/usr/bin/env python3
"""Backfill a legacy governance.db (SQLite) into PostgreSQL: resumable, nothing lost.

    python3 scripts/migrate_sqlite_to_postgres.py --sqlite data/governance.db \\
        --postgres postgresql://postgres:postgres@localhost:5432/governance \\
        --tables identities,sessions,agent_state,audit_events,tool_usage,calibration

The spec's entry point for `govdb migrate backfill` (same flags, same code;
see `--help`). Exit status: 0 when every table reconciles (source =
migrated + quarantined), 1 on an error, 2 when counts do not reconcile.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _entry import run_govdb  # noqa: E402

if __name__ == "__main__":  # worker processes (spawn) import this module again
    run_govdb(["migrate", "backfill"])
