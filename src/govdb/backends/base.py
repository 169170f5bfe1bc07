"""The govdb contract: one async interface, the same on every backend.

Public methods validate their arguments (raising
:class:`~govdb.errors.ValidationError` before anything is written) and hand
normalised values to the backend's ``_``-prefixed primitives. A backend
implements only those primitives, so validation cannot drift between
backends. Every datetime in and out is timezone-aware UTC.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from abc import ABC, abstractmethod
from datetime import datetime, timedelta
from typing import Any

from .. import validate as v
from ..keys import hash_api_key
from ..records import (
    DIALECTIC_PHASES, DIALECTIC_STATUSES, DISCOVERY_STATUSES, EDGE_TYPES,
    IDENTITY_STATUSES, MESSAGE_TYPES, REGIMES, RESPONSE_TYPES, SEVERITIES,
    AgentState, AuditEvent, Calibration, DialecticMessage, DialecticSession,
    Discovery, DiscoveryLink, Health, Identity, Neighbor, Session, ToolStats,
    ToolUsage,
)


def audit_hash(timestamp: datetime, event_type: str, agent_id: str | None,
               session_id: str | None, details: dict[str, Any]) -> str:
    """Return the dedup hash of an audit event's content (sha256 hex)."""
    payload = v.canonical_json([
        timestamp.isoformat(), event_type, agent_id, session_id, details,
    ])
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class Database(ABC):
    """A governance store. Use ``async with`` or call :meth:`close`."""

    name: str = "abstract"
    #: True when discoveries, lineage and dialectic data are also an AGE graph.
    supports_graph: bool = False
    #: True when the backend can bulk-load with COPY.
    supports_copy: bool = False

    # -- lifecycle -------------------------------------------------------

    @abstractmethod
    async def connect(self) -> None:
        """Open connections; create the schema if the store is empty."""

    @abstractmethod
    async def close(self) -> None:
        """Release every connection. Safe to call twice."""

    async def __aenter__(self) -> "Database":
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @abstractmethod
    async def health(self) -> Health:
        """Return whether the store answers, its schema version and graph state."""

    # -- identities ------------------------------------------------------

    async def create_identity(
        self, agent_id: str, *, api_key: str, status: str = "active",
        parent_agent_id: str | None = None, spawn_reason: str | None = None,
        tags: list[str] | tuple[str, ...] = (), notes: str | None = None,
        metadata: dict[str, Any] | str | None = None,
        created_at: datetime | None = None,
    ) -> Identity:
        """Register an agent; only a hash of ``api_key`` is stored.

        Raises ConflictError if the id exists, NotFoundError if the parent
        does not.
        """
        agent_id = v.ident("agent_id", agent_id)
        key = v.text("api_key", api_key, max_len=v.MAX_SHORT_TEXT, allow_empty=False)
        ident = Identity(
            agent_id=agent_id,
            status=v.choice("status", status, IDENTITY_STATUSES),
            created_at=(ts := v.opt_aware("created_at", created_at) or v.now()),
            updated_at=ts,
            parent_agent_id=v.opt_ident("parent_agent_id", parent_agent_id),
            spawn_reason=v.opt_text("spawn_reason", spawn_reason, max_len=v.MAX_SHORT_TEXT),
            tags=v.tags("tags", tags),
            notes=v.opt_text("notes", notes),
            metadata=_identity_metadata(metadata),
        )
        if ident.parent_agent_id == agent_id:
            raise v.ValidationError("parent_agent_id", "must name another agent, not the agent itself")
        return await self._create_identity(ident, hash_api_key(key))

    async def get_identity(self, agent_id: str) -> Identity | None:
        """Return the agent, or None."""
        return await self._get_identity(v.ident("agent_id", agent_id))

    async def list_identities(self, *, status: str | None = None, tag: str | None = None,
                              limit: int = 100, offset: int = 0) -> list[Identity]:
        """Return agents ordered by creation time, then id."""
        if status is not None:
            v.choice("status", status, IDENTITY_STATUSES)
        return await self._list_identities(
            status, v.opt_ident("tag", tag, max_len=v.MAX_TAG_LEN),
            v.limit(limit), v.integer("offset", offset, 0))

    async def update_identity_status(self, agent_id: str, status: str, *,
                                     reason: str | None = None) -> Identity:
        """Change status, append a lifecycle event, set ``disabled_at`` when disabled."""
        return await self._update_identity_status(
            v.ident("agent_id", agent_id), v.choice("status", status, IDENTITY_STATUSES),
            v.opt_text("reason", reason, max_len=v.MAX_SHORT_TEXT), v.now())

    async def update_identity(self, agent_id: str, *, tags: list[str] | None = None,
                              notes: str | None = None,
                              metadata: dict[str, Any] | str | None = None) -> Identity:
        """Replace tags, notes and/or metadata (arguments left None are kept)."""
        return await self._update_identity(
            v.ident("agent_id", agent_id),
            None if tags is None else v.tags("tags", tags),
            v.opt_text("notes", notes),
            None if metadata is None else _identity_metadata(metadata),
            v.now())

    async def verify_api_key(self, agent_id: str, api_key: str) -> bool:
        """Return True when ``api_key`` is the agent's key (constant-time compare)."""
        from ..keys import verify_api_key
        agent_id = v.ident("agent_id", agent_id)
        if not isinstance(api_key, str) or not api_key:
            return False
        stored = await self._get_api_key_hash(agent_id)
        return stored is not None and verify_api_key(api_key, stored)

    async def get_lineage(self, agent_id: str, *, max_depth: int = 64) -> list[Identity]:
        """Return the agent and its ancestors, nearest first.

        Follows at most ``max_depth`` parent links; stops at a cycle or at a
        parent id that names no agent.
        """
        return await self._get_lineage(v.ident("agent_id", agent_id), v.integer("max_depth", max_depth, 1, 1000))

    async def list_children(self, agent_id: str) -> list[Identity]:
        """Return agents spawned by this one, oldest first."""
        return await self._list_children(v.ident("agent_id", agent_id))

    # -- sessions --------------------------------------------------------

    async def create_session(
        self, session_id: str, agent_id: str, *, ttl: timedelta = timedelta(hours=24),
        client_type: str | None = None, client_info: dict[str, Any] | str | None = None,
        metadata: dict[str, Any] | str | None = None,
    ) -> Session:
        """Bind a session to an existing agent. ConflictError if the id exists."""
        if not isinstance(ttl, timedelta) or ttl <= timedelta(0):
            raise v.ValidationError("ttl", f"is expected to be a positive timedelta, got {ttl!r}")
        ts = v.now()
        sess = Session(
            session_id=v.ident("session_id", session_id), agent_id=v.ident("agent_id", agent_id),
            created_at=ts, last_active=ts, expires_at=ts + ttl, is_active=True,
            client_type=v.opt_text("client_type", client_type, max_len=v.MAX_SHORT_TEXT),
            client_info=v.json_doc("client_info", client_info),
            metadata=v.json_doc("metadata", metadata),
        )
        return await self._create_session(sess)

    async def get_session(self, session_id: str) -> Session | None:
        """Return the session, or None."""
        return await self._get_session(v.ident("session_id", session_id))

    async def touch_session(self, session_id: str, *, ttl: timedelta | None = None) -> Session:
        """Mark activity now; with ``ttl``, also move the expiry to now + ttl."""
        if ttl is not None and (not isinstance(ttl, timedelta) or ttl <= timedelta(0)):
            raise v.ValidationError("ttl", f"is expected to be a positive timedelta, got {ttl!r}")
        ts = v.now()
        return await self._touch_session(v.ident("session_id", session_id), ts,
                                         None if ttl is None else ts + ttl)

    async def end_session(self, session_id: str) -> Session:
        """Mark the session inactive."""
        return await self._end_session(v.ident("session_id", session_id), v.now())

    async def get_active_sessions(self, agent_id: str) -> list[Session]:
        """Return the agent's active, unexpired sessions, newest activity first."""
        return await self._get_active_sessions(v.ident("agent_id", agent_id), v.now())

    async def expire_sessions(self, *, now: datetime | None = None) -> int:
        """Deactivate sessions whose expiry has passed; return how many."""
        return await self._expire_sessions(v.opt_aware("now", now) or v.now())

    # -- agent state -----------------------------------------------------

    async def record_agent_state(
        self, agent_id: str, *, energy: float, integrity: float, entropy: float,
        void: float, regime: str = "nominal", coherence: float | None = None,
        state: dict[str, Any] | str | None = None, recorded_at: datetime | None = None,
    ) -> AgentState:
        """Append an EISV snapshot for an existing agent; return it with its id."""
        snap = AgentState(
            id=0, agent_id=v.ident("agent_id", agent_id),
            recorded_at=v.opt_aware("recorded_at", recorded_at) or v.now(),
            energy=v.eisv("energy", energy), integrity=v.eisv("integrity", integrity),
            entropy=v.eisv("entropy", entropy), void=v.eisv("void", void),
            regime=v.choice("regime", regime, REGIMES),
            coherence=None if coherence is None else v.eisv("coherence", coherence),
            state=v.json_doc("state", state),
        )
        clash = sorted(set(snap.state) & _STATE_KEYS)
        if clash:
            raise v.ValidationError("state", f"must not repeat {', '.join(clash)} (pass them as arguments)")
        return await self._record_agent_state(snap)

    async def get_latest_agent_state(self, agent_id: str) -> AgentState | None:
        """Return the newest snapshot (by recorded_at, then id), or None."""
        return await self._get_latest_agent_state(v.ident("agent_id", agent_id))

    async def get_agent_state_history(self, agent_id: str, *, limit: int = 100,
                                      since: datetime | None = None) -> list[AgentState]:
        """Return snapshots newest first."""
        return await self._get_agent_state_history(
            v.ident("agent_id", agent_id), v.limit(limit), v.opt_aware("since", since))

    # -- calibration -----------------------------------------------------

    async def get_calibration(self) -> Calibration | None:
        """Return the calibration document, or None if never written."""
        return await self._get_calibration()

    async def update_calibration(self, state: dict[str, Any] | str, *,
                                 expected_version: int | None = None) -> Calibration:
        """Replace the document; version becomes previous + 1 (1 for the first).

        With ``expected_version``, raise ConflictError unless the stored
        version equals it (0 meaning "never written").
        """
        return await self._update_calibration(
            v.json_doc("state", state), v.opt_integer("expected_version", expected_version, 0),
            v.now())

    # -- audit events ----------------------------------------------------

    async def append_audit_event(
        self, event_type: str, *, agent_id: str | None = None, session_id: str | None = None,
        details: dict[str, Any] | str | None = None, confidence: float = 1.0,
        timestamp: datetime | None = None, event_id: str | None = None,
    ) -> tuple[AuditEvent, bool]:
        """Append an event; return (event, inserted).

        Events with identical content (timestamp, type, agent, session,
        details) share a hash and are stored once: a repeat returns the
        stored event and False.
        """
        ts = v.opt_aware("timestamp", timestamp) or v.now()
        event_type = v.ident("event_type", event_type)
        agent_id = v.opt_ident("agent_id", agent_id)
        session_id = v.opt_ident("session_id", session_id)
        details = v.json_doc("details", details)
        ev = AuditEvent(
            event_id=_uuid("event_id", event_id), timestamp=ts, event_type=event_type,
            agent_id=agent_id, session_id=session_id,
            confidence=v.number("confidence", confidence, 0.0, 1.0), details=details,
            raw_hash=audit_hash(ts, event_type, agent_id, session_id, details),
        )
        return await self._append_audit_event(ev)

    async def query_audit_events(self, *, agent_id: str | None = None,
                                 event_type: str | None = None, since: datetime | None = None,
                                 until: datetime | None = None, limit: int = 100) -> list[AuditEvent]:
        """Return matching events newest first; ``since`` inclusive, ``until`` exclusive."""
        return await self._query_audit_events(
            v.opt_ident("agent_id", agent_id), v.opt_ident("event_type", event_type),
            v.opt_aware("since", since), v.opt_aware("until", until), v.limit(limit))

    async def search_audit_events(self, query: str, *, limit: int = 100) -> list[AuditEvent]:
        """Return events whose type or details contain every word of ``query``, newest first."""
        return await self._search_audit_events(_words("query", query), v.limit(limit))

    # -- tool usage ------------------------------------------------------

    async def record_tool_usage(
        self, tool_name: str, *, agent_id: str | None = None, session_id: str | None = None,
        latency_ms: int | None = None, success: bool = True, error_type: str | None = None,
        payload: dict[str, Any] | str | None = None, timestamp: datetime | None = None,
        usage_id: str | None = None,
    ) -> ToolUsage:
        """Append one tool call."""
        use = ToolUsage(
            usage_id=_uuid("usage_id", usage_id),
            timestamp=v.opt_aware("timestamp", timestamp) or v.now(),
            tool_name=v.ident("tool_name", tool_name),
            agent_id=v.opt_ident("agent_id", agent_id),
            session_id=v.opt_ident("session_id", session_id),
            latency_ms=v.opt_integer("latency_ms", latency_ms, 0, 86_400_000),
            success=v.boolean("success", success),
            error_type=v.opt_text("error_type", error_type, max_len=v.MAX_SHORT_TEXT),
            payload=v.json_doc("payload", payload),
        )
        return await self._record_tool_usage(use)

    async def query_tool_usage(self, *, agent_id: str | None = None, tool_name: str | None = None,
                               since: datetime | None = None, until: datetime | None = None,
                               limit: int = 100) -> list[ToolUsage]:
        """Return matching calls newest first; ``since`` inclusive, ``until`` exclusive."""
        return await self._query_tool_usage(
            v.opt_ident("agent_id", agent_id), v.opt_ident("tool_name", tool_name),
            v.opt_aware("since", since), v.opt_aware("until", until), v.limit(limit))

    async def get_tool_stats(self, *, agent_id: str | None = None,
                             since: datetime | None = None) -> list[ToolStats]:
        """Return per-tool call counts and latency, most-called first, then by name."""
        return await self._get_tool_stats(v.opt_ident("agent_id", agent_id), v.opt_aware("since", since))

    # -- knowledge graph -------------------------------------------------

    async def add_discovery(
        self, discovery_id: str, *, agent_id: str, type: str, summary: str,
        details: str | None = None, severity: str | None = None, status: str = "open",
        tags: list[str] | tuple[str, ...] = (), confidence: float | None = None,
        related_files: list[str] | tuple[str, ...] = (), created_at: datetime | None = None,
    ) -> Discovery:
        """Store a discovery by an existing agent. ConflictError if the id exists."""
        ts = v.opt_aware("created_at", created_at) or v.now()
        files = v.json_doc("related_files", list(related_files) if not isinstance(related_files, str) else related_files, kind=list)
        for i, f in enumerate(files):
            v.text(f"related_files[{i}]", f, max_len=v.MAX_SHORT_TEXT)
        disc = Discovery(
            id=v.ident("discovery_id", discovery_id), agent_id=v.ident("agent_id", agent_id),
            type=v.ident("type", type, max_len=v.MAX_TAG_LEN),
            summary=v.text("summary", summary, max_len=v.MAX_SHORT_TEXT * 4, allow_empty=False),
            created_at=ts, updated_at=ts,
            status=v.choice("status", status, DISCOVERY_STATUSES),
            severity=None if severity is None else v.choice("severity", severity, SEVERITIES),
            details=v.opt_text("details", details), tags=tuple(sorted(v.tags("tags", tags))),
            confidence=v.opt_number("confidence", confidence, 0.0, 1.0),
            related_files=tuple(files),
            resolved_at=ts if status == "resolved" else None,
        )
        return await self._add_discovery(disc)

    async def get_discovery(self, discovery_id: str) -> Discovery | None:
        """Return the discovery with its tags (sorted), or None."""
        return await self._get_discovery(v.ident("discovery_id", discovery_id))

    async def update_discovery_status(self, discovery_id: str, status: str) -> Discovery:
        """Change status; ``resolved`` sets resolved_at, any other clears it."""
        return await self._update_discovery_status(
            v.ident("discovery_id", discovery_id), v.choice("status", status, DISCOVERY_STATUSES), v.now())

    async def link_discoveries(
        self, src_id: str, dst_id: str, *, edge_type: str = "related_to",
        response_type: str | None = None, weight: float | None = None,
        created_by: str | None = None, metadata: dict[str, Any] | str | None = None,
    ) -> DiscoveryLink:
        """Link two existing discoveries; ``response_to`` needs a response type.

        Re-linking the same (src, dst, edge_type) raises ConflictError.
        """
        edge_type = v.choice("edge_type", edge_type, EDGE_TYPES)
        if edge_type == "response_to":
            response_type = v.choice("response_type", response_type, RESPONSE_TYPES)
        elif response_type is not None:
            raise v.ValidationError("response_type", "is only allowed on response_to links")
        src, dst = v.ident("src_id", src_id), v.ident("dst_id", dst_id)
        if src == dst:
            raise v.ValidationError("dst_id", "must differ from src_id (a discovery cannot link to itself)")
        link = DiscoveryLink(
            src_id=src, dst_id=dst, edge_type=edge_type, created_at=v.now(),
            response_type=response_type, weight=v.opt_number("weight", weight, 0.0, 1e6),
            created_by=v.opt_ident("created_by", created_by), metadata=v.json_doc("metadata", metadata),
        )
        return await self._link_discoveries(link)

    async def search_discoveries(
        self, query: str | None = None, *, tags: list[str] | tuple[str, ...] = (),
        type: str | None = None, status: str | None = None, agent_id: str | None = None,
        limit: int = 50,
    ) -> list[Discovery]:
        """Return discoveries matching every word of ``query`` (in summary or
        details) and carrying every tag given, newest first."""
        words = _words("query", query) if query is not None else ()
        if status is not None:
            v.choice("status", status, DISCOVERY_STATUSES)
        return await self._search_discoveries(
            words, v.tags("tags", tags), v.opt_ident("type", type, max_len=v.MAX_TAG_LEN),
            status, v.opt_ident("agent_id", agent_id), v.limit(limit))

    async def get_neighbors(self, discovery_id: str, *, edge_type: str | None = None) -> list[Neighbor]:
        """Return discoveries one link away in either direction, ordered by id."""
        if edge_type is not None:
            v.choice("edge_type", edge_type, EDGE_TYPES)
        return await self._get_neighbors(v.ident("discovery_id", discovery_id), edge_type)

    async def get_response_chain(self, discovery_id: str, *, max_depth: int = 32) -> list[Discovery]:
        """Follow ``response_to`` links from a discovery to what it answers.

        Returns the discovery first, then each one it responds to, nearest
        first (where there are several, the link to the lowest existing dst
        id); follows at most ``max_depth`` links and stops at a cycle.
        """
        return await self._get_response_chain(
            v.ident("discovery_id", discovery_id), v.integer("max_depth", max_depth, 1, 1000))

    # -- dialectic -------------------------------------------------------

    async def create_dialectic_session(
        self, session_id: str, *, paused_agent_id: str, reviewer_agent_id: str | None = None,
        reason: str | None = None, discovery_id: str | None = None,
        dispute_type: str | None = None, session_type: str | None = None,
        topic: str | None = None, max_synthesis_rounds: int | None = None,
        paused_agent_state: dict[str, Any] | str | None = None,
    ) -> DialecticSession:
        """Open a review of a paused agent (phase thesis, status active)."""
        ts = v.now()
        paused = v.ident("paused_agent_id", paused_agent_id)
        reviewer = v.opt_ident("reviewer_agent_id", reviewer_agent_id)
        if reviewer is not None and reviewer == paused:
            raise v.ValidationError("reviewer_agent_id", "must differ from paused_agent_id")
        sess = DialecticSession(
            session_id=v.ident("session_id", session_id), paused_agent_id=paused,
            phase="thesis", status="active", created_at=ts, updated_at=ts,
            reviewer_agent_id=reviewer,
            reason=v.opt_text("reason", reason, max_len=v.MAX_SHORT_TEXT),
            discovery_id=v.opt_ident("discovery_id", discovery_id),
            dispute_type=v.opt_text("dispute_type", dispute_type, max_len=v.MAX_TAG_LEN),
            session_type=v.opt_text("session_type", session_type, max_len=v.MAX_TAG_LEN),
            topic=v.opt_text("topic", topic, max_len=v.MAX_SHORT_TEXT),
            max_synthesis_rounds=v.opt_integer("max_synthesis_rounds", max_synthesis_rounds, 1, 100),
            paused_agent_state=v.json_doc("paused_agent_state", paused_agent_state),
        )
        return await self._create_dialectic_session(sess)

    async def get_dialectic_session(self, session_id: str) -> DialecticSession | None:
        """Return the session with its messages in order, or None."""
        return await self._get_dialectic_session(v.ident("session_id", session_id))

    async def assign_reviewer(self, session_id: str, reviewer_agent_id: str) -> DialecticSession:
        """Set the reviewer (an existing agent other than the paused one)."""
        return await self._assign_reviewer(
            v.ident("session_id", session_id), v.ident("reviewer_agent_id", reviewer_agent_id), v.now())

    async def add_dialectic_message(
        self, session_id: str, *, agent_id: str, message_type: str,
        root_cause: str | None = None, proposed_conditions: list[Any] | str | None = None,
        reasoning: str | None = None, observed_metrics: dict[str, Any] | str | None = None,
        concerns: list[Any] | str | None = None, agrees: bool | None = None,
        signature: str | None = None,
    ) -> DialecticMessage:
        """Add a thesis, antithesis or synthesis to an active session.

        A synthesis increments the session's synthesis round. Raises
        ConflictError when the session is no longer active.
        """
        msg = DialecticMessage(
            id=0, session_id=v.ident("session_id", session_id), agent_id=v.ident("agent_id", agent_id),
            message_type=v.choice("message_type", message_type, MESSAGE_TYPES), timestamp=v.now(),
            root_cause=v.opt_text("root_cause", root_cause),
            proposed_conditions=v.json_doc("proposed_conditions", proposed_conditions, kind=list),
            reasoning=v.opt_text("reasoning", reasoning),
            observed_metrics=v.json_doc("observed_metrics", observed_metrics),
            concerns=v.json_doc("concerns", concerns, kind=list),
            agrees=None if agrees is None else v.boolean("agrees", agrees),
            signature=v.opt_text("signature", signature, max_len=v.MAX_SHORT_TEXT),
        )
        return await self._add_dialectic_message(msg)

    async def set_dialectic_phase(self, session_id: str, phase: str) -> DialecticSession:
        """Move an active session to thesis, antithesis or synthesis.

        Closing phases come with :meth:`resolve_dialectic_session`.
        """
        return await self._set_dialectic_phase(
            v.ident("session_id", session_id), v.choice("phase", phase, DIALECTIC_PHASES[:3]), v.now())

    async def resolve_dialectic_session(self, session_id: str, *, resolution: dict[str, Any] | str,
                                        status: str = "resolved") -> DialecticSession:
        """Close an active session with a resolution; phase follows the status."""
        status = v.choice("status", status, DIALECTIC_STATUSES[1:])
        return await self._resolve_dialectic_session(
            v.ident("session_id", session_id), v.json_doc("resolution", resolution), status, v.now())

    async def get_active_dialectic_sessions(self, agent_id: str) -> list[DialecticSession]:
        """Return active sessions where the agent is paused or reviewer, oldest first (no messages)."""
        return await self._get_active_dialectic_sessions(v.ident("agent_id", agent_id))

    # -- primitives each backend implements -------------------------------

    @abstractmethod
    async def _create_identity(self, ident: Identity, api_key_hash: str) -> Identity: ...
    @abstractmethod
    async def _get_identity(self, agent_id: str) -> Identity | None: ...
    @abstractmethod
    async def _list_identities(self, status: str | None, tag: str | None, limit: int, offset: int) -> list[Identity]: ...
    @abstractmethod
    async def _update_identity_status(self, agent_id: str, status: str, reason: str | None, now: datetime) -> Identity: ...
    @abstractmethod
    async def _update_identity(self, agent_id: str, tags: tuple[str, ...] | None, notes: str | None,
                               metadata: dict[str, Any] | None, now: datetime) -> Identity: ...
    @abstractmethod
    async def _get_api_key_hash(self, agent_id: str) -> str | None: ...
    @abstractmethod
    async def _get_lineage(self, agent_id: str, max_depth: int) -> list[Identity]: ...
    @abstractmethod
    async def _list_children(self, agent_id: str) -> list[Identity]: ...
    @abstractmethod
    async def _create_session(self, sess: Session) -> Session: ...
    @abstractmethod
    async def _get_session(self, session_id: str) -> Session | None: ...
    @abstractmethod
    async def _touch_session(self, session_id: str, now: datetime, expires_at: datetime | None) -> Session: ...
    @abstractmethod
    async def _end_session(self, session_id: str, now: datetime) -> Session: ...
    @abstractmethod
    async def _get_active_sessions(self, agent_id: str, now: datetime) -> list[Session]: ...
    @abstractmethod
    async def _expire_sessions(self, now: datetime) -> int: ...
    @abstractmethod
    async def _record_agent_state(self, snap: AgentState) -> AgentState: ...
    @abstractmethod
    async def _get_latest_agent_state(self, agent_id: str) -> AgentState | None: ...
    @abstractmethod
    async def _get_agent_state_history(self, agent_id: str, limit: int, since: datetime | None) -> list[AgentState]: ...
    @abstractmethod
    async def _get_calibration(self) -> Calibration | None: ...
    @abstractmethod
    async def _update_calibration(self, state: dict[str, Any], expected_version: int | None, now: datetime) -> Calibration: ...
    @abstractmethod
    async def _append_audit_event(self, ev: AuditEvent) -> tuple[AuditEvent, bool]: ...
    @abstractmethod
    async def _query_audit_events(self, agent_id: str | None, event_type: str | None, since: datetime | None,
                                  until: datetime | None, limit: int) -> list[AuditEvent]: ...
    @abstractmethod
    async def _search_audit_events(self, words: tuple[str, ...], limit: int) -> list[AuditEvent]: ...
    @abstractmethod
    async def _record_tool_usage(self, use: ToolUsage) -> ToolUsage: ...
    @abstractmethod
    async def _query_tool_usage(self, agent_id: str | None, tool_name: str | None, since: datetime | None,
                                until: datetime | None, limit: int) -> list[ToolUsage]: ...
    @abstractmethod
    async def _get_tool_stats(self, agent_id: str | None, since: datetime | None) -> list[ToolStats]: ...
    @abstractmethod
    async def _add_discovery(self, disc: Discovery) -> Discovery: ...
    @abstractmethod
    async def _get_discovery(self, discovery_id: str) -> Discovery | None: ...
    @abstractmethod
    async def _update_discovery_status(self, discovery_id: str, status: str, now: datetime) -> Discovery: ...
    @abstractmethod
    async def _link_discoveries(self, link: DiscoveryLink) -> DiscoveryLink: ...
    @abstractmethod
    async def _search_discoveries(self, words: tuple[str, ...], tags: tuple[str, ...], type: str | None,
                                  status: str | None, agent_id: str | None, limit: int) -> list[Discovery]: ...
    @abstractmethod
    async def _get_neighbors(self, discovery_id: str, edge_type: str | None) -> list[Neighbor]: ...
    @abstractmethod
    async def _get_response_chain(self, discovery_id: str, max_depth: int) -> list[Discovery]: ...
    @abstractmethod
    async def _create_dialectic_session(self, sess: DialecticSession) -> DialecticSession: ...
    @abstractmethod
    async def _get_dialectic_session(self, session_id: str) -> DialecticSession | None: ...
    @abstractmethod
    async def _assign_reviewer(self, session_id: str, reviewer_agent_id: str, now: datetime) -> DialecticSession: ...
    @abstractmethod
    async def _add_dialectic_message(self, msg: DialecticMessage) -> DialecticMessage: ...
    @abstractmethod
    async def _set_dialectic_phase(self, session_id: str, phase: str, now: datetime) -> DialecticSession: ...
    @abstractmethod
    async def _resolve_dialectic_session(self, session_id: str, resolution: dict[str, Any], status: str,
                                         now: datetime) -> DialecticSession: ...
    @abstractmethod
    async def _get_active_dialectic_sessions(self, agent_id: str) -> list[DialecticSession]: ...


