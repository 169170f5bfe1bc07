"""The governance tools, as plain async functions over the Database interface.

Each tool takes the store first, then its arguments, and returns a JSON-ready
dict. Every tool that changes an agent's data takes that agent's ``api_key``.
A tool checks its arguments, then authenticates, then writes, so a refused
call writes nothing. Where a tool writes more than once, the main record
comes first, follow-up writes after it, and the follow-ups are safe to
complete by calling the tool again:

- audit events follow the change they record; if one cannot be written the
  change stands and the result carries a ``warnings`` entry (the event is
  logged on stderr instead);
- ``store_discovery`` writes the discovery, then its links; called again with
  the same ``discovery_id`` and summary by the same agent it adds only the
  links still missing;
- a dialectic message is written before the phase moves on; a phase move that
  was lost is made by the next message call on that session.

Nothing here knows which backend it runs on.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from .. import validate as v
from ..backends.base import Database
from ..errors import ConflictError, GovdbError, NotFoundError
from ..keys import generate_api_key
from ..records import (
    DIALECTIC_STATUSES, DISCOVERY_STATUSES, EDGE_TYPES, IDENTITY_STATUSES, REGIMES,
    RESPONSE_TYPES, DialecticSession, Session,
)

log = logging.getLogger("govdb.server")

Json = dict[str, Any]


class AuthenticationError(GovdbError):
    """The API key given is not the key of the agent named."""


@dataclass
class CallInfo:
    """What one tool call learnt about who called it, for its tool-usage row."""

    agent_id: str | None = None
    session_id: str | None = None
    error_type: str | None = None


current_call: contextvars.ContextVar[CallInfo | None] = contextvars.ContextVar("govdb_call", default=None)


def _note(agent_id: str | None = None, session_id: str | None = None) -> None:
    info = current_call.get()
    if info is not None:
        info.agent_id = agent_id or info.agent_id
        info.session_id = session_id or info.session_id


def jsonable(value: Any) -> Any:
    """Return records, datetimes and tuples as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): jsonable(x) for k, x in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(x) for x in value]
    return value


async def authenticate(db: Database, agent_id: str, api_key: str, field: str = "agent_id") -> None:
    """Return when ``api_key`` is the agent's key; raise NotFoundError or AuthenticationError otherwise.

    One read when the key is right (every call of an agent goes through here); the
    agent is looked up only to tell an unknown agent from a wrong key.
    """
    agent_id = v.ident(field, agent_id)
    key_field = "api_key" if field == "agent_id" else field.replace("agent_id", "api_key")
    v.text(key_field, api_key, max_len=v.MAX_SHORT_TEXT, allow_empty=False)
    if field == "agent_id":
        _note(agent_id)
    if await db.verify_api_key(agent_id, api_key):
        return
    if await db.get_identity(agent_id) is None:
        raise NotFoundError("agent", agent_id)
    raise AuthenticationError(f"{key_field} is not the key of agent {agent_id!r}")


async def _audit(db: Database, result: Json, event_type: str, agent_id: str | None,
                 details: Json, session_id: str | None = None) -> Json:
    """Append an audit event after the change it records; a failure becomes a warning."""
    try:
        ev, _ = await db.append_audit_event(event_type, agent_id=agent_id, session_id=session_id,
                                            details=details)
        result["audit_event_id"] = ev.event_id
    except GovdbError as exc:
        log.warning("audit event %s for agent %s not written (%s): %s", event_type, agent_id,
                    type(exc).__name__, v.canonical_json(details))
        result.setdefault("warnings", []).append(
            f"the change is stored, but its audit event {event_type} could not be written ({exc})")
    return result


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(8)}"


# -- agents ---------------------------------------------------------------

