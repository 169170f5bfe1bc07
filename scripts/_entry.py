"""Shared start of the spec's scripts/ entry points: run a govdb subcommand."""

import sys
from pathlib import Path


def run_govdb(subcommand: list[str]) -> None:
    try:
        from govdb.cli import run_as
    except ImportError:  # a checkout used without `pip install -e .`
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
        try:
            from govdb.cli import run_as
        except ImportError as exc:
            print(f"error: govdb cannot be imported ({exc}); run with the project's venv"
                  " (.venv/bin/python) or `pip install -e .`", file=sys.stderr)
            sys.exit(1)
    run_as(subcommand, sys.argv[1:])
