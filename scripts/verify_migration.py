#!/usr/bin/env python3
"""Verify a migration: the legacy governance.db, cleaned as the backfill cleans it, against PostgreSQL.

    python3 scripts/verify_migration.py --sqlite data/governance.db \\
        --postgres postgresql://postgres:postgres@localhost:5432/governance [--json]

The spec's entry point for `govdb migrate verify` (same flags, same code;
see `--help`). Per table: row counts and checksums per key range, the first
differing keys (missing in PostgreSQL, extra there, or changed, with the
columns), quarantined rows matched against migrate.quarantine; then the AGE
graph's counts per label.

Exit status: 0 everything matches; 1 could not verify (an `error:` line);
2 differences found; 130 interrupted.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _entry import run_govdb  # noqa: E402

if __name__ == "__main__":  # worker processes (spawn) import this module again
    run_govdb(["migrate", "verify"])