async def register_agent(
    db: Database, agent_id: str | None = None, parent_agent_id: str | None = None,
    parent_api_key: str | None = None, spawn_reason: str | None = None,
    tags: list[str] | None = None, notes: str | None = None, metadata: dict[str, Any] | None = None,
) -> Json:
    """Register an agent and return its API key (shown only this once; only a hash is stored).

    agent_id: optional, generated when omitted. parent_agent_id: the agent that
    spawns this one (lineage); its parent_api_key is then required.
    """
    agent_id = v.ident("agent_id", agent_id) if agent_id is not None else _new_id("agent")
    _note(agent_id)
    if parent_agent_id is not None:
        if parent_api_key is None:
            raise v.ValidationError("parent_api_key", "is required with parent_agent_id (the parent's API key)")
        await authenticate(db, parent_agent_id, parent_api_key, field="parent_agent_id")
    elif parent_api_key is not None:
        raise v.ValidationError("parent_api_key", "is only allowed with parent_agent_id")
    key = generate_api_key()
    ident = await db.create_identity(agent_id, api_key=key, parent_agent_id=parent_agent_id,
                                     spawn_reason=spawn_reason, tags=tags or (), notes=notes,
                                     metadata=metadata)
    result = {"agent": jsonable(ident), "api_key": key}
    return await _audit(db, result, "agent_registered", agent_id,
                        {"parent_agent_id": parent_agent_id, "spawn_reason": spawn_reason,
                         "tags": list(ident.tags)})


async def get_agent(db: Database, agent_id: str) -> Json:
    """Return an agent, its latest EISV state, its active sessions and open dialectic reviews."""
    agent_id = v.ident("agent_id", agent_id)
    ident = await db.get_identity(agent_id)
    if ident is None:
        raise NotFoundError("agent", agent_id)
    return {
        "agent": jsonable(ident),
        "latest_state": jsonable(await db.get_latest_agent_state(agent_id)),
        "active_sessions": jsonable(await db.get_active_sessions(agent_id)),
        "active_dialectic_sessions": jsonable(await db.get_active_dialectic_sessions(agent_id)),
    }


async def list_agents(db: Database, status: str | None = None, tag: str | None = None,
                      limit: int = 100, offset: int = 0) -> Json:
    """List agents, oldest first, optionally by status or tag."""
    return {"agents": jsonable(await db.list_identities(status=status, tag=tag, limit=limit, offset=offset))}


async def set_agent_status(db: Database, agent_id: str, api_key: str, status: str,
                           reason: str | None = None) -> Json:
    """Change an agent's status (active, paused, disabled, archived, deleted)."""
    v.choice("status", status, IDENTITY_STATUSES)
    v.opt_text("reason", reason, max_len=v.MAX_SHORT_TEXT)
    await authenticate(db, agent_id, api_key)
    before = await db.get_identity(agent_id)
    ident = await db.update_identity_status(agent_id, status, reason=reason)
    return await _audit(db, {"agent": jsonable(ident)}, "agent_status_changed", agent_id,
                        {"from": before.status if before else None, "to": status, "reason": reason})


async def get_lineage(db: Database, agent_id: str, max_depth: int = 64) -> Json:
    """Return an agent's ancestors (nearest first, the agent itself first) and its children."""
    lineage = await db.get_lineage(agent_id, max_depth=max_depth)
    children = await db.list_children(agent_id)
    return {"lineage": [i.agent_id for i in lineage], "ancestors": jsonable(lineage[1:]),
            "children": jsonable(children)}


# -- sessions -------------------------------------------------------------

def _session_live(sess: Session) -> bool:
    return sess.is_active and sess.expires_at > v.now()


async def _own_session(db: Database, agent_id: str, session_id: str) -> Session:
    sess = await db.get_session(session_id)
    if sess is None:
        raise NotFoundError("session", session_id)
    if sess.agent_id != agent_id:
        raise AuthenticationError(f"session {session_id!r} belongs to another agent")
    return sess


