"""SQLite schema migrations. Times are REAL Unix seconds; hashes and keys are BLOBs."""

from __future__ import annotations

from rendezvous.store.migrations import Migration, check_sequence

INITIAL = Migration(
    1,
    "teams, operators, credentials, agents, audit log",
    (
        """CREATE TABLE teams (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            created_at REAL NOT NULL
        )""",
        """CREATE TABLE invites (
            id TEXT PRIMARY KEY,
            team_id TEXT NOT NULL REFERENCES teams(id),
            email TEXT NOT NULL,
            role TEXT NOT NULL,
            code_hash BLOB NOT NULL UNIQUE,
            expires_at REAL NOT NULL,
            created_by TEXT NOT NULL,
            created_at REAL NOT NULL,
            used_at REAL,
            used_by TEXT
        )""",
        "CREATE INDEX invites_team ON invites(team_id, created_at)",
        """CREATE TABLE operators (
            id TEXT PRIMARY KEY,
            team_id TEXT NOT NULL REFERENCES teams(id),
            email TEXT NOT NULL,
            role TEXT NOT NULL,
            public_key BLOB NOT NULL UNIQUE,
            key_thumbprint TEXT NOT NULL UNIQUE,
            created_at REAL NOT NULL,
            disabled_at REAL,
            tokens_valid_after REAL NOT NULL
        )""",
        "CREATE INDEX operators_team ON operators(team_id, email)",
        """CREATE TABLE login_challenges (
            id TEXT PRIMARY KEY,
            challenge TEXT NOT NULL,
            subject TEXT,
            expires_at REAL NOT NULL,
            created_at REAL NOT NULL
        )""",
        "CREATE INDEX login_challenges_expiry ON login_challenges(expires_at)",
        """CREATE TABLE revoked_tokens (
            jti TEXT NOT NULL,
            team_id TEXT NOT NULL,
            expires_at REAL NOT NULL,
            revoked_at REAL NOT NULL,
            PRIMARY KEY (jti, team_id)
        )""",
        "CREATE INDEX revoked_tokens_expiry ON revoked_tokens(expires_at)",
        """CREATE TABLE seen_nonces (
            scope TEXT NOT NULL,
            nonce TEXT NOT NULL,
            expires_at REAL NOT NULL,
            PRIMARY KEY (scope, nonce)
        )""",
        "CREATE INDEX seen_nonces_expiry ON seen_nonces(expires_at)",
        """CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            team_id TEXT NOT NULL REFERENCES teams(id),
            name TEXT NOT NULL,
            scopes TEXT NOT NULL,
            key_hash BLOB NOT NULL UNIQUE,
            created_by TEXT NOT NULL,
            created_at REAL NOT NULL,
            revoked_at REAL
        )""",
        "CREATE INDEX api_keys_team ON api_keys(team_id, created_at)",
        """CREATE TABLE registration_keys (
            id TEXT PRIMARY KEY,
            team_id TEXT NOT NULL REFERENCES teams(id),
            key_hash BLOB NOT NULL UNIQUE,
            tags TEXT NOT NULL,
            expires_at REAL NOT NULL,
            created_by TEXT NOT NULL,
            created_at REAL NOT NULL,
            used_at REAL,
            used_by_agent TEXT,
            revoked_at REAL
        )""",
        "CREATE INDEX registration_keys_team ON registration_keys(team_id, created_at)",
        """CREATE TABLE agents (
            id TEXT PRIMARY KEY,
            team_id TEXT NOT NULL REFERENCES teams(id),
            name TEXT NOT NULL,
            hostname TEXT NOT NULL,
            tags TEXT NOT NULL,
            public_key BLOB NOT NULL UNIQUE,
            key_fingerprint TEXT NOT NULL,
            machine_fingerprint TEXT NOT NULL,
            registration_key_id TEXT NOT NULL REFERENCES registration_keys(id),
            registered_at REAL NOT NULL,
            last_seen_at REAL
        )""",
        "CREATE INDEX agents_team_name ON agents(team_id, name)",
        """CREATE TABLE agent_connections (
            connection_id TEXT PRIMARY KEY,
            agent_id TEXT NOT NULL REFERENCES agents(id),
            team_id TEXT NOT NULL,
            instance_id TEXT NOT NULL,
            machine_fingerprint TEXT NOT NULL,
            connected_at REAL NOT NULL,
            heartbeat_at REAL NOT NULL
        )""",
        "CREATE INDEX agent_connections_agent ON agent_connections(team_id, agent_id)",
        "CREATE INDEX agent_connections_instance ON agent_connections(instance_id)",
        "CREATE INDEX agent_connections_heartbeat ON agent_connections(heartbeat_at)",
        """CREATE TABLE audit_records (
            team_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            time TEXT NOT NULL,
            record_hash BLOB NOT NULL,
            leaf_hash BLOB NOT NULL,
            canonical BLOB NOT NULL,
            PRIMARY KEY (team_id, seq)
        )""",
        # The log is append-only: refuse edits and deletions in the database itself too.
        """CREATE TRIGGER audit_records_no_update BEFORE UPDATE ON audit_records
        BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END""",
        """CREATE TRIGGER audit_records_no_delete BEFORE DELETE ON audit_records
        BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END""",
        """CREATE TABLE audit_checkpoints (
            team_id TEXT PRIMARY KEY,
            size INTEGER NOT NULL,
            note BLOB NOT NULL
        )""",
    ),
)

