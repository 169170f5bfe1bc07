"""What a backfill reports: per-table counts, problems and notes, the summary
table for people, and the progress bars (rows, rows/s, ETA) on the way."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .targets import Outcome


@dataclass
class TableReport:
    """What happened to one legacy table."""

    table: str
    target: str
    source_rows: int = 0
    migrated: int = 0
    quarantined: int = 0
    repaired: int = 0
    inserted: int = 0
    updated: int = 0
    seconds: float = 0.0
    status: str = "done"
    problems: Counter[str] = field(default_factory=Counter)
    notes: Counter[str] = field(default_factory=Counter)

    @property
    def kept(self) -> int:
        """Migrated rows PostgreSQL already had (same, or newer there)."""
        return self.migrated - self.inserted - self.updated

    @property
    def reconciled(self) -> bool:
        return self.source_rows == self.migrated + self.quarantined

    @property
    def rows_per_second(self) -> float:
        return self.source_rows / self.seconds if self.seconds > 0 else 0.0


@dataclass
class BackfillReport:
    source: str
    fingerprint: str
    target: str
    dry_run: bool
    journal_mode: str
    source_timezone: str
    tables: list[TableReport] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def reconciled(self) -> bool:
        """True when every table has source = migrated + quarantined."""
        return all(t.reconciled for t in self.tables)

    @property
    def source_rows(self) -> int:
        return sum(t.source_rows for t in self.tables)

    def table(self, name: str) -> TableReport:
        return next(t for t in self.tables if t.table == name)

    def render(self) -> Any:
        """Return the summary as a rich Table."""
        from rich.table import Table
        title = "backfill dry run (nothing written)" if self.dry_run else "backfill"
        table = Table(title=f"{title}: {self.source} -> {self.target}", caption=self._caption())
        cols = ["table", "source", "migrated" if not self.dry_run else "would migrate",
                "quarantined" if not self.dry_run else "would quarantine",
                "repaired" if not self.dry_run else "would repair"]
        cols += ([] if self.dry_run else ["inserted", "updated", "kept"]) + ["rows/s", "reconciled"]
        for c in cols:
            table.add_column(c, justify="left" if c == "table" else "right")
        for t in self.tables:
            row = [f"{t.table}" + ("" if t.status == "done" else f" ({t.status})"), f"{t.source_rows:,}",
                   f"{t.migrated:,}", f"{t.quarantined:,}", f"{t.repaired:,}"]
            if not self.dry_run:
                row += [f"{t.inserted:,}", f"{t.updated:,}", f"{t.kept:,}"]
            row += [f"{t.rows_per_second:,.0f}" if t.seconds else "-",
                    "[green]yes[/green]" if t.reconciled else "[red]NO[/red]"]
            table.add_row(*row)
        return table

    def render_problems(self) -> Any:
        """Return the problems found (repairs and quarantine reasons by kind) as a rich Table."""
        from rich.table import Table
        table = Table("table", "problem", "rows", title="problems found")
        for t in self.tables:
            for problem, n in sorted(t.problems.items()):
                table.add_row(t.table, problem, f"{n:,}")
            for note, n in sorted(t.notes.items()):
                table.add_row(t.table, f"note: {note}", f"{n:,}")
        return table

    def _caption(self) -> str:
        rate = self.source_rows / self.seconds if self.seconds else 0
        return (f"{self.source_rows:,} rows in {self.seconds:.1f} s ({rate:,.0f} rows/s);"
                f" naive timestamps read in {self.source_timezone}; source journal_mode={self.journal_mode}")



def summarize(report: BackfillReport, console: Any = None) -> int:
    """Print the summary (and problems found, notes) for people; return the exit status:
    0 when every table reconciles, 2 when one does not."""
    import sys
    from rich.console import Console
    out = console or (Console() if sys.stdout.isatty() else Console(width=200))
    out.print(report.render())
    if report.dry_run or any(t.problems or t.notes for t in report.tables):
        out.print(report.render_problems())
    for note in report.notes:
        out.print(f"note: {note}", markup=False, highlight=False)
    if report.reconciled:
        return 0
    bad = ", ".join(t.table for t in report.tables if not t.reconciled)
    print(f"error: counts do not reconcile (source != migrated + quarantined) for {bad}", file=sys.stderr)
    return 2


def count_outcome(rep: TableReport, o: Outcome) -> None:
    rep.source_rows += 1
    if o.ok:
        rep.migrated += 1
        if o.repairs:
            rep.repaired += 1
            for r in o.repairs:
                rep.problems[f"{r.column}: {r.kind}"] += 1
    else:
        rep.quarantined += 1
        rep.problems[f"quarantined: {o.kind}"] += 1


def from_checkpoint(rep: TableReport, c: Any) -> None:
    rep.source_rows, rep.migrated, rep.quarantined = c["rows_read"], c["rows_migrated"], c["rows_quarantined"]
    rep.repaired, rep.inserted, rep.updated = c["rows_repaired"], c["rows_inserted"], c["rows_updated"]



def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


class Progress:
    """Rich progress bars on stderr (rows, rows/s, ETA), or nothing."""

    def __init__(self, enabled: bool):
        self._bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
            )
            self._bar = Progress(
                TextColumn("{task.description:<20}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:>10} rows/s"), TimeElapsedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(), console=Console(stderr=True))

    def __enter__(self) -> "Progress":
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def add(self, name: str, total: int, done: int = 0) -> Any:
        if self._bar is None:
            return None
        return self._bar.add_task(name, total=max(total, done), completed=done, rate="-")

    def advance(self, task: Any, n: int, done: int, seconds: float) -> None:
        """Advance by ``n`` rows; ``done`` rows took ``seconds`` in this run."""
        if self._bar is None or task is None:
            return
        self._bar.update(task, advance=n, rate=f"{done / seconds if seconds > 0 else 0:,.0f}")