async def bind_session(db: Database, agent_id: str, api_key: str, session_id: str | None = None,
                       ttl_seconds: int = 86_400, client_type: str | None = None,
                       client_info: dict[str, Any] | None = None) -> Json:
    """Bind a new session to the agent, or resume one of its live sessions (extending its expiry).

    Sessions live in the store, so any server process can resume them.
    """
    ttl = timedelta(seconds=v.integer("ttl_seconds", ttl_seconds, 60, 30 * 86_400))
    if session_id is not None:
        session_id = v.ident("session_id", session_id)
    await authenticate(db, agent_id, api_key)
    if session_id is not None:
        _note(session_id=session_id)
        try:
            sess = await _own_session(db, agent_id, session_id)
        except NotFoundError:
            pass
        else:
            if not _session_live(sess):
                raise ConflictError(f"session {session_id!r} has ended or expired; bind a new session")
            return {"session": jsonable(await db.touch_session(session_id, ttl=ttl)), "resumed": True}
    session_id = session_id or _new_id("sess")
    _note(session_id=session_id)
    sess = await db.create_session(session_id, agent_id, ttl=ttl, client_type=client_type,
                                   client_info=client_info)
    return {"session": jsonable(sess), "resumed": False}


async def end_session(db: Database, agent_id: str, api_key: str, session_id: str) -> Json:
    """End one of the agent's sessions."""
    session_id = v.ident("session_id", session_id)
    _note(session_id=session_id)
    await authenticate(db, agent_id, api_key)
    await _own_session(db, agent_id, session_id)
    return {"session": jsonable(await db.end_session(session_id))}


async def get_session(db: Database, session_id: str) -> Json:
    """Return an agent session and whether it is live (active and not expired)."""
    sess = await db.get_session(session_id)
    if sess is None:
        raise NotFoundError("session", session_id)
    return {"session": jsonable(sess), "live": _session_live(sess)}


# -- EISV state -------------------------------------------------------------

async def check_in(db: Database, agent_id: str, api_key: str, energy: float, integrity: float,
                   entropy: float, void: float, regime: str = "nominal", coherence: float | None = None,
                   state: dict[str, Any] | None = None, session_id: str | None = None) -> Json:
    """Record the agent's EISV state (energy, integrity, entropy, void); a regime change is audited.

    session_id: optional live session of the agent, marked active by the check-in.
    """
    for name, value in (("energy", energy), ("integrity", integrity), ("entropy", entropy), ("void", void)):
        v.eisv(name, value)
    if coherence is not None:
        v.eisv("coherence", coherence)
    v.choice("regime", regime, REGIMES)
    v.json_doc("state", state)
    if session_id is not None:
        session_id = v.ident("session_id", session_id)
        _note(session_id=session_id)
    await authenticate(db, agent_id, api_key)
    if session_id is not None and not _session_live(await _own_session(db, agent_id, session_id)):
        raise ConflictError(f"session {session_id!r} has ended or expired; bind a new session")
    previous = await db.get_latest_agent_state(agent_id)
    snap = await db.record_agent_state(agent_id, energy=energy, integrity=integrity, entropy=entropy,
                                       void=void, regime=regime, coherence=coherence, state=state)
    changed = previous is not None and previous.regime != regime
    result: Json = {"state": jsonable(snap), "previous_regime": previous.regime if previous else None,
                    "regime_changed": changed}
    if session_id is not None:
        try:
            await db.touch_session(session_id)
        except GovdbError as exc:
            result.setdefault("warnings", []).append(f"the state is stored, but the session was not touched ({exc})")
    if changed:
        await _audit(db, result, "regime_changed", agent_id,
                     {"from": previous.regime, "to": regime, "state_id": snap.id}, session_id)
    return result


