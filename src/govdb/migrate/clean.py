"""Cleaning legacy rows for PostgreSQL: the one module backfill, graph export
and verify share.

``Cleaner(source_tz).clean(table, row)`` turns a legacy row (a dict, as
``source.LegacySource`` reads it) into an :class:`Outcome`: the values of the
PostgreSQL columns (``TARGETS[table].columns``), the repairs made (column,
problem, original value as text), or a quarantine reason. Identities are
cleaned as a whole table (:meth:`Cleaner.clean_identities`): parents and
lineage cycles need every row. Orphan checks use a :class:`Context` (the keys
that exist in the target); :func:`build_context` makes one from the source.

The rule: a migrated row reads back through the PostgreSQL backend as the
SQLite backend (``govdb.legacy``) reads the source row, except where a repair
is recorded; nothing is lost, since every original a repair changed is
recorded, and a row that cannot be migrated is quarantined with its raw text.
JSON values are given as the JSON text sent to PostgreSQL; timestamps as
aware UTC datetimes.
"""

from __future__ import annotations

import math
from collections import Counter
from datetime import datetime, timezone, tzinfo
from typing import Any, Iterable

from .. import legacy
from ..backends.base import audit_hash
from ..backends.pgrows import audit_words, discovery_words
from ..convert import dump_json, parse_timestamp, read_float
from ..records import (
    DIALECTIC_PHASES, DIALECTIC_STATUSES, DISCOVERY_STATUSES, EDGE_TYPES, IDENTITY_STATUSES,
    MESSAGE_TYPES, REGIMES, RESPONSE_TYPES, SEVERITIES,
)
from ..validate import EISV_BOUNDS
from .columns import (  # the column cleaners (package-internal)
    _bool, _canonical, _checked_json, _dump, _eisv_value, _enum, _event_id, _float, _indexed, _int32, _json, _key,
    _load_json, _sanitize, _show, _str_list, _text, _uuid,
)
from .source import quote_ident
from .targets import _BAD_TEXT, _EPOCH_TEXT, _JSON_WALK, NO_KEY_HASH, Context, Outcome, Repair, Row, mask_key

UTC = timezone.utc
_CLOSING_PHASE = {"resolved": "resolved", "escalated": "escalated", "failed": "failed", "cancelled": "failed"}


# -- the cleaner ---------------------------------------------------------------

_MISSING = "missing"


def _keyed(table: str, r: Row, *columns: str) -> Outcome:
    """Return the row's Outcome keyed by ``columns``, quarantined ("bad-key") when one of them
    holds no usable key (the first such column is named)."""
    key = tuple(r.get(c) for c in columns)
    out = Outcome(table, r, key, None, [])
    for col, v in zip(columns, key):
        bad = _key(v)
        if bad:
            return out.quarantine(f"{col} {bad}", "bad-key")
    return out


