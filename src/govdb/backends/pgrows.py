"""PostgreSQL rows as govdb records: the column lists the backend selects, the
converters from asyncpg records, the jsonb codecs and text form, and the
``words`` of searchable rows. Shared by the backend and the migration tools."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

import asyncpg

from ..convert import dump_json
from ..records import (
    AgentState, AuditEvent, Calibration, DialecticMessage, DialecticSession, Discovery, DiscoveryLink, Identity,
    Session, ToolUsage,
)
from .base import indexed_words

IDENTITY_COLS = ("agent_id, status, created_at, updated_at, parent_agent_id, spawn_reason, disabled_at,"
                  " tags, notes, metadata, lifecycle_events")
SESSION_COLS = ("session_id, agent_id, created_at, last_active, expires_at, is_active, client_type,"
                 " client_info, metadata")
STATE_COLS = "id, agent_id, recorded_at, energy, integrity, entropy, void, coherence, regime, snapshot"
EVENT_COLS = "event_id, ts, event_type, agent_id, session_id, confidence, details, raw_hash"
USAGE_COLS = "usage_id, ts, tool_name, agent_id, session_id, latency_ms, success, error_type, payload"
DISCOVERY_COLS = ("d.id, d.agent_id, d.type, d.summary, d.created_at, d.status, d.severity, d.details,"
              " d.confidence, d.related_files, d.updated_at, d.resolved_at,"
              " ARRAY(SELECT t.tag FROM core.discovery_tags t WHERE t.discovery_id = d.id ORDER BY t.tag) AS tags")
# Aliased: neighbour queries select a discovery's created_at too.
LINK_COLS = ("e.src_id, e.dst_id, e.edge_type, e.created_at AS link_created_at, e.response_type, e.weight,"
              " e.created_by, e.metadata AS link_metadata")
DIALECTIC_COLS = ("session_id, paused_agent_id, phase, status, created_at, updated_at, reviewer_agent_id, reason,"
                   " discovery_id, dispute_type, session_type, topic, max_synthesis_rounds, synthesis_round,"
                   " paused_agent_state, resolution")
MESSAGE_COLS = ("id, session_id, agent_id, message_type, ts, root_cause, proposed_conditions, reasoning,"
                 " observed_metrics, concerns, agrees, signature")


def dump_jsonb(value: Any) -> str:
    """Return JSON text for a jsonb column that reads back as the same floats.

    jsonb stores numbers as numeric and prints 1e+20 as an integer; writing
    such floats as plain decimals with a fraction (100000000000000000000.0)
    keeps them floats on the way back.
    """
    text = dump_json(value)
    if not _EXP_FLOAT.search(text):
        return text
    return _encode_plain(value)


_EXP_FLOAT = re.compile(r"[0-9]e[+-][0-9]")


def _encode_plain(value: Any) -> str:
    if isinstance(value, float):
        text = repr(value)
        if "e" not in text:
            return text
        plain = format(Decimal(text), "f")
        return plain if "." in plain else plain + ".0"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{dump_json(str(k))}: {_encode_plain(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_encode_plain(v) for v in value) + "]"
    return dump_json(value)


async def set_json_codecs(conn: asyncpg.Connection) -> None:
    # Binary format, so COPY (which needs binary encoders) takes dicts too:
    # jsonb's binary form is a version byte (1) and the text.
    await conn.set_type_codec("jsonb", schema="pg_catalog", format="binary",
                              encoder=lambda v: b"\x01" + dump_jsonb(v).encode("utf-8"),
                              decoder=lambda b: json.loads(b[1:].decode("utf-8")))
    await conn.set_type_codec("json", schema="pg_catalog", format="binary",
                              encoder=lambda v: dump_jsonb(v).encode("utf-8"),
                              decoder=lambda b: json.loads(b.decode("utf-8")))


def audit_words(event_type: str, details_text: str) -> list[str]:
    """Return the ``words`` of an audit event: those of its type and its details as JSON text."""
    return indexed_words(event_type + " " + details_text)


def discovery_words(summary: str, details: str | None) -> list[str]:
    """Return the ``words`` of a discovery: those of its summary and details."""
    return indexed_words(summary if details is None else summary + " " + details)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def identity(r: asyncpg.Record) -> Identity:
    return Identity(
        agent_id=r["agent_id"], status=r["status"], created_at=r["created_at"], updated_at=r["updated_at"],
        parent_agent_id=r["parent_agent_id"], spawn_reason=r["spawn_reason"], disabled_at=r["disabled_at"],
        tags=tuple(r["tags"] or ()), notes=r["notes"], metadata=_dict(r["metadata"]),
        lifecycle_events=tuple(e for e in _list(r["lifecycle_events"]) if isinstance(e, dict)),
    )


def session(r: asyncpg.Record) -> Session:
    return Session(
        session_id=r["session_id"], agent_id=r["agent_id"], created_at=r["created_at"],
        last_active=r["last_active"], expires_at=r["expires_at"], is_active=r["is_active"],
        client_type=r["client_type"], client_info=_dict(r["client_info"]), metadata=_dict(r["metadata"]),
    )


def agent_state(r: asyncpg.Record) -> AgentState:
    return AgentState(
        id=r["id"], agent_id=r["agent_id"], recorded_at=r["recorded_at"], energy=r["energy"],
        integrity=r["integrity"], entropy=r["entropy"], void=r["void"], regime=r["regime"],
        coherence=r["coherence"], state=_dict(r["snapshot"]),
    )


def calibration(r: asyncpg.Record) -> Calibration:
    return Calibration(state=_dict(r["state"]), version=r["version"], updated_at=r["updated_at"])


def audit_event(r: asyncpg.Record) -> AuditEvent:
    return AuditEvent(
        event_id=str(r["event_id"]), timestamp=r["ts"], event_type=r["event_type"], agent_id=r["agent_id"],
        session_id=r["session_id"], confidence=r["confidence"], details=_dict(r["details"]),
        raw_hash=r["raw_hash"],
    )


def tool_usage(r: asyncpg.Record) -> ToolUsage:
    return ToolUsage(
        usage_id=str(r["usage_id"]), timestamp=r["ts"], tool_name=r["tool_name"], agent_id=r["agent_id"],
        session_id=r["session_id"], latency_ms=r["latency_ms"], success=r["success"],
        error_type=r["error_type"], payload=_dict(r["payload"]),
    )


def discovery(r: asyncpg.Record) -> Discovery:
    return Discovery(
        id=r["id"], agent_id=r["agent_id"], type=r["type"], summary=r["summary"], created_at=r["created_at"],
        status=r["status"], severity=r["severity"], details=r["details"], tags=tuple(r["tags"] or ()),
        confidence=r["confidence"], related_files=tuple(f for f in _list(r["related_files"]) if isinstance(f, str)),
        updated_at=r["updated_at"], resolved_at=r["resolved_at"],
    )


def link(r: asyncpg.Record) -> DiscoveryLink:
    return DiscoveryLink(
        src_id=r["src_id"], dst_id=r["dst_id"], edge_type=r["edge_type"], created_at=r["link_created_at"],
        response_type=r["response_type"], weight=r["weight"], created_by=r["created_by"],
        metadata=_dict(r["link_metadata"]),
    )


def dialectic(r: asyncpg.Record, messages: tuple[DialecticMessage, ...] = ()) -> DialecticSession:
    resolution = r["resolution"]
    return DialecticSession(
        session_id=r["session_id"], paused_agent_id=r["paused_agent_id"], phase=r["phase"], status=r["status"],
        created_at=r["created_at"], updated_at=r["updated_at"], reviewer_agent_id=r["reviewer_agent_id"],
        reason=r["reason"], discovery_id=r["discovery_id"], dispute_type=r["dispute_type"],
        session_type=r["session_type"], topic=r["topic"], max_synthesis_rounds=r["max_synthesis_rounds"],
        synthesis_round=r["synthesis_round"], paused_agent_state=_dict(r["paused_agent_state"]),
        resolution=resolution if isinstance(resolution, dict) else None, messages=messages,
    )


def message(r: asyncpg.Record) -> DialecticMessage:
    return DialecticMessage(
        id=r["id"], session_id=r["session_id"], agent_id=r["agent_id"], message_type=r["message_type"],
        timestamp=r["ts"], root_cause=r["root_cause"], proposed_conditions=_list(r["proposed_conditions"]),
        reasoning=r["reasoning"], observed_metrics=_dict(r["observed_metrics"]), concerns=_list(r["concerns"]),
        agrees=r["agrees"], signature=r["signature"],
    )

