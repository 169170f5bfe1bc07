"""Legacy governance.db rows to records: how every dirty value reads.

Shared by the SQLite backend (its reads) and the migrator's cleaner (which
must make PostgreSQL read back what the SQLite backend reads). A row is any
mapping of column name to value (``sqlite3.Row`` or a dict). The builders
never raise on dirty values: each falls back to a stated default.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from .convert import (
    legacy_uuid, read_bool, read_float, read_int, read_json, read_json_list, read_json_object,
    read_opt_timestamp, read_str_list, read_timestamp,
)
from .records import (
    AgentState, AuditEvent, Calibration, DialecticMessage, DialecticSession, Discovery, DiscoveryLink,
    Identity, Session, ToolUsage,
)

Row = Mapping[str, Any]

#: Keys of the legacy agent_state.state_json that hold the EISV vector itself.
STATE_KEYS = ("E", "I", "S", "V", "coherence", "regime")
#: (column, state_json key) of the agent_state values read from a column
#: first and from state_json when the column has no finite number.
STATE_COLUMNS = (("integrity", "I"), ("entropy", "S"), ("volatility", "V"), ("coherence", "coherence"))


def split_notes(meta: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Return (metadata without "notes", notes): the legacy layout keeps notes in metadata_json."""
    notes = meta.pop("notes", None)
    return meta, notes if isinstance(notes, str) else None


def identity(r: Row) -> Identity:
    meta, notes = split_notes(read_json_object(r["metadata_json"]))
    created = read_timestamp(r["created_at"])
    return Identity(
        agent_id=r["agent_id"], status=r["status"] or "active", created_at=created,
        updated_at=read_opt_timestamp(r["updated_at"]) or created, parent_agent_id=r["parent_agent_id"],
        spawn_reason=r["spawn_reason"], disabled_at=read_opt_timestamp(r["disabled_at"]),
        tags=tuple(read_str_list(r["tags_json"])), notes=notes, metadata=meta,
        lifecycle_events=tuple(e for e in read_json_list(r["lifecycle_events_json"]) if isinstance(e, dict)),
    )


def session(r: Row) -> Session:
    created = read_timestamp(r["created_at"])
    return Session(
        session_id=r["session_id"], agent_id=r["agent_id"], created_at=created,
        last_active=read_opt_timestamp(r["last_active"]) or created, expires_at=read_timestamp(r["expires_at"]),
        is_active=bool(read_bool(r["is_active"], True)), client_type=r["client_type"],
        client_info=read_json_object(r["client_info_json"]), metadata=read_json_object(r["metadata_json"]),
    )


def agent_state(r: Row) -> AgentState:
    doc = read_json_object(r["state_json"])

    def pick(column: str, key: str) -> float | None:
        value = read_float(r[column])
        return read_float(doc.get(key)) if value is None else value

    regime = r["regime"] or doc.get("regime")
    return AgentState(
        id=r["id"], agent_id=r["agent_id"], recorded_at=read_timestamp(r["recorded_at"]),
        energy=read_float(doc.get("E")), integrity=pick("integrity", "I") or 0.0,
        entropy=pick("entropy", "S") or 0.0, void=pick("volatility", "V") or 0.0,
        regime=regime if isinstance(regime, str) else "nominal", coherence=pick("coherence", "coherence"),
        state={k: v for k, v in doc.items() if k not in STATE_KEYS},
    )


def calibration(r: Row) -> Calibration:
    # A stored row is at least version 1, even when a legacy writer kept none.
    return Calibration(state=read_json_object(r["state_json"]), version=max(read_int(r["version"]) or 1, 1),
                       updated_at=read_timestamp(r["updated_at"]))


def audit_event(r: Row) -> AuditEvent:
    confidence = read_float(r["confidence"])
    return AuditEvent(
        event_id=r["event_id"] or legacy_uuid("audit_events", r["id"]), timestamp=read_timestamp(r["timestamp"]),
        event_type=r["event_type"] or "", agent_id=r["agent_id"], session_id=r["session_id"],
        confidence=1.0 if confidence is None else confidence, details=read_json_object(r["details_json"]),
        raw_hash=r["raw_hash"] or "",
    )


def tool_usage(r: Row) -> ToolUsage:
    return ToolUsage(
        usage_id=r["usage_id"] or legacy_uuid("tool_usage", r["id"]), timestamp=read_timestamp(r["timestamp"]),
        tool_name=r["tool_name"] or "", agent_id=r["agent_id"], session_id=r["session_id"],
        latency_ms=read_int(r["latency_ms"]), success=bool(read_bool(r["success"], True)),
        error_type=r["error_type"], payload=read_json_object(r["payload_json"]),
    )


def discovery(r: Row, tags: Iterable[Any] = ()) -> Discovery:
    """Build a discovery; ``tags`` are its discovery_tags values in tag order."""
    return Discovery(
        id=r["id"], agent_id=r["agent_id"], type=r["type"] or "", summary=r["summary"] or "",
        created_at=read_timestamp(r["created_at"]), status=r["status"] or "open", severity=r["severity"],
        details=r["details"], tags=tuple(t for t in tags if isinstance(t, str)),
        confidence=read_float(r["confidence"]), related_files=tuple(read_str_list(r["related_files"])),
        updated_at=read_opt_timestamp(r["updated_at"]), resolved_at=read_opt_timestamp(r["resolved_at"]),
    )


def link(r: Row) -> DiscoveryLink:
    return DiscoveryLink(
        src_id=r["src_id"], dst_id=r["dst_id"], edge_type=r["edge_type"], created_at=read_timestamp(r["created_at"]),
        response_type=r["response_type"], weight=read_float(r["weight"]), created_by=r["created_by"],
        metadata=read_json_object(r["metadata"]),
    )


def dialectic_session(r: Row, messages: tuple[DialecticMessage, ...] = ()) -> DialecticSession:
    created = read_timestamp(r["created_at"])
    resolution = read_json(r["resolution_json"], None)
    return DialecticSession(
        session_id=r["session_id"], paused_agent_id=r["paused_agent_id"], phase=r["phase"] or "thesis",
        status=r["status"] or "active", created_at=created, updated_at=read_opt_timestamp(r["updated_at"]) or created,
        reviewer_agent_id=r["reviewer_agent_id"], reason=r["reason"], discovery_id=r["discovery_id"],
        dispute_type=r["dispute_type"], session_type=r["session_type"], topic=r["topic"],
        max_synthesis_rounds=read_int(r["max_synthesis_rounds"]), synthesis_round=read_int(r["synthesis_round"]) or 0,
        paused_agent_state=read_json_object(r["paused_agent_state_json"]),
        resolution=resolution if isinstance(resolution, dict) else None, messages=messages,
    )


def dialectic_message(r: Row) -> DialecticMessage:
    return DialecticMessage(
        id=r["id"], session_id=r["session_id"], agent_id=r["agent_id"], message_type=r["message_type"] or "",
        timestamp=read_timestamp(r["timestamp"]), root_cause=r["root_cause"],
        proposed_conditions=read_json_list(r["proposed_conditions_json"]), reasoning=r["reasoning"],
        observed_metrics=read_json_object(r["observed_metrics_json"]), concerns=read_json_list(r["concerns_json"]),
        agrees=read_bool(r["agrees"]), signature=r["signature"],
    )
