"""Settings from the spec's environment variables, validated at start."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit, urlunsplit

from .errors import ConfigError

BACKENDS = ("sqlite", "postgres", "dual")
DUAL_APPLY_MODES = ("background", "sync")
DEFAULT_POSTGRES_URL = "postgresql://postgres:postgres@localhost:5432/governance"
_GRAPH_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{2,62}$")


class SecretUrl:
    """A PostgreSQL URL whose password never reaches str(), repr() or a log."""

    __slots__ = ("_url",)

    def __init__(self, url: str):
        self._url = url

    def reveal(self) -> str:
        """Return the URL with its password, for the driver only."""
        return self._url

    @property
    def masked(self) -> str:
        parts = urlsplit(self._url)
        if parts.password is None:
            return self._url
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    def __str__(self) -> str:
        return self.masked

    def __repr__(self) -> str:
        return f"SecretUrl({self.masked!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretUrl) and other._url == self._url

    def __hash__(self) -> int:
        return hash(self._url)


def parse_postgres_url(value: str, variable: str = "DB_POSTGRES_URL") -> SecretUrl:
    """Check the shape of a PostgreSQL URL; raise ConfigError naming the problem."""
    value = value.strip()
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(variable, f"is not a valid URL ({exc})") from None
    masked = SecretUrl(value).masked
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(variable, f"must start with postgresql://, got {masked!r}")
    if not parts.hostname and "host=" not in parts.query:
        raise ConfigError(variable, f"names no host: {masked!r}")
    if not parts.path.strip("/"):
        raise ConfigError(variable, f"names no database (add /<dbname>): {masked!r}")
    if port is not None and not 0 < port < 65536:
        raise ConfigError(variable, f"has port {port} outside 1-65535")
    return SecretUrl(value)


@dataclass(frozen=True)
class Settings:
    backend: str = "sqlite"
    postgres_url: SecretUrl = field(default_factory=lambda: SecretUrl(DEFAULT_POSTGRES_URL))
    sqlite_path: Path = Path("data/governance.db")
    postgres_min_conn: int = 2
    postgres_max_conn: int = 10
    age_graph: str = "governance"
    dual_read_primary: str = "postgres"
    #: asyncpg's prepared-statement cache; 0 turns it off for PgBouncer in
    #: transaction mode (DB_POSTGRES_STATEMENT_CACHE=0).
    postgres_statement_cache: int = 100
    #: Whether to use Apache AGE when the server has it (DB_AGE_ENABLED).
    age_enabled: bool = True
    #: Fraction of dual-mode reads also run on the other store and compared (DB_DUAL_SHADOW_RATE).
    dual_shadow_rate: float = 0.0
    #: When a dual write reaches PostgreSQL (DB_DUAL_APPLY): ``background`` acknowledges once SQLite
    #: (with the outbox record) committed and applies in batches behind; ``sync`` applies it before returning.
    dual_apply: str = "background"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Read and validate the DB_* variables; raise ConfigError on the first bad one."""
        env = os.environ if env is None else env

        def get(name: str, default: str) -> str:
            value = env.get(name, "")
            return value.strip() if value.strip() else default

        backend = get("DB_BACKEND", "sqlite").lower()
        if backend not in BACKENDS:
            raise ConfigError("DB_BACKEND", f"must be one of {', '.join(BACKENDS)}; got {backend!r}")
        primary = get("DB_DUAL_READ_PRIMARY", "postgres").lower()
        if primary not in ("sqlite", "postgres"):
            raise ConfigError("DB_DUAL_READ_PRIMARY", f"must be sqlite or postgres; got {primary!r}")
        min_conn = _int(env, "DB_POSTGRES_MIN_CONN", get("DB_POSTGRES_MIN_CONN", "2"), 0)
        max_conn = _int(env, "DB_POSTGRES_MAX_CONN", get("DB_POSTGRES_MAX_CONN", "10"), 1)
        if min_conn > max_conn:
            raise ConfigError("DB_POSTGRES_MIN_CONN", f"({min_conn}) must not exceed DB_POSTGRES_MAX_CONN ({max_conn})")
        graph = get("DB_AGE_GRAPH", "governance")
        if not _GRAPH_RE.match(graph):
            raise ConfigError("DB_AGE_GRAPH", f"must be 3-63 letters, digits or _ and start with a letter or _; got {graph!r}")
        cache = _int(env, "DB_POSTGRES_STATEMENT_CACHE", get("DB_POSTGRES_STATEMENT_CACHE", "100"), 0)
        age = get("DB_AGE_ENABLED", "1").lower()
        if age not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ConfigError("DB_AGE_ENABLED", f"must be 1 or 0; got {age!r}")
        shadow_raw = get("DB_DUAL_SHADOW_RATE", "0")
        try:
            shadow = float(shadow_raw)
        except ValueError:
            raise ConfigError("DB_DUAL_SHADOW_RATE", f"must be a number in [0, 1]; got {shadow_raw!r}") from None
        if not 0.0 <= shadow <= 1.0:  # also refuses nan
            raise ConfigError("DB_DUAL_SHADOW_RATE", f"must be a number in [0, 1]; got {shadow_raw!r}")
        dual_apply = get("DB_DUAL_APPLY", "background").lower()
        if dual_apply not in DUAL_APPLY_MODES:
            raise ConfigError("DB_DUAL_APPLY", f"must be background or sync; got {dual_apply!r}")
        sqlite_path = get("DB_SQLITE_PATH", "data/governance.db")
        if "\x00" in sqlite_path:
            raise ConfigError("DB_SQLITE_PATH", "contains a NUL byte")
        return cls(
            backend=backend,
            postgres_url=parse_postgres_url(get("DB_POSTGRES_URL", DEFAULT_POSTGRES_URL)),
            sqlite_path=Path(sqlite_path),
            postgres_min_conn=min_conn,
            postgres_max_conn=max_conn,
            age_graph=graph,
            dual_read_primary=primary,
            postgres_statement_cache=cache,
            age_enabled=age in ("1", "true", "yes", "on"),
            dual_shadow_rate=shadow,
            dual_apply=dual_apply,
        )

    def describe(self) -> dict[str, str]:
        """Return the settings as text for display, with the password masked."""
        return {
            "DB_BACKEND": self.backend,
            "DB_SQLITE_PATH": str(self.sqlite_path),
            "DB_POSTGRES_URL": self.postgres_url.masked,
            "DB_POSTGRES_MIN_CONN": str(self.postgres_min_conn),
            "DB_POSTGRES_MAX_CONN": str(self.postgres_max_conn),
            "DB_AGE_GRAPH": self.age_graph,
            "DB_AGE_ENABLED": "1" if self.age_enabled else "0",
            "DB_DUAL_READ_PRIMARY": self.dual_read_primary,
            "DB_DUAL_SHADOW_RATE": f"{self.dual_shadow_rate:g}",
            "DB_DUAL_APPLY": self.dual_apply,
            "DB_POSTGRES_STATEMENT_CACHE": str(self.postgres_statement_cache),
        }


def _int(env: Mapping[str, str], name: str, raw: str, lo: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, f"must be a whole number; got {raw!r}") from None
    if value < lo:
        raise ConfigError(name, f"must be at least {lo}; got {value}")
    return value
