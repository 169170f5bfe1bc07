"""Typed records returned by every backend.

All datetimes are timezone-aware UTC. JSON documents come back as plain
Python values (dict/list/str/int/float/bool/None).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

IDENTITY_STATUSES = ("active", "paused", "disabled", "archived", "deleted")
REGIMES = (
    "nominal", "warning", "critical", "recovery",
    "EXPLORATION", "CONVERGENCE", "DIVERGENCE", "STABLE",
)
DISCOVERY_STATUSES = ("open", "resolved", "archived", "disputed")
SEVERITIES = ("low", "medium", "high", "critical")
EDGE_TYPES = ("related_to", "response_to")
RESPONSE_TYPES = ("extend", "question", "disagree", "support")
DIALECTIC_PHASES = ("thesis", "antithesis", "synthesis", "resolved", "escalated", "failed")
DIALECTIC_STATUSES = ("active", "resolved", "escalated", "failed", "cancelled")
MESSAGE_TYPES = ("thesis", "antithesis", "synthesis")


@dataclass(frozen=True, slots=True)
class Identity:
    agent_id: str
    status: str
    created_at: datetime
    updated_at: datetime
    parent_agent_id: str | None = None
    spawn_reason: str | None = None
    disabled_at: datetime | None = None
    tags: tuple[str, ...] = ()
    notes: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    lifecycle_events: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class Session:
    session_id: str
    agent_id: str
    created_at: datetime
    last_active: datetime
    expires_at: datetime
    is_active: bool
    client_type: str | None = None
    client_info: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AgentState:
    """One EISV snapshot: energy, integrity, entropy, void."""

    id: int
    agent_id: str
    recorded_at: datetime
    energy: float | None  # None only for legacy rows whose state_json lacks E
    integrity: float
    entropy: float
    void: float
    regime: str
    coherence: float | None
    state: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Calibration:
    state: dict[str, Any]
    version: int
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class AuditEvent:
    event_id: str
    timestamp: datetime
    event_type: str
    agent_id: str | None
    session_id: str | None
    confidence: float
    details: dict[str, Any]
    raw_hash: str


@dataclass(frozen=True, slots=True)
class ToolUsage:
    usage_id: str
    timestamp: datetime
    tool_name: str
    agent_id: str | None
    session_id: str | None
    latency_ms: int | None
    success: bool
    error_type: str | None = None
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ToolStats:
    tool_name: str
    calls: int
    successes: int
    failures: int
    avg_latency_ms: float | None
    max_latency_ms: int | None


@dataclass(frozen=True, slots=True)
class Discovery:
    id: str
    agent_id: str
    type: str
    summary: str
    created_at: datetime
    status: str = "open"
    severity: str | None = None
    details: str | None = None
    tags: tuple[str, ...] = ()
    confidence: float | None = None
    related_files: tuple[str, ...] = ()
    updated_at: datetime | None = None
    resolved_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class DiscoveryLink:
    src_id: str
    dst_id: str
    edge_type: str
    created_at: datetime
    response_type: str | None = None
    weight: float | None = None
    created_by: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Neighbor:
    """A discovery one link away, with the link and its direction from the start."""

    discovery: Discovery
    link: DiscoveryLink
    direction: str  # "out" (start -> neighbour) or "in"


@dataclass(frozen=True, slots=True)
class DialecticMessage:
    id: int
    session_id: str
    agent_id: str
    message_type: str
    timestamp: datetime
    root_cause: str | None = None
    proposed_conditions: list[Any] = field(default_factory=list)
    reasoning: str | None = None
    observed_metrics: dict[str, Any] = field(default_factory=dict)
    concerns: list[Any] = field(default_factory=list)
    agrees: bool | None = None
    signature: str | None = None


@dataclass(frozen=True, slots=True)
class DialecticSession:
    session_id: str
    paused_agent_id: str
    phase: str
    status: str
    created_at: datetime
    updated_at: datetime
    reviewer_agent_id: str | None = None
    reason: str | None = None
    discovery_id: str | None = None
    dispute_type: str | None = None
    session_type: str | None = None
    topic: str | None = None
    max_synthesis_rounds: int | None = None
    synthesis_round: int = 0
    paused_agent_state: dict[str, Any] = field(default_factory=dict)
    resolution: dict[str, Any] | None = None
    messages: tuple[DialecticMessage, ...] = ()


@dataclass(frozen=True, slots=True)
class Health:
    backend: str
    ok: bool
    graph: str  # "on", "off" (PostgreSQL without AGE) or "n/a" (SQLite)
    schema_version: int | None
    details: dict[str, Any] = field(default_factory=dict)