async def get_state(db: Database, agent_id: str, limit: int = 10, since: datetime | None = None) -> Json:
    """Return an agent's latest EISV state and its history, newest first."""
    agent_id = v.ident("agent_id", agent_id)
    if await db.get_identity(agent_id) is None:
        raise NotFoundError("agent", agent_id)
    return {"latest": jsonable(await db.get_latest_agent_state(agent_id)),
            "history": jsonable(await db.get_agent_state_history(agent_id, limit=limit, since=since))}


# -- knowledge --------------------------------------------------------------

async def store_discovery(
    db: Database, agent_id: str, api_key: str, summary: str, type: str = "insight",
    discovery_id: str | None = None, details: str | None = None, severity: str | None = None,
    status: str = "open", tags: list[str] | None = None, confidence: float | None = None,
    related_files: list[str] | None = None, related_to: list[str] | None = None,
    response_to: str | None = None, response_type: str | None = None,
) -> Json:
    """Store a discovery with tags, related_to links to other discoveries, and optionally as a
    response (response_to + response_type: extend, question, disagree, support).

    Calling it again with the same discovery_id and summary completes links a failed call left out.
    """
    discovery_id = v.ident("discovery_id", discovery_id) if discovery_id is not None else _new_id("disc")
    v.text("summary", summary, max_len=v.MAX_SHORT_TEXT * 4, allow_empty=False)
    related = list(dict.fromkeys(v.ident(f"related_to[{i}]", d) for i, d in enumerate(related_to or ())))
    if response_to is not None:
        response_to = v.ident("response_to", response_to)
        v.choice("response_type", response_type, RESPONSE_TYPES)
    elif response_type is not None:
        raise v.ValidationError("response_type", "is only allowed with response_to")
    if discovery_id in related or discovery_id == response_to:
        raise v.ValidationError("related_to", "must not name the discovery itself")
    await authenticate(db, agent_id, api_key)
    for target in [*related, *([response_to] if response_to else [])]:
        if await db.get_discovery(target) is None:
            raise NotFoundError("discovery", target)
    existing = await db.get_discovery(discovery_id)
    if existing is None:
        disc = await db.add_discovery(
            discovery_id, agent_id=agent_id, type=type, summary=summary, details=details,
            severity=severity, status=status, tags=tags or (), confidence=confidence,
            related_files=related_files or ())
    elif existing.agent_id == agent_id and existing.summary == summary:
        disc = existing  # a retry: add what the first call did not
    else:
        raise ConflictError(f"discovery {discovery_id!r} exists")
    links = [(d, "related_to", None) for d in related]
    if response_to is not None:
        links.append((response_to, "response_to", response_type))
    for dst, edge, rtype in links:
        try:
            await db.link_discoveries(discovery_id, dst, edge_type=edge, response_type=rtype, created_by=agent_id)
        except ConflictError:
            if existing is None:
                raise
    result: Json = {"discovery": jsonable(disc), "links": len(links), "completed_retry": existing is not None}
    return await _audit(db, result, "discovery_stored", agent_id, {
        "discovery_id": discovery_id, "type": disc.type, "tags": list(disc.tags),
        "related_to": related, "response_to": response_to, "response_type": response_type})


async def update_discovery_status(db: Database, agent_id: str, api_key: str, discovery_id: str,
                                  status: str) -> Json:
    """Change the status of one of the agent's discoveries (open, resolved, archived, disputed)."""
    v.choice("status", status, DISCOVERY_STATUSES)
    discovery_id = v.ident("discovery_id", discovery_id)
    await authenticate(db, agent_id, api_key)
    disc = await db.get_discovery(discovery_id)
    if disc is None:
        raise NotFoundError("discovery", discovery_id)
    if disc.agent_id != agent_id:
        raise AuthenticationError(f"discovery {discovery_id!r} belongs to another agent")
    disc = await db.update_discovery_status(discovery_id, status)
    return await _audit(db, {"discovery": jsonable(disc)}, "discovery_status_changed", agent_id,
                        {"discovery_id": discovery_id, "status": status})


