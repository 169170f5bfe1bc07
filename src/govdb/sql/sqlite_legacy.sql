-- The legacy governance.db layout, as in the spec's legacy-governance-db.md.
-- Run on every connect: a new file gets the whole layout, an existing file
-- only what it lacks. Types are SQLite's: timestamps and JSON are TEXT,
-- booleans INTEGER. Foreign keys stay off, as in the legacy server.

CREATE TABLE IF NOT EXISTS agent_metadata (
    agent_id TEXT PRIMARY KEY,
    api_key TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT,
    status TEXT DEFAULT 'active',
    parent_agent_id TEXT,
    spawn_reason TEXT,
    disabled_at TEXT,
    tags_json TEXT DEFAULT '[]',
    lifecycle_events_json TEXT DEFAULT '[]',
    metadata_json TEXT DEFAULT '{}'
);

CREATE TABLE IF NOT EXISTS session_identities (
    session_id TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    last_active TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    is_active INTEGER DEFAULT 1,
    client_type TEXT,
    client_info_json TEXT,
    metadata_json TEXT
);

CREATE TABLE IF NOT EXISTS agent_state (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    agent_id TEXT NOT NULL,
    recorded_at TEXT NOT NULL,
    entropy REAL,
    integrity REAL,
    stability_index REAL,
    volatility REAL,
    regime TEXT DEFAULT 'nominal',
    coherence REAL,
    state_json TEXT
);

CREATE TABLE IF NOT EXISTS audit_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    timestamp TEXT NOT NULL,
    event_id TEXT,
    agent_id TEXT,
    session_id TEXT,
    event_type TEXT NOT NULL,
    confidence REAL DEFAULT 1.0,
    details_json TEXT NOT NULL,
    raw_hash TEXT UNIQUE
);

CREATE TABLE IF NOT EXISTS tool_usage (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    timestamp TEXT NOT NULL,
    usage_id TEXT,
    agent_id TEXT,
    session_id TEXT,
    tool_name TEXT NOT NULL,
    latency_ms INTEGER,
    success INTEGER DEFAULT 1,
    error_type TEXT,
    payload_json TEXT
);

CREATE TABLE IF NOT EXISTS calibration_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    updated_at TEXT NOT NULL,
    version INTEGER,
    state_json TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS discoveries (
    id TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL,
    type TEXT NOT NULL,
    severity TEXT,
    status TEXT DEFAULT 'open',
    created_at TEXT NOT NULL,
    updated_at TEXT,
    resolved_at TEXT,
    summary TEXT NOT NULL,
    details TEXT,
    related_files TEXT,
    confidence REAL,
    embedding BLOB
);

CREATE TABLE IF NOT EXISTS discovery_tags (
    discovery_id TEXT NOT NULL,
    tag TEXT NOT NULL,
    PRIMARY KEY (discovery_id, tag)
);

CREATE TABLE IF NOT EXISTS discovery_edges (
    src_id TEXT NOT NULL,
    dst_id TEXT NOT NULL,
    edge_type TEXT NOT NULL,
    response_type TEXT,
    weight REAL,
    created_at TEXT NOT NULL,
    created_by TEXT,
    metadata TEXT,
    PRIMARY KEY (src_id, dst_id, edge_type)
);

CREATE TABLE IF NOT EXISTS rate_limits (
    agent_id TEXT NOT NULL,
    timestamp TEXT NOT NULL,
    PRIMARY KEY (agent_id, timestamp)
);

CREATE TABLE IF NOT EXISTS dialectic_sessions (
    session_id TEXT PRIMARY KEY,
    paused_agent_id TEXT NOT NULL,
    reviewer_agent_id TEXT,
    phase TEXT DEFAULT 'thesis',
    status TEXT DEFAULT 'active',
    created_at TEXT NOT NULL,
    updated_at TEXT,
    reason TEXT,
    discovery_id TEXT,
    dispute_type TEXT,
    session_type TEXT,
    topic TEXT,
    max_synthesis_rounds INTEGER,
    synthesis_round INTEGER DEFAULT 0,
    paused_agent_state_json TEXT,
    resolution_json TEXT
);

CREATE TABLE IF NOT EXISTS dialectic_messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    message_type TEXT,
    timestamp TEXT NOT NULL,
    root_cause TEXT,
    proposed_conditions_json TEXT,
    reasoning TEXT,
    observed_metrics_json TEXT,
    concerns_json TEXT,
    agrees INTEGER,
    signature TEXT
);

-- Lookups the backend makes by key. Plain (non-unique) indexes only: old
-- files may hold duplicates a unique index would refuse, and no index names
-- a govdb SQL function, so other tools can still write to the file. Time
-- order is computed through govdb_ts() (legacy rows hold several formats),
-- so an index on a bare timestamp column would not be used.
CREATE INDEX IF NOT EXISTS idx_agent_metadata_parent ON agent_metadata (parent_agent_id);
CREATE INDEX IF NOT EXISTS idx_session_identities_agent ON session_identities (agent_id);
CREATE INDEX IF NOT EXISTS idx_agent_state_agent_time ON agent_state (agent_id, recorded_at);
CREATE INDEX IF NOT EXISTS idx_audit_events_agent_time ON audit_events (agent_id, timestamp);
CREATE INDEX IF NOT EXISTS idx_audit_events_type_time ON audit_events (event_type, timestamp);
CREATE INDEX IF NOT EXISTS idx_audit_events_event_id ON audit_events (event_id);
CREATE INDEX IF NOT EXISTS idx_tool_usage_agent_time ON tool_usage (agent_id, timestamp);
CREATE INDEX IF NOT EXISTS idx_tool_usage_tool_time ON tool_usage (tool_name, timestamp);
CREATE INDEX IF NOT EXISTS idx_tool_usage_usage_id ON tool_usage (usage_id);
CREATE INDEX IF NOT EXISTS idx_discoveries_agent ON discoveries (agent_id);
CREATE INDEX IF NOT EXISTS idx_discoveries_type_status ON discoveries (type, status);
CREATE INDEX IF NOT EXISTS idx_discovery_tags_tag ON discovery_tags (tag);
CREATE INDEX IF NOT EXISTS idx_discovery_edges_dst ON discovery_edges (dst_id, edge_type);
CREATE INDEX IF NOT EXISTS idx_dialectic_sessions_paused ON dialectic_sessions (paused_agent_id);
CREATE INDEX IF NOT EXISTS idx_dialectic_sessions_reviewer ON dialectic_sessions (reviewer_agent_id);
CREATE INDEX IF NOT EXISTS idx_dialectic_messages_session ON dialectic_messages (session_id, id);
