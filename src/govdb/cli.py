"""The `govdb` command line: a thin parser over commands.py."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import commands, dual_commands
from . import cutover as cutover_commands
from .config import Settings
from .errors import GovdbError

DATA_DIR = click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
                        default=Path(".govdb/pg"), show_default=True,
                        help="Directory holding the local cluster, its log and state.")


class _Cli(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except GovdbError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("error: interrupted (an interrupted backfill continues with --resume)", err=True)
            sys.exit(130)


def _settings(ctx: click.Context) -> Settings:
    return Settings.from_env()


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]},
             epilog="Exit status: 0 success; 1 an error (one `error:` line on stderr);"
                    " 2 the data does not check out (backfill counts do not reconcile,"
                    " verify found differences).")
@click.option("--debug", is_flag=True, help="Show tracebacks of errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """govdb: the governance store on SQLite, PostgreSQL + AGE, or both.

    The store is chosen by DB_BACKEND (sqlite, postgres, dual) and the other
    DB_* variables; see `govdb settings`.
    """
    ctx.obj = {"debug": debug}


def _command(func, name: str | None = None, group: click.Group = cli):
    """Register a settings-only command; its help is the function's first docstring line."""
    @group.command(name or func.__name__.replace("_", "-"), help=func.__doc__.splitlines()[0])
    @click.pass_context
    def run(ctx: click.Context) -> None:
        sys.exit(func(_settings(ctx)) or 0)
    return run


_command(commands.init)
_command(commands.health)
_command(commands.demo)
_command(commands.show_settings, "settings")


@cli.command("serve", help=commands.serve.__doc__.splitlines()[0])
@click.option("--http", metavar="HOST:PORT", default=None,
              help="Serve streamable HTTP at http://HOST:PORT/mcp (HOST defaults to 127.0.0.1); default: stdio.")
@click.option("--stateless", is_flag=True, help="Stateless HTTP: no MCP session kept between requests.")
@click.pass_context
def serve(ctx: click.Context, http: str | None, stateless: bool) -> None:
    sys.exit(commands.serve(_settings(ctx), http, stateless))


@cli.group()
def pg() -> None:
    """Run a local PostgreSQL 17 + Apache AGE for development, tests and CI."""


@pg.command("start", help=commands.pg_start.__doc__.splitlines()[0])
@DATA_DIR
@click.option("--port", type=click.IntRange(1024, 65535), default=55432, show_default=True)
def pg_start(data_dir: Path, port: int) -> None:
    sys.exit(commands.pg_start(data_dir, port))


@pg.command("stop", help=commands.pg_stop.__doc__.splitlines()[0])
@DATA_DIR
def pg_stop(data_dir: Path) -> None:
    sys.exit(commands.pg_stop(data_dir))


@pg.command("status", help=commands.pg_status.__doc__.splitlines()[0])
@DATA_DIR
def pg_status(data_dir: Path) -> None:
    sys.exit(commands.pg_status(data_dir))


@pg.command("url", help=commands.pg_url.__doc__.splitlines()[0])
@DATA_DIR
def pg_url(data_dir: Path) -> None:
    sys.exit(commands.pg_url(data_dir))


@cli.group()
def migrate() -> None:
    """Move a legacy governance.db to PostgreSQL + AGE: backfill, graph, verify."""