async def search_discoveries(db: Database, query: str | None = None, tags: list[str] | None = None,
                             type: str | None = None, status: str | None = None,
                             agent_id: str | None = None, limit: int = 20) -> Json:
    """Search discoveries: every word of query (in summary or details) and every tag must match."""
    return {"discoveries": jsonable(await db.search_discoveries(
        query, tags=tags or (), type=type, status=status, agent_id=agent_id, limit=limit))}


async def get_discovery(db: Database, discovery_id: str) -> Json:
    """Return one discovery."""
    disc = await db.get_discovery(discovery_id)
    if disc is None:
        raise NotFoundError("discovery", discovery_id)
    return {"discovery": jsonable(disc)}


async def get_neighbors(db: Database, discovery_id: str, edge_type: str | None = None) -> Json:
    """Return the discoveries one link away (either direction), with each link."""
    if edge_type is not None:
        v.choice("edge_type", edge_type, EDGE_TYPES)
    return {"neighbors": jsonable(await db.get_neighbors(discovery_id, edge_type=edge_type))}


async def get_response_chain(db: Database, discovery_id: str, max_depth: int = 32) -> Json:
    """Return a discovery and, nearest first, the discoveries it responds to."""
    return {"chain": jsonable(await db.get_response_chain(discovery_id, max_depth=max_depth))}


# -- dialectic review -------------------------------------------------------

_PHASE_ORDER = ("thesis", "antithesis", "synthesis")
_MESSAGE_FIELDS = {
    "reasoning": v.text, "root_cause": v.text, "agrees": v.boolean,
    "proposed_conditions": lambda f, x: v.json_doc(f, x, kind=list),
    "concerns": lambda f, x: v.json_doc(f, x, kind=list),
    "observed_metrics": v.json_doc,
}


async def _dialectic(db: Database, session_id: str) -> DialecticSession:
    ds = await db.get_dialectic_session(session_id)
    if ds is None:
        raise NotFoundError("dialectic session", session_id)
    return ds


def _active(ds: DialecticSession) -> None:
    if ds.status != "active":
        raise ConflictError(f"dialectic session {ds.session_id!r} is {ds.status}, no longer active")


async def open_dialectic(
    db: Database, agent_id: str, api_key: str, reason: str | None = None,
    reviewer_agent_id: str | None = None, discovery_id: str | None = None, topic: str | None = None,
    dispute_type: str | None = None, session_type: str | None = None,
    max_synthesis_rounds: int | None = None, session_id: str | None = None,
) -> Json:
    """Open a dialectic review of the calling agent (the paused agent); a reviewer may be named now
    or join later with join_dialectic. The agent's latest EISV state is kept with the session."""
    session_id = v.ident("session_id", session_id) if session_id is not None else _new_id("dialectic")
    v.opt_ident("reviewer_agent_id", reviewer_agent_id)
    await authenticate(db, agent_id, api_key)
    latest = await db.get_latest_agent_state(agent_id)
    snapshot = {} if latest is None else {
        "E": latest.energy, "I": latest.integrity, "S": latest.entropy, "V": latest.void,
        "regime": latest.regime, "recorded_at": latest.recorded_at.isoformat()}
    ds = await db.create_dialectic_session(
        session_id, paused_agent_id=agent_id, reviewer_agent_id=reviewer_agent_id, reason=reason,
        discovery_id=discovery_id, dispute_type=dispute_type, session_type=session_type, topic=topic,
        max_synthesis_rounds=max_synthesis_rounds, paused_agent_state=snapshot)
    return await _audit(db, {"dialectic_session": jsonable(ds)}, "dialectic_opened", agent_id, {
        "session_id": session_id, "reviewer_agent_id": reviewer_agent_id, "reason": reason,
        "discovery_id": discovery_id})


