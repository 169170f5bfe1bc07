"""The one error family of govdb.

Backends map driver errors to these classes at their boundary (by exception
class or SQLSTATE, never by message text) and keep the driver error as
``__cause__``, so callers of any backend catch one family.
"""

from __future__ import annotations


class GovdbError(Exception):
    """Base of every error govdb raises on purpose."""


class ConfigError(GovdbError):
    """A setting is missing or invalid; the message names the variable."""

    def __init__(self, variable: str, problem: str):
        self.variable = variable
        self.problem = problem
        super().__init__(f"{variable} {problem}")


class ValidationError(GovdbError, ValueError):
    """An argument was refused before anything was written."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"{field} {problem}")


class NotFoundError(GovdbError, LookupError):
    """A record the call depends on does not exist."""

    def __init__(self, kind: str, key: object):
        self.kind = kind
        self.key = key
        super().__init__(f"{kind} {key!r} does not exist")


class ConflictError(GovdbError):
    """The write clashes with what is stored (duplicate key, stale version)."""


class StoreUnavailableError(GovdbError):
    """The store cannot be reached or refused to work (down, timeout, locked)."""


class SchemaError(GovdbError):
    """The database schema is missing, too new, or not what govdb expects."""