SQLITE = click.option("--sqlite", "sqlite_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                      help="The legacy governance.db (default: $DB_SQLITE_PATH).")
POSTGRES = click.option("--postgres", "postgres_url", default=None, metavar="URL",
                        help="PostgreSQL URL (default: $DB_POSTGRES_URL).")
SOURCE_TZ = click.option("--source-timezone", default="UTC", show_default=True,
                         help="Time zone of naive timestamps in the source.")


@migrate.command("backfill", help=commands.migrate_backfill.__doc__.splitlines()[0])
@SQLITE
@POSTGRES
@click.option("--tables", default=None, help="Comma-separated: identities, sessions, agent_state, calibration,"
              " audit_events, tool_usage, knowledge, dialectic (default: all).")
@click.option("--dry-run", is_flag=True, help="Report rows, problems, repairs and quarantines; write nothing.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoints of an interrupted run.")
@click.option("--restart", is_flag=True, help="Discard the checkpoints and start over.")
@SOURCE_TZ
@click.option("--batch-size", type=click.IntRange(1, 1_000_000), default=None, hidden=True)
@click.option("--no-progress", is_flag=True, help="No progress bars on stderr.")
@click.pass_context
def migrate_backfill(ctx: click.Context, no_progress: bool, **kw) -> None:
    sys.exit(commands.migrate_backfill(_settings(ctx), progress=not no_progress, **kw))


GRAPH = click.option("--graph", default=None, help="AGE graph name (default: $DB_AGE_GRAPH).")


@migrate.command("graph", help=commands.migrate_graph.__doc__.splitlines()[0])
@POSTGRES
@GRAPH
@click.pass_context
def migrate_graph(ctx: click.Context, **kw) -> None:
    sys.exit(commands.migrate_graph(_settings(ctx), **kw))


@migrate.command("export-graph", help=commands.migrate_export_graph.__doc__.splitlines()[0])
@SQLITE
@click.option("--out", type=Path, required=True,
              help="The SQL file to write (replaced only when complete).")
@click.option("--mode", type=click.Choice(["merge", "create"]), default="merge", show_default=True,
              help="merge: re-applicable, adds only what is missing; create: for an empty graph.")
@GRAPH
@SOURCE_TZ
@click.pass_context
def migrate_export_graph(ctx: click.Context, **kw) -> None:
    sys.exit(commands.migrate_export_graph(_settings(ctx), **kw))


@migrate.command("verify", help=commands.migrate_verify.__doc__.splitlines()[0])
@SQLITE
@POSTGRES
@click.option("--tables", default=None, help="Comma-separated subset, as for backfill (default: all).")
@SOURCE_TZ
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report.")
@click.option("--max-diffs", type=click.IntRange(1, 10_000), default=10, show_default=True,
              help="Differing keys to name per table.")
@click.option("--graph-name", "graph", default=None, help="AGE graph name (default: $DB_AGE_GRAPH).")
@click.option("--no-graph", "check_graph", flag_value=False, default=True, help="Skip the AGE graph counts.")
@click.pass_context
def migrate_verify(ctx: click.Context, **kw) -> None:
    sys.exit(commands.migrate_verify(_settings(ctx), **kw))


# -- operator's tools (ops/): partitions, backup, restore, status ----------------

from .ops import backup as ops_backup, partitions as ops_partitions, status as ops_status  # noqa: E402

AS_JSON = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
MONTHS_AHEAD = click.option("--months-ahead", type=click.IntRange(0, 120), envvar="DB_PARTITION_MONTHS_AHEAD",
                            show_envvar=True, default=ops_partitions.MONTHS_AHEAD, show_default=True,
                            help="Months after the current one to create partitions for.")
EVENTS_DAYS = click.option("--events-retention-days", type=click.IntRange(1, 36_500),
                           envvar="DB_EVENTS_RETENTION_DAYS", show_envvar=True,
                           default=ops_partitions.EVENTS_RETENTION_DAYS, show_default=True,
                           help="Keep audit events this many days (whole months are dropped).")
TOOL_DAYS = click.option("--tool-usage-retention-days", type=click.IntRange(1, 36_500),
                         envvar="DB_TOOL_USAGE_RETENTION_DAYS", show_envvar=True,
                         default=ops_partitions.TOOL_USAGE_RETENTION_DAYS, show_default=True,
                         help="Keep tool usage this many days (whole months are dropped).")


@cli.group()
def partitions() -> None:
    """The monthly partitions of the audit tables: list, maintain, schedule."""


@partitions.command("list", help=ops_partitions.list_partitions.__doc__.splitlines()[0])
@AS_JSON
@click.pass_context
def partitions_list(ctx: click.Context, as_json: bool) -> None:
    sys.exit(ops_partitions.list_partitions(_settings(ctx), as_json=as_json))


@partitions.command("maintain", help=ops_partitions.maintain.__doc__.splitlines()[0])
@MONTHS_AHEAD
@EVENTS_DAYS
@TOOL_DAYS
@click.option("--dry-run", is_flag=True, help="Do it in a transaction and roll it back: show what would change.")
@AS_JSON
@click.pass_context
def partitions_maintain(ctx: click.Context, **kw) -> None:
    sys.exit(ops_partitions.maintain(_settings(ctx), **kw))


@partitions.command("schedule", help=ops_partitions.schedule.__doc__.splitlines()[0])
@MONTHS_AHEAD
@EVENTS_DAYS
@TOOL_DAYS
@AS_JSON
@click.pass_context
def partitions_schedule(ctx: click.Context, **kw) -> None:
    sys.exit(ops_partitions.schedule(_settings(ctx), **kw))


@cli.command("backup", help=ops_backup.backup.__doc__.splitlines()[0])
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="Directory for governance_backup_YYYYMMDD.dump (UTC date).")
@click.option("--overwrite", is_flag=True, help="Replace a backup of the same name.")
@AS_JSON
@click.pass_context
def backup(ctx: click.Context, **kw) -> None:
    sys.exit(ops_backup.backup(_settings(ctx), **kw))