async def join_dialectic(db: Database, session_id: str, agent_id: str, api_key: str) -> Json:
    """Join an active dialectic session as its reviewer."""
    session_id = v.ident("session_id", session_id)
    await authenticate(db, agent_id, api_key)
    ds = await _dialectic(db, session_id)
    _active(ds)
    if ds.reviewer_agent_id not in (None, agent_id):
        raise ConflictError(f"dialectic session {session_id!r} already has reviewer {ds.reviewer_agent_id!r}")
    return {"dialectic_session": jsonable(await db.assign_reviewer(session_id, agent_id))}


async def _add_message(db: Database, message_type: str, session_id: str, agent_id: str, api_key: str,
                       **fields: Any) -> Json:
    session_id = v.ident("session_id", session_id)
    for name, value in fields.items():  # checked here too: a phase repair may come before the message
        if value is not None:
            _MESSAGE_FIELDS[name](name, value)
    await authenticate(db, agent_id, api_key)
    ds = await _dialectic(db, session_id)
    _active(ds)
    allowed = {"thesis": (ds.paused_agent_id,), "antithesis": (ds.reviewer_agent_id,),
               "synthesis": (ds.paused_agent_id, ds.reviewer_agent_id)}[message_type]
    if agent_id not in allowed:
        who = {"thesis": "the paused agent", "antithesis": "the reviewer",
               "synthesis": "the paused agent or the reviewer"}[message_type]
        if message_type == "antithesis" and ds.reviewer_agent_id is None:
            raise ConflictError(f"dialectic session {session_id!r} has no reviewer yet (join_dialectic)")
        raise AuthenticationError(f"only {who} of dialectic session {session_id!r} may add a {message_type}")
    # The phase follows the messages: a phase move lost after a message is made here.
    derived = {None: "thesis", "thesis": "antithesis"}.get(
        ds.messages[-1].message_type if ds.messages else None, "synthesis")
    stored = ds.phase if ds.phase in _PHASE_ORDER else "thesis"
    phase = max(derived, stored, key=_PHASE_ORDER.index)
    if message_type != phase:
        raise ConflictError(f"dialectic session {session_id!r} is in phase {phase}; a {message_type} is not expected")
    if message_type == "synthesis" and ds.max_synthesis_rounds and ds.synthesis_round >= ds.max_synthesis_rounds:
        raise ConflictError(f"dialectic session {session_id!r} has used its {ds.max_synthesis_rounds} synthesis "
                            "rounds; resolve or escalate it")
    if phase != ds.phase:
        await db.set_dialectic_phase(session_id, phase)
    msg = await db.add_dialectic_message(session_id, agent_id=agent_id, message_type=message_type, **fields)
    following = {"thesis": "antithesis", "antithesis": "synthesis"}.get(message_type)
    result: Json = {"message": jsonable(msg), "phase": phase}
    if following:
        try:
            await db.set_dialectic_phase(session_id, following)
            result["phase"] = following
        except GovdbError as exc:
            result.setdefault("warnings", []).append(
                f"the {message_type} is stored; the phase moves to {following} on the next call ({exc})")
    return result


async def submit_thesis(db: Database, session_id: str, agent_id: str, api_key: str,
                        reasoning: str, root_cause: str | None = None,
                        proposed_conditions: list[Any] | None = None) -> Json:
    """The paused agent states its case: reasoning, root cause, proposed conditions to resume."""
    return await _add_message(db, "thesis", session_id, agent_id, api_key, reasoning=reasoning,
                              root_cause=root_cause, proposed_conditions=proposed_conditions)


async def submit_antithesis(db: Database, session_id: str, agent_id: str, api_key: str,
                            reasoning: str, observed_metrics: dict[str, Any] | None = None,
                            concerns: list[Any] | None = None) -> Json:
    """The reviewer answers the thesis: reasoning, observed metrics, concerns."""
    return await _add_message(db, "antithesis", session_id, agent_id, api_key, reasoning=reasoning,
                              observed_metrics=observed_metrics, concerns=concerns)