# The legacy state_json holds the EISV vector itself under these keys.
_STATE_KEYS = frozenset({"E", "I", "S", "V", "coherence", "regime"})


def _identity_metadata(value: Any) -> dict[str, Any]:
    doc = v.json_doc("metadata", value)
    if "notes" in doc:
        # The legacy layout keeps notes inside metadata_json under this key.
        raise v.ValidationError("metadata", "must not contain the key 'notes' (pass notes= instead)")
    return doc


def _uuid(field: str, value: str | None) -> str:
    if value is None:
        return str(uuid.uuid4())
    if not isinstance(value, str):
        raise v.ValidationError(field, f"is expected to be a UUID string, got {type(value).__name__}")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise v.ValidationError(field, f"is expected to be a UUID, got {value[:64]!r}") from None


def _words(field: str, query: Any) -> tuple[str, ...]:
    query = v.text(field, query, max_len=v.MAX_SHORT_TEXT, allow_empty=False)
    words = search_words(query)
    if not words:
        raise v.ValidationError(field, "has no words to search for")
    return words


def search_words(s: str) -> tuple[str, ...]:
    """Split text into distinct lower-case words (runs of letters, digits, _).

    Full-text search on every backend means: each query word equals one of
    these words of the searched text.
    """
    return tuple(dict.fromkeys(w.lower() for w in _WORD_RE.findall(s)))