@cli.command("restore", help=ops_backup.restore.__doc__.splitlines()[0])
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--clean", is_flag=True,
              help="Drop the schemas and extensions the backup holds from the target first (their data is lost).")
@AS_JSON
@click.pass_context
def restore(ctx: click.Context, **kw) -> None:
    sys.exit(ops_backup.restore(_settings(ctx), **kw))


@cli.command("status", help=ops_status.status.__doc__.splitlines()[0])
@AS_JSON
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    sys.exit(ops_status.status(_settings(ctx), as_json=as_json))


@cli.command("cutover", help=cutover_commands.cutover.__doc__.splitlines()[0])
@SQLITE
@POSTGRES
@click.option("--archive-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the SQLite copy goes (default: archive/ beside the SQLite file).")
@click.option("--dry-run", is_flag=True, help="Run the checks only; change nothing.")
@SOURCE_TZ
@click.pass_context
def cutover(ctx: click.Context, **kw) -> None:
    sys.exit(cutover_commands.cutover(_settings(ctx), **kw))


@cli.command("rollback", help=cutover_commands.rollback.__doc__.splitlines()[0])
@click.option("--sqlite", "sqlite_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where the SQLite file is restored (default: $DB_SQLITE_PATH).")
@POSTGRES
@click.option("--archive", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The archive to restore (default: the one the cutover recorded).")
@click.option("--force", is_flag=True, help="Keep an existing SQLite file aside (renamed, never deleted).")
@click.option("--no-verify", "verify_after", flag_value=False, default=True, help="Skip the verify at the end.")
@click.option("--no-progress", is_flag=True, help="No progress bars on stderr.")
@click.pass_context
def rollback(ctx: click.Context, no_progress: bool, **kw) -> None:
    sys.exit(cutover_commands.rollback(_settings(ctx), progress=not no_progress, **kw))


@cli.group()
def dual() -> None:
    """Dual-write (DB_BACKEND=dual): the retry queue, parked writes, both stores compared."""


@dual.command("replay", help=dual_commands.replay.__doc__.splitlines()[0])
@click.option("--no-progress", is_flag=True, help="No progress display on stderr.")
@click.pass_context
def dual_replay(ctx: click.Context, no_progress: bool) -> None:
    sys.exit(dual_commands.replay(_settings(ctx), progress=not no_progress))


@dual.command("status", help=dual_commands.status.__doc__.splitlines()[0])
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable figures.")
@click.pass_context
def dual_status(ctx: click.Context, as_json: bool) -> None:
    sys.exit(dual_commands.status(_settings(ctx), as_json=as_json))


@dual.command("compare", help=dual_commands.compare.__doc__.splitlines()[0])
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report.")
@click.option("--sample", type=click.IntRange(1, 10_000), default=20, show_default=True,
              help="Agents, discoveries and dialectic sessions to read one by one.")
@click.pass_context
def dual_compare(ctx: click.Context, as_json: bool, sample: int) -> None:
    sys.exit(dual_commands.compare(_settings(ctx), as_json=as_json, sample=sample))


@dual.command("parked", help=dual_commands.parked.__doc__.splitlines()[0])
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable entries.")
@click.pass_context
def dual_parked(ctx: click.Context, as_json: bool) -> None:
    sys.exit(dual_commands.parked(_settings(ctx), as_json=as_json))


@dual.command("retry-parked", help=dual_commands.retry_parked.__doc__.splitlines()[0])
@click.argument("seq", type=int, required=False)
@click.option("--drop", is_flag=True, help="Delete the parked write(s) instead: PostgreSQL never gets them.")
@click.pass_context
def dual_retry_parked(ctx: click.Context, seq: int | None, drop: bool) -> None:
    sys.exit(dual_commands.retry_parked(_settings(ctx), seq, drop=drop))


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; ``argv`` lets the spec's scripts/ entry points share it."""
    try:
        code = cli.main(args=argv, prog_name="govdb", standalone_mode=False)
    except click.UsageError as exc:
        # One line and exit 1, like every other error; 2 means "the data does not check out".
        click.echo(f"error: {exc.format_message()} (see --help)", err=True)
        sys.exit(1)
    except click.Abort:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    sys.exit(code or 0)


def run_as(subcommand: list[str], argv: list[str]) -> None:
    """Run ``govdb SUBCOMMAND ARGV...`` (for the spec's scripts/ entry points)."""
    debug = [a for a in argv if a == "--debug"]
    main([*debug, *subcommand, *(a for a in argv if a != "--debug")])


if __name__ == "__main__":
    main()