async def submit_synthesis(db: Database, session_id: str, agent_id: str, api_key: str,
                           reasoning: str, proposed_conditions: list[Any] | None = None,
                           agrees: bool | None = None) -> Json:
    """Either participant proposes a synthesis (one round each call) and says whether it agrees."""
    return await _add_message(db, "synthesis", session_id, agent_id, api_key, reasoning=reasoning,
                              proposed_conditions=proposed_conditions, agrees=agrees)


async def resolve_dialectic(db: Database, session_id: str, agent_id: str, api_key: str,
                            resolution: dict[str, Any], status: str = "resolved") -> Json:
    """Close an active dialectic session (resolved, escalated, failed, cancelled) with a resolution."""
    v.choice("status", status, DIALECTIC_STATUSES[1:])
    v.json_doc("resolution", resolution)
    session_id = v.ident("session_id", session_id)
    await authenticate(db, agent_id, api_key)
    ds = await _dialectic(db, session_id)
    _active(ds)
    if agent_id not in (ds.paused_agent_id, ds.reviewer_agent_id):
        raise AuthenticationError(f"only a participant of dialectic session {session_id!r} may resolve it")
    ds = await db.resolve_dialectic_session(session_id, resolution=resolution, status=status)
    return await _audit(db, {"dialectic_session": jsonable(ds)}, "dialectic_resolved", agent_id,
                        {"session_id": session_id, "status": status, "resolution": resolution})


async def get_dialectic_session(db: Database, session_id: str) -> Json:
    """Return a dialectic session with its messages in order."""
    return {"dialectic_session": jsonable(await _dialectic(db, v.ident("session_id", session_id)))}


# -- audit, usage, health ---------------------------------------------------

async def query_audit_events(db: Database, agent_id: str | None = None, event_type: str | None = None,
                             since: datetime | None = None, until: datetime | None = None,
                             query: str | None = None, limit: int = 50) -> Json:
    """Return audit events newest first, by agent / type / time (since inclusive, until exclusive),
    or by full-text query (every word must occur); query cannot be combined with the filters."""
    if query is not None:
        if any(x is not None for x in (agent_id, event_type, since, until)):
            raise v.ValidationError("query", "cannot be combined with agent_id, event_type, since or until")
        return {"events": jsonable(await db.search_audit_events(query, limit=limit))}
    return {"events": jsonable(await db.query_audit_events(
        agent_id=agent_id, event_type=event_type, since=since, until=until, limit=limit))}


async def tool_usage_stats(db: Database, agent_id: str | None = None, tool_name: str | None = None,
                           since: datetime | None = None, recent: int = 0) -> Json:
    """Return per-tool call counts, failures and latency, and optionally the most recent calls."""
    v.integer("recent", recent, 0, 1000)
    tool_name = v.opt_ident("tool_name", tool_name)
    stats = await db.get_tool_stats(agent_id=agent_id, since=since)
    if tool_name is not None:
        stats = [s for s in stats if s.tool_name == tool_name]
    result: Json = {"stats": jsonable(stats)}
    if recent:
        result["recent"] = jsonable(await db.query_tool_usage(
            agent_id=agent_id, tool_name=tool_name, since=since, limit=recent))
    return result


async def health(db: Database) -> Json:
    """Return whether the store answers, its backend, schema version and graph state."""
    return {"health": jsonable(await db.health())}


#: Every tool, in the order a client lists them.
TOOLS = (
    register_agent, get_agent, list_agents, set_agent_status, get_lineage,
    bind_session, end_session, get_session,
    check_in, get_state,
    store_discovery, update_discovery_status, search_discoveries, get_discovery, get_neighbors,
    get_response_chain,
    open_dialectic, join_dialectic, submit_thesis, submit_antithesis, submit_synthesis,
    resolve_dialectic, get_dialectic_session,
    query_audit_events, tool_usage_stats, health,
)