class Cleaner:
    """Turn legacy rows into PostgreSQL rows; naive timestamps are read in ``source_tz``."""

    def __init__(self, source_tz: tzinfo = UTC, context: Context | None = None):
        self.tz = source_tz
        self.context = context or Context()
        #: Conversions that change no information (not repairs), counted for reports.
        self.notes: Counter[str] = Counter()
        self._by_table = {
            "agent_metadata": self._identity, "session_identities": self._session,
            "agent_state": self._agent_state, "calibration_state": self._calibration,
            "audit_events": self._audit, "tool_usage": self._tool_usage, "discoveries": self._discovery,
            "discovery_tags": self._tag, "discovery_edges": self._edge,
            "dialectic_sessions": self._dialectic_session, "dialectic_messages": self._message,
        }

    def clean(self, table: str, row: Row) -> Outcome:
        """Clean one row. For agent_metadata prefer :meth:`clean_identities` (cycles need the table)."""
        out = self._by_table[table](row)
        if table == "agent_metadata" and out.ok:
            self._resolve_parents([out], self.context.agents)
            out.values = tuple(out.values)  # type: ignore[arg-type]
        return out

    def clean_many(self, table: str, rows: Iterable[Row]) -> list[Outcome]:
        fn = self._by_table[table]
        return [fn(r) for r in rows]

    # -- timestamps ---------------------------------------------------------

    def timestamp(self, v: Any) -> tuple[datetime | None, str | None]:
        """Return (aware UTC datetime, None), or (None, why) when missing or unreadable."""
        if type(v) is str and len(v) == 32 and v[10] == "T" and v[26:] == "+00:00":
            try:
                return datetime.fromisoformat(v), None
            except ValueError:
                pass
        if v is None or (isinstance(v, (str, bytes)) and not v.strip()):
            return None, _MISSING
        try:
            dt = parse_timestamp(v, naive_tz=self.tz)
        except ValueError as exc:
            return None, str(exc)
        if isinstance(v, str):
            tail = v.strip()[10:].upper()
            if _EPOCH_TEXT.fullmatch(v.strip()):
                self.notes["timestamps given as epoch seconds"] += 1
            elif not (tail.endswith("Z") or "+" in tail or "-" in tail or "UTC" in tail or "GMT" in tail):
                self.notes[f"naive timestamps read in {self.tz}"] += 1
        return dt, None

    def _required_ts(self, col: str, r: Row, rep: list[Repair],
                     fallbacks: tuple[str, ...] = ()) -> tuple[datetime | None, str | None]:
        """Return (timestamp, None) using the first readable fallback column, or (None, quarantine reason)."""
        v = r.get(col)
        dt, why = self.timestamp(v)
        if dt is not None:
            return dt, None
        what = "missing" if why == _MISSING else f"unreadable ({why})"
        for fb in fallbacks:
            alt, _ = self.timestamp(r.get(fb))
            if alt is not None:
                rep.append(Repair(col, "bad-timestamp", f"{col} is {what}; {fb} of the row stored instead", v))
                return alt, None
        also = f" and no other timestamp of the row ({', '.join(fallbacks)}) is readable" if fallbacks else ""
        return None, f"{col} is {what}{also}"

    def _optional_ts(self, col: str, v: Any, rep: list[Repair], *, missing: datetime | None = None,
                     garbage: datetime | None = None, garbage_name: str = "NULL") -> datetime | None:
        """Return the timestamp; ``missing`` for NULL or blank (as the SQLite backend reads
        them), ``garbage`` for unreadable text (recorded)."""
        dt, why = self.timestamp(v)
        if dt is not None:
            return dt
        if why == _MISSING:
            return missing
        rep.append(Repair(col, "bad-timestamp", f"{col} is unreadable ({why}); {garbage_name} stored", v))
        return garbage

    # -- orphans ------------------------------------------------------------

    def _missing(self, kind: str, known: Any, value: str) -> str | None:
        """Return why ``value`` names nothing, or None when it exists (or is not checked)."""
        if known is None or value in known:
            return None
        if value in self.context.quarantined.get(kind, ()):
            return f"{kind} {value!r} is quarantined"
        return f"{kind} {value!r} does not exist"

    def _reference(self, col: str, value: Any, kind: str, known: Any) -> str | None:
        """Return why ``value`` in ``col`` is no usable key of an existing ``kind``, or None."""
        bad = _key(value)
        return f"{col} {bad}" if bad else self._missing(kind, known, value)

    # -- tables -------------------------------------------------------------

    def _identity(self, r: Row) -> Outcome:
        out = _keyed("agent_metadata", r, "agent_id")
        if not out.ok:
            return out
        rep, (agent_id,) = out.repairs, out.key
        raw_key = r.get("api_key")
        if raw_key is None:
            key_hash = NO_KEY_HASH
            rep.append(Repair("api_key", "missing-key", "api_key is NULL; stored a hash no key matches", None))
        else:
            key_hash = mask_key(raw_key) if isinstance(raw_key, (str, bytes)) else mask_key(str(raw_key))
            if key_hash != raw_key:
                self.notes["raw API keys stored as their sha256 hash"] += 1
        status = r.get("status")
        if not status:
            status = "active"  # as the SQLite backend reads it
        elif status not in IDENTITY_STATUSES:
            fixed = _canonical(status, IDENTITY_STATUSES)
            if fixed:
                rep.append(Repair("status", "case-variant", f"status {status!r} stored as {fixed!r}", status))
                status = fixed
            else:
                rep.append(Repair("status", "unknown-value", f"status {_show(status)} is not a known status;"
                                  " stored 'paused' (an agent in an unknown state must not act until reviewed)",
                                  status))
                status = "paused"
        created, why = self._required_ts("created_at", r, rep, ("updated_at", "disabled_at"))
        if created is None:
            return out.quarantine(why or "", "bad-timestamp")
        updated = self._optional_ts("updated_at", r.get("updated_at"), rep, missing=created, garbage=created,
                                    garbage_name="created_at")
        parent = r.get("parent_agent_id")
        if parent is not None and _key(parent):
            rep.append(Repair("parent_agent_id", "bad-reference",
                              f"parent_agent_id {_key(parent)}; stored NULL", parent))
            parent = None
        meta, meta_text = _json("metadata_json", r.get("metadata_json"), rep)
        if "notes" in meta:
            meta, notes = legacy.split_notes(dict(meta))
            if notes is None:
                rep.append(Repair("metadata_json", "notes-not-text",
                                  "metadata_json.notes is not text; dropped (the SQLite backend ignores it)",
                                  r.get("metadata_json")))
            meta_text = None
        else:
            notes = None
        tags, _ = _str_list("tags_json", r.get("tags_json"), rep)
        events, events_text = _json("lifecycle_events_json", r.get("lifecycle_events_json"), rep, list)
        if any(type(e) is not dict for e in events):
            events = [e for e in events if type(e) is dict]
            events_text = None
            rep.append(Repair("lifecycle_events_json", "non-object-items",
                              "lifecycle_events_json: items that are not objects dropped",
                              r.get("lifecycle_events_json")))
        out.values = [
            agent_id, key_hash, status, created, updated, parent, _text("spawn_reason", r.get("spawn_reason"), rep),
            self._optional_ts("disabled_at", r.get("disabled_at"), rep),
            [_text("tags_json", t, rep) for t in tags], notes,
            meta_text if meta_text is not None else _dump(meta),
            events_text if events_text is not None else _dump(events),
        ]
        return out

    def clean_identities(self, rows: Iterable[Row], *, existing_agents: Iterable[str] = ()) -> list[Outcome]:
        """Clean the whole agent_metadata table, in load order (parents before children).

        A parent naming no agent (in the source or in ``existing_agents``)
        becomes NULL, recorded. A lineage cycle is broken at its oldest member
        (smallest created_at, then agent_id): no agent can have been spawned by
        a younger one, so that link is the false one; its parent becomes NULL,
        recorded. ``Outcome.order`` is (depth in the lineage, agent_id);
        quarantined rows come first.
        """
        outs = [self._identity(r) for r in rows]
        ok = [o for o in outs if o.ok]
        known = {o.key[0] for o in ok} | set(existing_agents)
        self.context.quarantined.setdefault("agent", set()).update(
            o.key[0] for o in outs if not o.ok and isinstance(o.key[0], str))
        self._resolve_parents(ok, known)
        by_id = {o.key[0]: o for o in ok}
        self._break_cycles(by_id)
        depth: dict[str, int] = {}
        for agent in by_id:
            chain = []
            a: str | None = agent
            while a is not None and a in by_id and a not in depth:
                chain.append(a)
                a = by_id[a].values[5]  # type: ignore[index]
            d = depth[a] + 1 if a is not None and a in depth else 0
            for x in reversed(chain):
                depth[x] = d
                d += 1
        for o in outs:
            o.values = tuple(o.values) if o.values is not None else None
            o.order = (depth[o.key[0]], o.key[0]) if o.ok else (-1, o.key_text)
        outs.sort(key=lambda o: o.order)
        return outs

    def _resolve_parents(self, outs: list[Outcome], known: Any) -> None:
        for o in outs:
            values = o.values
            parent = values[5]  # type: ignore[index]
            if parent is None:
                continue
            if parent == o.key[0]:
                why, kind = "the agent is its own parent (a lineage cycle)", "lineage-cycle"
            else:
                why, kind = self._missing("agent", known, parent), "orphan-parent"
                if why is None:
                    continue
            o.repairs.append(Repair("parent_agent_id", kind, f"parent_agent_id: {why}; stored NULL", parent))
            if isinstance(values, tuple):
                values = o.values = list(values)
            values[5] = None  # type: ignore[index]

    def _break_cycles(self, by_id: dict[str, Outcome]) -> None:
        state: dict[str, int] = {}  # 1 on the current walk, 2 finished
        for start in sorted(by_id):
            path: list[str] = []
            a: str | None = start
            while a is not None and a in by_id and a not in state:
                state[a] = 1
                path.append(a)
                a = by_id[a].values[5]  # type: ignore[index]
            if a is not None and state.get(a) == 1:
                cycle = path[path.index(a):]
                oldest = min(cycle, key=lambda x: (by_id[x].values[3], x))  # type: ignore[index]
                o = by_id[oldest]
                parent = o.values[5]  # type: ignore[index]
                o.repairs.append(Repair(
                    "parent_agent_id", "lineage-cycle",
                    f"lineage cycle {' -> '.join(map(repr, cycle + [a]))}; broken at its oldest member,"
                    " whose parent is stored NULL", parent))
                o.values[5] = None  # type: ignore[index]
            for x in path:
                state[x] = 2

    def _session(self, r: Row) -> Outcome:
        out = _keyed("session_identities", r, "session_id")
        if not out.ok:
            return out
        rep, (sid,) = out.repairs, out.key
        agent = r.get("agent_id")
        why = self._reference("agent_id", agent, "agent", self.context.agents)
        if why:
            return out.quarantine(why, "orphan")
        created, why = self._required_ts("created_at", r, rep, ("last_active",))
        if created is None:
            return out.quarantine(why or "", "bad-timestamp")
        last = self._optional_ts("last_active", r.get("last_active"), rep, missing=created, garbage=created,
                                 garbage_name="created_at")
        expires, why = self.timestamp(r.get("expires_at"))
        if expires is None:
            expires = last
            rep.append(Repair("expires_at", "bad-timestamp",
                              f"expires_at is {'missing' if why == _MISSING else f'unreadable ({why})'};"
                              " last_active stored (the session counts as expired)", r.get("expires_at")))
        _, info = _json("client_info_json", r.get("client_info_json"), rep)
        _, meta = _json("metadata_json", r.get("metadata_json"), rep)
        out.values = (sid, agent, created, last, expires, _bool("is_active", r.get("is_active"), rep, True),
                      _text("client_type", r.get("client_type"), rep), info, meta)
        return out

    def _agent_state(self, r: Row) -> Outcome:
        rep: list[Repair] = []
        out = Outcome("agent_state", r, (r.get("id"),), None, rep)
        agent = r.get("agent_id")
        why = self._reference("agent_id", agent, "agent", self.context.agents)
        if why:
            return out.quarantine(why, "orphan")
        recorded, why = self._required_ts("recorded_at", r, rep)
        if recorded is None:
            return out.quarantine(why or "", "bad-timestamp")
        raw_doc = r.get("state_json")
        doc: dict[str, Any] = {}
        text = ""
        if raw_doc is not None:
            value, text, problem = _load_json("state_json", raw_doc, rep, dict)
            if problem is not None:
                rep.append(Repair("state_json", problem[0], problem[1], raw_doc))
            else:
                doc = value
        eisv: dict[str, float | None] = {}
        for (col, key), name in zip(legacy.STATE_COLUMNS, ("integrity", "entropy", "void", "coherence")):
            got, why = _eisv_value(name, col, key, r.get(col), doc, rep)
            if why:
                return out.quarantine(why, "bad-value")
            eisv[name] = got
        energy = doc.get("E")
        if energy is not None:
            if isinstance(energy, (int, float)) and not isinstance(energy, bool):
                lo, hi = EISV_BOUNDS["energy"]
                if not (math.isfinite(energy) and lo <= energy <= hi):
                    return out.quarantine(f"energy (state_json.E) is {energy!r}, outside [{lo}, {hi}]", "bad-value")
                energy = float(energy)
            else:
                rep.append(Repair("state_json", "not-finite",
                                  f"state_json.E is {_show(energy)}, not a number; energy stored NULL", raw_doc))
                energy = None
        regime = r.get("regime") or doc.get("regime")
        if not isinstance(regime, str):
            regime = "nominal"  # as the SQLite backend reads it
        elif regime not in REGIMES:
            fixed = _canonical(regime, REGIMES)
            from_doc = doc.get("regime") if doc.get("regime") in REGIMES else None
            if fixed:
                rep.append(Repair("regime", "case-variant", f"regime {regime!r} stored as {fixed!r}", regime))
                regime = fixed
            elif from_doc and from_doc != regime:
                rep.append(Repair("regime", "unknown-value",
                                  f"regime {_show(regime)} is not a known regime; state_json.regime stored", regime))
                regime = from_doc
            else:
                return out.quarantine(f"regime {_show(regime)} is not a known regime and state_json has none",
                                      "unknown-value")
        snapshot = {k: v for k, v in doc.items() if k not in legacy.STATE_KEYS}
        if snapshot and _JSON_WALK.search(text):
            problems: set[str] = set()
            snapshot = _sanitize(snapshot, problems)
            if problems:
                rep.append(Repair("state_json", "json-repaired", f"state_json: {'; '.join(sorted(problems))}",
                                  raw_doc))
        out.values = (r.get("id"), agent, recorded, energy, eisv["integrity"], eisv["entropy"], eisv["void"],
                      eisv["coherence"], regime, _dump(snapshot))
        return out

    def _calibration(self, r: Row) -> Outcome:
        rep: list[Repair] = []
        out = Outcome("calibration_state", r, (r.get("id"),), None, rep)
        updated, why = self._required_ts("updated_at", r, rep)
        if updated is None:
            return out.quarantine(why or "", "bad-timestamp")
        _, state = _json("state_json", r.get("state_json"), rep)
        raw_version = r.get("version")
        version = _int32("version", raw_version, rep, 1)
        if version is None or version < 1:
            rep.append(Repair("version", "out-of-range", f"version {version} is below 1; stored 1", raw_version))
            version = 1
        out.values = (1, state, version, updated)
        return out

    def _audit(self, r: Row) -> Outcome:
        rep: list[Repair] = []
        rowid = r.get("id")
        out = Outcome("audit_events", r, (rowid,), None, rep)
        ctx = self.context
        first = ctx.audit_duplicate_of.get(rowid)
        if first is not None:
            return out.quarantine(f"same content (raw_hash) as audit event id {first}, which is kept",
                                  "duplicate")
        ts, why = self._required_ts("timestamp", r, rep)
        if ts is None:
            return out.quarantine(why or "", "bad-timestamp")
        event_id = _event_id("audit_events", "event_id", r.get("event_id"), rowid, ctx.event_id_owner, rep)
        agent, why = _indexed("agent_id", r.get("agent_id"), rep)
        event_type, why2 = _indexed("event_type", r.get("event_type") or "", rep)
        if why or why2:
            return out.quarantine(f"agent_id {why}" if why else f"event_type {why2}", "too-long")
        session = _text("session_id", r.get("session_id"), rep)
        confidence = r.get("confidence")
        if type(confidence) is not float or not math.isfinite(confidence):
            conf = read_float(confidence)
            if conf is None:
                if confidence is not None:
                    rep.append(Repair("confidence", "not-finite",
                                      f"confidence is {_show(confidence)}; stored 1.0 (as the SQLite backend reads it)",
                                      confidence))
                conf = 1.0
            confidence = conf
        raw_details, repairs_before = r.get("details_json"), len(rep)
        details, details_text = _json("details_json", raw_details, rep)
        if type(raw_details) is str and len(rep) == repairs_before:
            # The text the SQLite backend searches: the stored JSON, re-written when it has \u escapes.
            searched = raw_details if "\\u" not in raw_details else dump_json(details)
        else:
            searched = dump_json(details)  # repaired: what the row holds now
        raw_hash = r.get("raw_hash")
        if not raw_hash:
            raw_hash = audit_hash(ts, event_type, agent, session, details)
            rep.append(Repair("raw_hash", "missing-hash", "raw_hash is missing; stored base.audit_hash of the row",
                              r.get("raw_hash")))
        else:
            raw_hash, why = _indexed("raw_hash", raw_hash, rep)
            if why:
                return out.quarantine(f"raw_hash {why}", "too-long")
        out.values = (rowid, event_id, ts, agent, session, event_type, confidence, details_text, raw_hash,
                      audit_words(event_type, searched))
        return out

    def _tool_usage(self, r: Row) -> Outcome:
        rep: list[Repair] = []
        rowid = r.get("id")
        out = Outcome("tool_usage", r, (rowid,), None, rep)
        ts, why = self._required_ts("timestamp", r, rep)
        if ts is None:
            return out.quarantine(why or "", "bad-timestamp")
        usage_id = _event_id("tool_usage", "usage_id", r.get("usage_id"), rowid, self.context.usage_id_owner, rep)
        agent, why = _indexed("agent_id", r.get("agent_id"), rep)
        tool, why2 = _indexed("tool_name", r.get("tool_name") or "", rep)
        if why or why2:
            return out.quarantine(f"agent_id {why}" if why else f"tool_name {why2}", "too-long")
        _, payload = _json("payload_json", r.get("payload_json"), rep)
        out.values = (rowid, usage_id, ts, agent, _text("session_id", r.get("session_id"), rep), tool,
                      _int32("latency_ms", r.get("latency_ms"), rep), _bool("success", r.get("success"), rep, True),
                      _text("error_type", r.get("error_type"), rep), payload)
        return out

    def _discovery(self, r: Row) -> Outcome:
        out = _keyed("discoveries", r, "id")
        if not out.ok:
            return out
        rep, (did,) = out.repairs, out.key
        agent = r.get("agent_id")
        why = self._reference("agent_id", agent, "agent", self.context.agents)
        if why:
            return out.quarantine(why, "orphan")
        dtype, why = _indexed("type", r.get("type") or "", rep)
        if why:
            return out.quarantine(f"type {why}", "too-long")
        created, why = self._required_ts("created_at", r, rep, ("updated_at", "resolved_at"))
        if created is None:
            return out.quarantine(why or "", "bad-timestamp")
        status = _enum("status", r.get("status"), DISCOVERY_STATUSES, "open", "open", rep)
        severity = r.get("severity")
        if severity is not None and severity not in SEVERITIES:
            severity = _enum("severity", severity, SEVERITIES, None, None, rep, blank_is_missing=False)
        files, files_text = _str_list("related_files", r.get("related_files"), rep)
        if files_text is None or any(_BAD_TEXT.search(f) for f in files):
            files_text = _dump([_text("related_files", f, rep) for f in files])
        embedding = r.get("embedding")
        if embedding is not None and not isinstance(embedding, bytes):
            rep.append(Repair("embedding", "not-blob", "embedding is not a BLOB; its UTF-8 bytes stored", embedding))
            embedding = str(embedding).encode("utf-8", "surrogateescape")
        updated = self._optional_ts("updated_at", r.get("updated_at"), rep, garbage=created,
                                    garbage_name="created_at")
        resolved = self._optional_ts("resolved_at", r.get("resolved_at"), rep)
        summary, details = _text("summary", r.get("summary") or "", rep), _text("details", r.get("details"), rep)
        out.values = (did, agent, dtype, severity, status, created, updated, resolved, summary, details,
                      files_text, _float("confidence", r.get("confidence"), rep), embedding,
                      discovery_words(summary, details))
        return out

    def _tag(self, r: Row) -> Outcome:
        out = _keyed("discovery_tags", r, "discovery_id", "tag")
        if not out.ok:
            return out
        did, tag = out.key
        why = self._missing("discovery", self.context.discoveries, did)
        if why:
            return out.quarantine(why, "orphan")
        out.values = (did, tag)
        return out

    def _edge(self, r: Row) -> Outcome:
        out = _keyed("discovery_edges", r, "src_id", "dst_id", "edge_type")
        if not out.ok:
            return out
        rep, (src, dst, etype) = out.repairs, out.key
        if etype not in EDGE_TYPES:
            return out.quarantine(f"edge_type {_show(etype)} is not one of {', '.join(EDGE_TYPES)}", "unknown-value")
        for v in (src, dst):
            why = self._missing("discovery", self.context.discoveries, v)
            if why:
                return out.quarantine(why, "orphan")
        created, why = self._required_ts("created_at", r, rep)
        if created is None:
            return out.quarantine(why or "", "bad-timestamp")
        response = r.get("response_type")
        if response is not None and response not in RESPONSE_TYPES:
            response = _enum("response_type", response, RESPONSE_TYPES, None, None, rep, blank_is_missing=False)
        _, meta = _json("metadata", r.get("metadata"), rep)
        out.values = (src, dst, etype, response, _float("weight", r.get("weight"), rep), created,
                      _text("created_by", r.get("created_by"), rep), meta)
        return out

    def _dialectic_session(self, r: Row) -> Outcome:
        out = _keyed("dialectic_sessions", r, "session_id")
        if not out.ok:
            return out
        rep, (sid,) = out.repairs, out.key
        paused = r.get("paused_agent_id")
        why = self._reference("paused_agent_id", paused, "agent", self.context.agents)
        if why:
            return out.quarantine(f"paused agent: {why}", "orphan")
        reviewer = self._optional_ref("reviewer_agent_id", r.get("reviewer_agent_id"), "agent",
                                      self.context.agents, rep)
        discovery = self._optional_ref("discovery_id", r.get("discovery_id"), "discovery",
                                       self.context.discoveries, rep)
        created, why = self._required_ts("created_at", r, rep, ("updated_at",))
        if created is None:
            return out.quarantine(why or "", "bad-timestamp")
        status = r.get("status") or "active"
        if status not in DIALECTIC_STATUSES:
            status = _enum("status", status, DIALECTIC_STATUSES, "active", "failed", rep,
                           "an unknown state is treated as closed, so the session cannot go on unreviewed")
        phase = r.get("phase") or "thesis"
        if phase not in DIALECTIC_PHASES:
            implied = _CLOSING_PHASE.get(status, "thesis")
            phase = _enum("phase", phase, DIALECTIC_PHASES, "thesis", implied, rep, "the phase its status implies")
        resolution_raw = r.get("resolution_json")
        resolution_text = None
        if resolution_raw is not None:
            value, text, problem = _load_json("resolution_json", resolution_raw, rep, dict)
            if problem is not None and problem[0] != "json-null":
                rep.append(Repair("resolution_json", problem[0], problem[1].replace("stored {}", "stored NULL"),
                                  resolution_raw))
            elif problem is None:
                _, resolution_text = _checked_json("resolution_json", resolution_raw, value, text, rep)
        _, paused_state = _json("paused_agent_state_json", r.get("paused_agent_state_json"), rep)
        out.values = (sid, paused, reviewer, phase, status, created,
                      self._optional_ts("updated_at", r.get("updated_at"), rep, missing=created, garbage=created,
                                        garbage_name="created_at"),
                      _text("reason", r.get("reason"), rep), discovery,
                      _text("dispute_type", r.get("dispute_type"), rep),
                      _text("session_type", r.get("session_type"), rep), _text("topic", r.get("topic"), rep),
                      _int32("max_synthesis_rounds", r.get("max_synthesis_rounds"), rep),
                      _int32("synthesis_round", r.get("synthesis_round"), rep, 0),
                      paused_state, resolution_text)
        return out

    def _optional_ref(self, col: str, v: Any, kind: str, known: Any, rep: list[Repair]) -> str | None:
        if v is None:
            return None
        why = self._reference(col, v, kind, known)
        if why:
            rep.append(Repair(col, "orphan-reference", f"{why}; stored NULL", v))
            return None
        return v

    def _message(self, r: Row) -> Outcome:
        rep: list[Repair] = []
        out = Outcome("dialectic_messages", r, (r.get("id"),), None, rep)
        sid, agent = r.get("session_id"), r.get("agent_id")
        why = (self._reference("session_id", sid, "dialectic session", self.context.dialectic_sessions)
               or self._reference("agent_id", agent, "agent", self.context.agents))
        if why:
            return out.quarantine(why, "orphan")
        mtype = r.get("message_type")
        if mtype not in MESSAGE_TYPES:
            fixed = _canonical(mtype, MESSAGE_TYPES)
            if not fixed:
                return out.quarantine(f"message_type {_show(mtype)} is not one of {', '.join(MESSAGE_TYPES)}",
                                      "unknown-value")
            rep.append(Repair("message_type", "case-variant", f"message_type {mtype!r} stored as {fixed!r}", mtype))
            mtype = fixed
        ts, why = self._required_ts("timestamp", r, rep)
        if ts is None:
            return out.quarantine(why or "", "bad-timestamp")
        _, conditions = _json("proposed_conditions_json", r.get("proposed_conditions_json"), rep, list)
        _, metrics = _json("observed_metrics_json", r.get("observed_metrics_json"), rep)
        _, concerns = _json("concerns_json", r.get("concerns_json"), rep, list)
        out.values = (r.get("id"), sid, agent, mtype, ts, _text("root_cause", r.get("root_cause"), rep), conditions,
                      _text("reasoning", r.get("reasoning"), rep), metrics, concerns,
                      _bool("agrees", r.get("agrees"), rep, None), _text("signature", r.get("signature"), rep))
        return out