_WORD_RE = re.compile(r"\w+")

#: Longest word (UTF-8 bytes) a word index holds as it is (a GIN entry must stay small).
MAX_INDEXED_WORD_BYTES = 200
_ASCII_WORDS = bytes(c if (chr(c).isalnum() and c < 128) or c == ord("_") else 32 for c in range(256)).lower()


def indexed_words(s: str) -> list[str]:
    """Return ``search_words(s)`` as PostgreSQL's ``words`` columns hold them (see :func:`indexed_word`)."""
    # search_words(s), spelt for speed: this runs for every row a backfill loads. In ASCII
    # text \w is [A-Za-z0-9_], so one byte translation (the rest to spaces, A-Z to a-z) and a
    # split find the same words, several times faster than the regular expression.
    if s.isascii():
        words = list(dict.fromkeys(s.encode("ascii").translate(_ASCII_WORDS).decode("ascii").split()))
        if len(s) <= MAX_INDEXED_WORD_BYTES:
            return words
    else:
        words = list(dict.fromkeys(map(str.lower, _WORD_RE.findall(s))))
    if max(map(len, words), default=0) <= MAX_INDEXED_WORD_BYTES // 4:
        return words
    return [indexed_word(w) for w in words]


def indexed_word(w: str) -> str:
    """Return a word as a word index holds it: itself, or ``'#'`` + its SHA-1 (hex) when
    its UTF-8 form is longer than :data:`MAX_INDEXED_WORD_BYTES`.

    Stored words and query words go through this same transform, so a row
    matches exactly when every transformed query word is among its words;
    ``#`` is never part of a word, so no word is taken for a digest.
    """
    data = w.encode("utf-8")
    return w if len(data) <= MAX_INDEXED_WORD_BYTES else "#" + hashlib.sha1(data).hexdigest()