SESSIONS = Migration(
    2,
    "sessions",
    (
        # A brokered session: what was granted and where it runs. No token is stored; the
        # instance that delivers the offer mints the agent's relay token from this row.
        """CREATE TABLE sessions (
            id TEXT PRIMARY KEY,
            team_id TEXT NOT NULL REFERENCES teams(id),
            agent_id TEXT NOT NULL REFERENCES agents(id),
            operator_id TEXT NOT NULL,
            operator_key_thumbprint TEXT NOT NULL,
            mode TEXT NOT NULL,
            command TEXT,
            relay_id TEXT NOT NULL,
            relay_host TEXT NOT NULL,
            relay_port INTEGER NOT NULL,
            relay_udp_port INTEGER,
            policy_result TEXT NOT NULL,
            policy_rule_id TEXT,
            state TEXT NOT NULL,
            state_reason TEXT,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
        "CREATE INDEX sessions_team_agent ON sessions(team_id, agent_id, created_at)",
        "CREATE INDEX sessions_expiry ON sessions(expires_at)",
    ),
)

POLICY = Migration(
    3,
    "policy bundles, approval requests, agents' applied policy version",
    (
        # Each team's signed policy bundles, one row per version; the newest is the one in force.
        # The rendezvous's own trust (the admins who may sign the next one) is derived from it.
        """CREATE TABLE policy_bundles (
            team_id TEXT NOT NULL REFERENCES teams(id),
            version INTEGER NOT NULL,
            content_sha256 TEXT NOT NULL,
            policy_sha256 TEXT NOT NULL,
            bundle TEXT NOT NULL,
            admin_key_id TEXT NOT NULL,
            created_by TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (team_id, version)
        )""",
        # A session request parked until an approver signs it (or denies it, or it expires).
        """CREATE TABLE approval_requests (
            id TEXT PRIMARY KEY,
            team_id TEXT NOT NULL REFERENCES teams(id),
            agent_id TEXT NOT NULL REFERENCES agents(id),
            requester_id TEXT NOT NULL,
            requester_email TEXT NOT NULL,
            requester_thumbprint TEXT NOT NULL,
            mode TEXT NOT NULL,
            command TEXT,
            command_sha256 TEXT NOT NULL,
            policy_version INTEGER NOT NULL,
            rule_id TEXT,
            reason TEXT NOT NULL,
            state TEXT NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            decided_by TEXT,
            decided_by_email TEXT,
            decision_reason TEXT,
            decided_at REAL,
            approval TEXT,
            session_id TEXT,
            executed_at REAL
        )""",
        "CREATE INDEX approval_requests_team ON approval_requests(team_id, state, created_at)",
        # The policy version each agent last reported applying (NULL: none reported yet).
        "ALTER TABLE agents ADD COLUMN policy_version INTEGER",
        "ALTER TABLE agents ADD COLUMN policy_refusal TEXT",
    ),
)

AGENT_EVENTS_ONCE = Migration(
    4,
    "agent-signed audit events stored once per team",
    (
        # SHA-256 of an agent-signed event's canonical encoding (AuditEvent.digest); NULL for
        # records the rendezvous signs. Records stored before this migration keep NULL (the log
        # is append-only, so they are not backfilled).
        "ALTER TABLE audit_records ADD COLUMN event_digest BLOB",
        # Decides races between writers (instances) storing the same event: one record per event.
        # Partial, so appends of rendezvous-signed records do not maintain it.
        """CREATE UNIQUE INDEX audit_records_event_digest ON audit_records(team_id, event_digest)
        WHERE event_digest IS NOT NULL""",
    ),
)

AGENT_LIST_ORDER = Migration(
    5,
    "agents indexed in the agent list's (name, id) order",
    (
        # GET /v1/agents pages a team's agents by the keyset (name, id): with the id in the
        # index, a page is read in order from its cursor on instead of sorting the rest of the
        # team. It serves every lookup the (team_id, name) index did, which it replaces.
        "DROP INDEX agents_team_name",
        "CREATE INDEX agents_team_name_id ON agents(team_id, name, id)",
    ),
)

SESSION_LIST_ORDER = Migration(
    6,
    "sessions indexed in the session list's (created_at, id) order",
    (
        # GET /v1/sessions pages a team's sessions newest first by the keyset (created_at, id):
        # a page is read backwards from its cursor instead of sorting the whole team's history.
        # The operator's own list (an operator sees only theirs) gets the same order per operator.
        "CREATE INDEX sessions_team_created_id ON sessions(team_id, created_at, id)",
        "CREATE INDEX sessions_team_operator_created_id "
        "ON sessions(team_id, operator_id, created_at, id)",
    ),
)

AGENT_REMOVAL = Migration(
    7,
    "agents removed by an admin stay as tombstones",
    (
        # Set once an admin removes the agent: it no longer lists, resolves or authenticates,
        # and another agent may take its name. The row (and its UNIQUE public key) stays, so
        # the removed key can never register again, and its sessions keep their history.
        "ALTER TABLE agents ADD COLUMN removed_at REAL",
    ),
)

SERVICE_KEY_PINS = Migration(
    8,
    "the service keys' fingerprints, pinned by the first init",
    (
        # One row per key role (jwt-issuer, audit-signer, ...): an instance whose data dir holds
        # other keys (an empty data dir re-initialised) is refused instead of signing audit
        # records and tokens with keys nobody pinned.
        """CREATE TABLE service_key_fingerprints (
            role TEXT PRIMARY KEY,
            fingerprint TEXT NOT NULL,
            recorded_at REAL NOT NULL
        )""",
    ),
)

SESSION_ENDINGS = Migration(
    9,
    "sessions keep how their command ended",
    (
        # From the agent-signed session.ended (its reason goes to state_reason): the exit code
        # of the shell or command, or the signal (name without SIG, e.g. TERM) that killed it.
        # NULL when the agent reported neither, or the session did not end by the agent's word.
        "ALTER TABLE sessions ADD COLUMN exit_code INTEGER",
        "ALTER TABLE sessions ADD COLUMN exit_signal TEXT",
    ),
)

RETIRED_SERVICE_KEYS = Migration(
    10,
    "service keys replaced by 'keys rotate', kept as public keys",
    (
        # One row per rotated-out key: its public half verifies what it signed before the
        # rotation (tokens and grants until accept_until, audit records for ever); its private
        # half no longer exists. replaced_by is the fingerprint of the key that took its role;
        # statement is the JSON rotation statement the old key signed, naming its successor,
        # which agents that pinned the old key follow (agent/enrollment.py).
        """CREATE TABLE retired_service_keys (
            role TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            public_key TEXT NOT NULL,
            replaced_by TEXT NOT NULL,
            retired_at REAL NOT NULL,
            accept_until REAL NOT NULL,
            statement TEXT NOT NULL,
            PRIMARY KEY (role, fingerprint)
        )""",
    ),
)

OPEN_SESSIONS_BY_OPERATOR = Migration(
    11,
    "open sessions indexed by operator",
    (
        # The periodic sweep of disabled operators' sessions (rendezvous/offer_bus.py) reads
        # only their offered and accepted rows: partial, so it never walks an operator's whole
        # history, and ended rows (almost all of them) do not maintain it. The sweep's query
        # repeats this WHERE word for word (SQLite uses a partial index only then).
        "CREATE INDEX sessions_open_team_operator ON sessions(team_id, operator_id, id) "
        "WHERE state IN ('offered', 'accepted')",
    ),
)

MIGRATIONS: tuple[Migration, ...] = (
    INITIAL, SESSIONS, POLICY, AGENT_EVENTS_ONCE, AGENT_LIST_ORDER, SESSION_LIST_ORDER,
    AGENT_REMOVAL, SERVICE_KEY_PINS, SESSION_ENDINGS, RETIRED_SERVICE_KEYS,
    OPEN_SESSIONS_BY_OPERATOR,
)
check_sequence(MIGRATIONS)