# -- context from the source -------------------------------------------------

def build_context(source: Any, cleaner: Cleaner, *, existing: Context | None = None) -> Context:
    """Return the keys of the parent rows that migrate (identities, discoveries,
    dialectic sessions) from one snapshot of ``source``, united with ``existing``
    (e.g. keys already in PostgreSQL), plus the duplicate-id maps.

    Sets ``cleaner.context`` as it goes (discoveries need the agents).
    """
    existing = existing or Context()
    ctx = cleaner.context
    with source.snapshot():
        outs = cleaner.clean_identities(source.rows("agent_metadata"), existing_agents=existing.agents or ())
        ctx.agents = {o.key[0] for o in outs if o.ok} | set(existing.agents or ())
        ctx.discoveries = _migrating(source, cleaner, "discoveries", "discovery") | set(existing.discoveries or ())
        ctx.dialectic_sessions = (_migrating(source, cleaner, "dialectic_sessions", "dialectic session")
                                  | set(existing.dialectic_sessions or ()))
        prescan_duplicates(source, cleaner)
    return ctx


def _migrating(source: Any, cleaner: Cleaner, table: str, kind: str) -> set[str]:
    ok: set[str] = set()
    bad = cleaner.context.quarantined.setdefault(kind, set())
    for batch in source.batches(table, None, 10_000):
        for o in cleaner.clean_many(table, batch):
            (ok if o.ok else bad).add(o.key[0])
    return ok


