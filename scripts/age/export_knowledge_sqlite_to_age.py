#!/usr/bin/env python3
"""Write a psql script that builds the AGE graph of a legacy governance.db.

    python3 scripts/age/export_knowledge_sqlite_to_age.py --sqlite data/governance.db \\
        --out /tmp/age_import.sql --mode merge
    psql -v ON_ERROR_STOP=1 -d governance -f /tmp/age_import.sql

The spec's entry point for `govdb migrate export-graph` (same flags, same
code; see `--help`). Rows are cleaned as the backfill cleans them. With
--mode merge the script can be applied any number of times; --mode create is
for an empty graph. Exit status: 0 written, 1 on an error.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _entry import run_govdb  # noqa: E402

if __name__ == "__main__":  # worker processes (spawn) import this module again
    run_govdb(["migrate", "export-graph"])