def prescan_duplicates(source: Any, cleaner: Cleaner, tables: Iterable[str] = ("audit_events", "tool_usage")) -> None:
    """Fill the cleaner's duplicate maps from ``source`` (call inside the table's snapshot).

    An event_id or usage_id used by several rows stays with the lowest row id;
    the others get legacy_uuid (a repair). Audit rows whose raw_hash is missing
    get base.audit_hash; one whose hash equals an earlier row's is a duplicate
    (quarantined: the audit trail stores identical events once).
    """
    ctx = cleaner.context
    tables = set(tables) & set(source.tables)
    for table, col, owners in (("audit_events", "event_id", ctx.event_id_owner),
                               ("tool_usage", "usage_id", ctx.usage_id_owner)):
        if table not in tables:
            continue
        # Case and spacing variants are the same UUID: group them together.
        c, t = quote_ident(col), quote_ident(table)
        rows = source.execute(
            f"SELECT {c}, id FROM {t} WHERE lower(trim({c})) IN (SELECT lower(trim({c})) FROM {t}"
            f" WHERE {c} IS NOT NULL GROUP BY 1 HAVING count(*) > 1) ORDER BY id")
        for value, rowid in rows:
            norm = _uuid(value)
            if norm is not None:
                owners.setdefault(norm, rowid)
    if "audit_events" not in tables:
        return
    hashes: dict[str, int] = {}
    missing = source.execute("SELECT rowid AS _rowid, * FROM audit_events WHERE raw_hash IS NULL OR raw_hash = ''"
                             " ORDER BY id")
    if not missing:
        return
    cols = ["_rowid", *source.columns["audit_events"]]
    found, ctx.audit_duplicate_of = ctx.audit_duplicate_of, {}
    notes = cleaner.notes.copy()
    try:
        for values in missing:
            out = cleaner.clean("audit_events", dict(zip(cols, values)))
            if not out.ok:
                continue
            h, rowid = out.value("raw_hash"), out.key[0]
            stored = source.execute("SELECT id FROM audit_events WHERE raw_hash = CAST(? AS TEXT)",
                                    (h.encode("utf-8", "surrogateescape"),))
            first = min([rowid, hashes.get(h, rowid), *(s[0] for s in stored)])
            hashes[h] = first
            if first != rowid:
                found[rowid] = first
            for s in stored:
                if s[0] != first:
                    found[s[0]] = first
    finally:
        ctx.audit_duplicate_of = found
        cleaner.notes = notes

