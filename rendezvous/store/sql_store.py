"""The ``Store`` written once in SQL that SQLite and PostgreSQL both accept.

Backends supply a ``SqlSession`` (run one statement, ``$1``-style placeholders) and two ways to
get one: ``_autocommit()`` for single statements and ``_transaction()`` for read-modify-write,
which on SQLite is ``BEGIN IMMEDIATE`` and on PostgreSQL a READ COMMITTED transaction, and
``_read()`` for statements that only read (a backend may run those a cheaper way). Every
single-use check is one conditional ``UPDATE … WHERE <usable> RETURNING``, so the row lock (or
SQLite's write lock) decides a race and exactly one caller wins; only when it matches nothing do
we read the row again to say why.
"""

from __future__ import annotations

import abc
import functools
import itertools
import json
import math
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from audit.errors import AppendConflict, DuplicateEvent
from audit.errors import StoreError as AuditStoreError
from audit.store import AuditStore, StoredCheckpoint, StoredRecord
from rendezvous.store.base import (
    CONNECTION_STALE_AFTER_SECONDS,
    EVERY_AGENT,
    EVERY_SESSION,
    INVITE_REVOKED_EXPIRES_AT,
    MAX_MATCHES,
    MAX_NAME_LENGTH,
    MAX_SCOPES,
    MAX_SIGNAL_NAME_LENGTH,
    MAX_TAGS,
    MAX_TEAM_NAME_LENGTH,
    Agent,
    AgentConnection,
    AgentListing,
    AgentQuery,
    AlreadyExists,
    AmbiguousName,
    ApiKey,
    ApprovalRequest,
    ApprovalState,
    ChallengeUnusable,
    ConnectionReport,
    DisabledOperator,
    InvalidArgument,
    Invite,
    InviteUnusable,
    LastActiveAdmin,
    LastRosterSigner,
    ListedSession,
    LoginChallenge,
    NotFound,
    Operator,
    OperatorHoldings,
    PrunedHistory,
    RegistrationKey,
    RegistrationKeyUnusable,
    RetiredServiceKey,
    Session,
    SessionListing,
    SessionQuery,
    SessionState,
    Store,
    StoredPolicyBundle,
    StoreError,
    TagsChanged,
    Team,
    TokenHolder,
    TooManyPendingRequests,
    UnusableReason,
    new_id,
)
from rendezvous.store.migrations import Migration

Row = Mapping[str, Any]

# History a prune may delete ($1 team, $2 cutoff). Approval requests whose outcome is final
# (an approved one is still redeemable until it expires or runs: kept), every time of which is
# before the cutoff, and whose session (if it ran) is over. Sessions that are over (offered
# and accepted ones are open: the sweeps, the agent's live_sessions report and its session
# events still need them) and last changed before the cutoff; created_at is implied by
# updated_at, and lets the (team_id, created_at, id) index bound the scan. An agent's spool
# keeps a session's signed events until the rendezvous takes them, however long the agent is
# away, and the rendezvous refuses an event whose session row is gone: a session stays until
# its agent has been seen (connected: last_seen_at) after the session last changed, or the
# agent is removed (it will never deliver again).
_SETTLED_APPROVALS = """team_id = $1
    AND state IN ('denied', 'expired', 'executed', 'withdrawn')
    AND created_at < $2 AND expires_at < $2
    AND COALESCE(decided_at, 0) < $2 AND COALESCE(executed_at, 0) < $2
    AND (session_id IS NULL OR session_id NOT IN (
        SELECT id FROM sessions WHERE team_id = $1 AND state IN ('offered', 'accepted')))"""
_FINISHED_SESSIONS = """team_id = $1 AND state IN ('ended', 'refused')
    AND created_at < $2 AND updated_at < $2
    AND EXISTS (SELECT 1 FROM agents a
        WHERE a.team_id = $1 AND a.id = sessions.agent_id
          AND (a.removed_at IS NOT NULL OR a.last_seen_at > sessions.updated_at))"""
# Sessions an approval request that stays names (its history stays whole).
_SESSIONS_NAMED_BY_KEPT_APPROVALS = f"""SELECT session_id FROM approval_requests
    WHERE team_id = $1 AND session_id IS NOT NULL AND NOT ({_SETTLED_APPROVALS})"""  # noqa: S608
# One prune batch ($3 rows). The outer predicate is the primary key alone (the inner select
# filters the team): with team_id there too, SQLite walks the team's index under the write
# lock, for a time growing with the team's whole table.
_PRUNE_APPROVALS_BATCH = f"""DELETE FROM approval_requests WHERE id IN (
    SELECT id FROM approval_requests WHERE {_SETTLED_APPROVALS}
    ORDER BY created_at LIMIT $3)"""  # noqa: S608 - constant conditions
_PRUNE_SESSIONS_BATCH = f"""DELETE FROM sessions WHERE id IN (
    SELECT id FROM sessions
    WHERE {_FINISHED_SESSIONS} AND id NOT IN ({_SESSIONS_NAMED_BY_KEPT_APPROVALS})
    ORDER BY created_at LIMIT $3)"""  # noqa: S608 - constant conditions

# Whether an agent (``a``) has a live control connection.
_AGENT_ONLINE = """EXISTS (SELECT 1 FROM agent_connections c
            WHERE c.team_id = a.team_id AND c.agent_id = a.id)"""

# Constant column lists spliced into the agent queries (never user input; values are $n).
_AGENT_STORED_COLUMNS = """a.id, a.team_id, a.name, a.hostname, a.tags, a.public_key,
    a.key_fingerprint, a.machine_fingerprint, a.registration_key_id, a.registered_at,
    a.last_seen_at, a.policy_version, a.policy_refusal, a.removed_at"""
_AGENT_COLUMNS = f"""{_AGENT_STORED_COLUMNS},
    {_AGENT_ONLINE} AS online"""

# The operator an access token names ($1 team, $2 operator id; its columns prefixed ``holder_``,
# all NULL when the team has no such operator) and whether its id $3 was revoked by that team
# (only a team's own admins revoke its tokens): one row.
_HOLDER_QUERY = """SELECT o.id AS holder_id, o.team_id AS holder_team_id,
        o.email AS holder_email, o.role AS holder_role, o.public_key AS holder_public_key,
        o.key_thumbprint AS holder_key_thumbprint, o.created_at AS holder_created_at,
        o.disabled_at AS holder_disabled_at, o.tokens_valid_after AS holder_tokens_valid_after,
        EXISTS (SELECT 1 FROM revoked_tokens r WHERE r.jti = $3 AND r.team_id = $1)
            AS token_revoked
    FROM (SELECT 1 AS one) t
    LEFT JOIN operators o ON o.team_id = $1 AND o.id = $2"""



@functools.lru_cache(maxsize=128)
def _agent_listing_sql(
    *,
    with_holder: bool,
    after: bool,
    name_prefix: bool,
    online: bool | None,
    tags: bool,
    limit: bool,
    carries_tags: str,
    page_apart: bool,
) -> str:
    """The statement listing team $1's agents in (name, id) order beside its newest policy
    version, with the holder's columns of ``_HOLDER_QUERY`` ($2, $3) first when ``with_holder``.

    Only the conditions asked for are written, so each shape has a plain plan: the (team_id,
    name, id) index read from the cursor on, in order, until the limit. Their values are the
    next parameters, in the order of the arguments here. The one-row policy side always yields
    a row, so a team (or a filter) without agents still reports the version, with the agent
    columns NULL. The agents are joined to it in one of two ways:

    * ``page_apart`` (PostgreSQL): the page is chosen in a subquery of its own (ORDER BY and
      LIMIT inside), then joined. PostgreSQL's planner does not carry the index order through
      a nested loop whose outer side is the one-row policy aggregate, so with the filters in
      the join condition it read the whole team and sorted it for every page (a 500-agent page
      of a 10,000-agent team: 4-7 ms of server CPU, against 1 ms this way).
    * otherwise (SQLite): the filters sit in the join condition and ORDER BY and LIMIT on the
      whole statement; SQLite reads the index in order there already, and the page subquery
      would cost a second materialization and sort (~10% more SQL time per page).
    """
    numbers = itertools.count(4 if with_holder else 2)
    conditions = ["a.team_id = $1", "a.removed_at IS NULL"]
    if after:
        name, agent_id = next(numbers), next(numbers)
        # The name bound alone is an index range; the id breaks ties between equal names.
        conditions.append(f"a.name >= ${name} AND (a.name > ${name} OR a.id > ${agent_id})")
    if name_prefix:
        prefix = f"CAST(${next(numbers)} AS TEXT)"
        # Not LIKE: no wildcards to escape, and the same answer under any collation.
        conditions.append(f"substr(a.name, 1, length({prefix})) = {prefix}")
    if online is not None:
        conditions.append(_AGENT_ONLINE if online else f"NOT {_AGENT_ONLINE}")
    if tags:
        conditions.append(carries_tags.format(tags=f"${next(numbers)}"))
    limit_clause = f" LIMIT ${next(numbers)}" if limit else ""
    # bundle <> '': not the mark of a retired chain (_RETIRED_CHAIN_MARK).
    policy = """(SELECT MAX(version) AS team_policy_version FROM policy_bundles
              WHERE team_id = $1 AND bundle <> '') p"""
    if page_apart:
        page = f"""SELECT {_AGENT_STORED_COLUMNS} FROM agents a
            WHERE {" AND ".join(conditions)} ORDER BY a.name, a.id{limit_clause}"""  # noqa: S608
        # Whether each agent of the page is online: one look-up in the connections index per
        # agent of the page. Not EXISTS, which PostgreSQL may answer by hashing every
        # connection in the table for each page (9,000 of 10,000 agents online: 3.5 ms for a
        # 500-agent page, against 1.6 ms this way); it does not hash a scalar subquery.
        listing = f"""SELECT p.team_policy_version, a.*,
                COALESCE((SELECT TRUE FROM agent_connections c
                          WHERE c.team_id = a.team_id AND c.agent_id = a.id LIMIT 1), FALSE)
                    AS online
            FROM {policy} LEFT JOIN ({page}) a ON TRUE"""  # noqa: S608
    else:
        listing = f"""SELECT p.team_policy_version, {_AGENT_COLUMNS} FROM {policy}
            LEFT JOIN agents a ON {" AND ".join(conditions)}"""  # noqa: S608
    if with_holder:
        # Both sides always yield at least one row, so the product does too; the holder's
        # columns repeat on every row.
        sql = f"SELECT h.*, l.* FROM ({_HOLDER_QUERY}) h CROSS JOIN ({listing}) l"  # noqa: S608
    else:
        sql = f"SELECT l.* FROM ({listing}) l"  # noqa: S608
    # Also on the page apart: only this outer ORDER BY promises the order (sorting one page).
    sql += " ORDER BY l.name, l.id"
    return sql if page_apart else sql + limit_clause


def _agent_listing_statement(
    query: AgentQuery, *, with_holder: bool, carries_tags: str, page_apart: bool = False
) -> tuple[str, list[Any]]:
    """``_agent_listing_sql`` for ``query`` and the values of its query parameters (one row
    more than the limit: whether it comes back says if more agents follow)."""
    values: list[Any] = []
    if query.after is not None:
        after_name, after_id = query.after
        _check_text("listing position name", after_name, MAX_NAME_LENGTH)
        _check_text("listing position id", after_id, MAX_NAME_LENGTH)
        values += [after_name, after_id]
    if query.name_prefix is not None:
        _check_text("name prefix", query.name_prefix, MAX_NAME_LENGTH)
        values.append(query.name_prefix)
    if query.tags:
        values.append(json.dumps(list(_check_labels("tags", query.tags, MAX_TAGS))))
    if query.limit is not None:
        if type(query.limit) is not int or query.limit < 1:
            raise InvalidArgument("a listing limit must be a whole number of at least 1")
        values.append(query.limit + 1)
    sql = _agent_listing_sql(
        with_holder=with_holder,
        after=query.after is not None,
        name_prefix=query.name_prefix is not None,
        online=query.online,
        tags=bool(query.tags),
        limit=query.limit is not None,
        carries_tags=carries_tags,
        page_apart=page_apart,
    )
    return sql, values


# Sessions with their agent's name and operator's email (NULL once those are gone), for a list
# or for one session: the caller adds the WHERE clause, on team $1 at least.
_LISTED_SESSIONS = """SELECT s.*, a.name AS listed_agent_name, o.email AS listed_operator_email
        FROM sessions s
        LEFT JOIN agents a ON a.team_id = s.team_id AND a.id = s.agent_id
        LEFT JOIN operators o ON o.team_id = s.team_id AND o.id = s.operator_id"""


def _session_listing_statement(query: SessionQuery) -> tuple[str, list[Any]]:
    """The statement listing team $1's sessions newest first ((created_at, id) descending) as
    ``query`` selects them, and the values of its other parameters (one row more than the
    limit: whether it comes back says if more sessions follow).

    Only the conditions asked for are written, so the (team_id, created_at, id) index (or the
    per-operator or per-agent one) is read backwards from the cursor until the limit.
    """
    numbers = itertools.count(2)
    values: list[Any] = []
    conditions = ["s.team_id = $1"]
    if query.after is not None:
        after_time, after_id = query.after
        if not _is_time(after_time):
            raise InvalidArgument("a listing position time must be a finite number")
        _check_text("listing position id", after_id, MAX_NAME_LENGTH)
        time_number, id_number = next(numbers), next(numbers)
        # The time bound alone is an index range; the id breaks ties between equal times.
        conditions.append(
            f"s.created_at <= ${time_number} "
            f"AND (s.created_at < ${time_number} OR s.id < ${id_number})"
        )
        values += [float(after_time), after_id]
    if query.states:
        states = tuple(dict.fromkeys(SessionState(state).value for state in query.states))
        placeholders = ", ".join(f"${next(numbers)}" for _ in states)
        conditions.append(f"s.state IN ({placeholders})")
        values += states
    if query.agent_id is not None:
        _check_text("agent id", query.agent_id, MAX_NAME_LENGTH)
        conditions.append(f"s.agent_id = ${next(numbers)}")
        values.append(query.agent_id)
    if query.operator_id is not None:
        _check_text("operator id", query.operator_id, MAX_NAME_LENGTH)
        conditions.append(f"s.operator_id = ${next(numbers)}")
        values.append(query.operator_id)
    if query.operator_email is not None:
        _check_text("operator email", query.operator_email, MAX_NAME_LENGTH)
        # Every id the person had in this team (invited again after being disabled).
        email_number = next(numbers)
        conditions.append(
            "s.operator_id IN (SELECT e.id FROM operators e WHERE e.team_id = $1 "  # noqa: S608
            f"AND lower(e.email) = lower(${email_number}))"
        )
        values.append(query.operator_email)
    if query.since is not None:
        if not _is_time(query.since):
            raise InvalidArgument("since must be a finite number")
        conditions.append(f"s.created_at >= ${next(numbers)}")
        values.append(float(query.since))
    sql = f"""{_LISTED_SESSIONS} WHERE {" AND ".join(conditions)}
        ORDER BY s.created_at DESC, s.id DESC"""  # noqa: S608 - only placeholders spliced in
    if query.limit is not None:
        if type(query.limit) is not int or query.limit < 1:
            raise InvalidArgument("a listing limit must be a whole number of at least 1")
        sql += f" LIMIT ${next(numbers)}"
        values.append(query.limit + 1)
    return sql, values


def _is_time(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value)  # type: ignore[arg-type]


class SqlSession(abc.ABC):
    """One database connection, borrowed for an autocommit statement or a transaction."""

    @abc.abstractmethod
    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        """Run a query and return all rows. Unique-constraint failures raise AlreadyExists."""

    @abc.abstractmethod
    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement and return the number of rows it changed."""

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        """Run a query and return its first row, or None."""
        rows = await self.fetch(sql, *args)
        return rows[0] if rows else None


class SqlStore(Store):
    """The store's behaviour on any backend that provides SQL sessions."""

    def __init__(self) -> None:
        self._audit = SqlAuditStore(self)

    @property
    def audit(self) -> AuditStore:
        """The audit log's storage on this database."""
        return self._audit

    @abc.abstractmethod
    def _autocommit(self) -> AbstractAsyncContextManager[SqlSession]:
        """A session whose statements each commit on their own."""

    @abc.abstractmethod
    def _transaction(self) -> AbstractAsyncContextManager[SqlSession]:
        """A session in one write transaction: committed on exit, rolled back on error."""

    # The size of the row ``probe_writes`` inserts and deletes (random, so nothing compresses
    # it): more than the service's own writes need, so a disk too full for them refuses it.
    _write_probe_bytes = 64 * 1024

    # A SQL condition true while no writer holds the team's audit turn ($1 is the team id).
    _audit_turn_free = "TRUE"

    # A SQL condition true when agent ``a`` carries every tag of the JSON array {tags} (a
    # parameter): each backend reads JSON its own way.
    _agent_carries_tags: str
    # Whether the agent listing chooses its page in a subquery before joining the policy side
    # (see ``_agent_listing_sql``): what each backend's planner reads from the index in order.
    _agent_page_apart = False

    def _audit_writer_turn(self, team_id: str) -> AbstractAsyncContextManager[SqlSession]:
        """A write transaction holding the team log's writer turn: other writers of that log, in
        this process or another, wait until it ends. The default, a write transaction, is a
        turn wherever the backend lets one writer in at a time (SQLite's BEGIN IMMEDIATE)."""
        return self._transaction()

    def _read(self) -> AbstractAsyncContextManager[SqlSession]:
        """A session for a statement that only reads (autocommit unless a backend knows better)."""
        return self._autocommit()

    # The backend's migrations, and a query naming ``schema_migrations`` when that table exists.
    _migrations: tuple[Migration, ...] = ()
    _schema_table_query: str

    async def _recorded_versions(self) -> set[int]:
        if not await self._fetch(self._schema_table_query):
            return set()
        rows = await self._fetch("SELECT version FROM schema_migrations")
        return {int(row["version"]) for row in rows}

    async def schema_version(self) -> int:
        """The newest migration recorded in the database (0 for a database never migrated)."""
        return max(await self._recorded_versions(), default=0)

    async def pending_migrations(self) -> list[tuple[int, str]]:
        """(version, name) of the migrations this program knows that the database lacks."""
        done = await self._recorded_versions()
        return [(m.version, m.name) for m in self._migrations if m.version not in done]

    async def _fetch(self, sql: str, *args: Any) -> list[Row]:
        async with self._autocommit() as session:
            return await session.fetch(sql, *args)

    async def _read_fetch(self, sql: str, *args: Any) -> list[Row]:
        async with self._read() as session:
            return await session.fetch(sql, *args)

    async def _read_fetchrow(self, sql: str, *args: Any) -> Row | None:
        async with self._read() as session:
            return await session.fetchrow(sql, *args)

    async def _fetchrow(self, sql: str, *args: Any) -> Row | None:
        async with self._autocommit() as session:
            return await session.fetchrow(sql, *args)

    async def _execute(self, sql: str, *args: Any) -> int:
        async with self._autocommit() as session:
            return await session.execute(sql, *args)

    # ---- teams ---------------------------------------------------------------------------

    async def create_team(self, name: str, now: float) -> Team:
        """Create a team; AlreadyExists if the name is taken."""
        _check_text("team name", name, MAX_TEAM_NAME_LENGTH)
        team = Team(id=new_id("tm"), name=name, created_at=now)
        try:
            await self._execute(
                "INSERT INTO teams (id, name, created_at) VALUES ($1, $2, $3)",
                team.id, team.name, team.created_at,
            )  # fmt: skip
        except AlreadyExists:
            raise AlreadyExists(f"a team named {name!r} already exists") from None
        return team

    async def get_team(self, team_id: str) -> Team | None:
        """The team with this id, or None."""
        row = await self._fetchrow("SELECT * FROM teams WHERE id = $1", team_id)
        return _team(row) if row else None

    async def get_team_by_name(self, name: str) -> Team | None:
        """The team with this name, or None."""
        row = await self._fetchrow("SELECT * FROM teams WHERE name = $1", name)
        return _team(row) if row else None

    async def list_teams(self) -> list[Team]:
        """All teams, ordered by name."""
        return [_team(row) for row in await self._fetch("SELECT * FROM teams ORDER BY name")]

    async def _require_team(self, session: SqlSession, team_id: str) -> None:
        if await session.fetchrow("SELECT id FROM teams WHERE id = $1", team_id) is None:
            raise NotFound("no such team")

    # ---- invites and enrollment ----------------------------------------------------------

    async def create_invite(
        self,
        team_id: str,
        email: str,
        role: str,
        code_hash: bytes,
        expires_at: float,
        created_by: str,
        now: float,
    ) -> Invite:
        """Store a one-time invite (its code hashed). NotFound if the team does not exist."""
        _check_text("email", email, MAX_NAME_LENGTH)
        _check_text("role", role, MAX_NAME_LENGTH)
        invite = Invite(
            id=new_id("inv"), team_id=team_id, email=email, role=role, expires_at=expires_at,
            created_by=created_by, created_at=now, used_at=None, used_by=None,
        )  # fmt: skip
        async with self._transaction() as session:
            await self._require_team(session, team_id)
            await session.execute(
                """INSERT INTO invites (id, team_id, email, role, code_hash, expires_at,
                                        created_by, created_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
                invite.id, team_id, email, role, bytes(code_hash), expires_at, created_by, now,
            )  # fmt: skip
        return invite

    async def list_invites(self, team_id: str) -> list[Invite]:
        """The team's invites, newest first."""
        rows = await self._fetch(
            "SELECT * FROM invites WHERE team_id = $1 ORDER BY created_at DESC, id", team_id
        )
        return [_invite(row) for row in rows]

    async def revoke_invite(self, team_id: str, invite_id: str, now: float) -> Invite:
        """Make the team's unused, unexpired invite unusable from ``now`` and return it so.
        NotFound if the team holds no such invite; InviteUnusable if it is used or expired."""
        async with self._transaction() as session:
            row = await session.fetchrow(
                """UPDATE invites SET expires_at = $4
                   WHERE team_id = $1 AND id = $2 AND used_at IS NULL AND expires_at > $3
                   RETURNING *""",
                team_id, invite_id, now, INVITE_REVOKED_EXPIRES_AT,
            )  # fmt: skip
            if row is not None:
                return _invite(row)
            existing = await session.fetchrow(
                "SELECT * FROM invites WHERE team_id = $1 AND id = $2", team_id, invite_id
            )
        if existing is None:
            raise NotFound("no such invite")
        raise InviteUnusable(_invite(existing).unusable_reason(now) or UnusableReason.USED)

    async def consume_invite(self, code_hash: bytes, now: float) -> Invite:
        """Atomically mark an unused, unexpired invite used and return it; else InviteUnusable."""
        async with self._transaction() as session:
            return await self._consume_invite(session, bytes(code_hash), now, used_by=None)

    async def _consume_invite(
        self, session: SqlSession, code_hash: bytes, now: float, used_by: str | None
    ) -> Invite:
        row = await session.fetchrow(
            """UPDATE invites SET used_at = $2, used_by = $3
               WHERE code_hash = $1 AND used_at IS NULL AND expires_at > $2
               RETURNING *""",
            code_hash, now, used_by,
        )  # fmt: skip
        if row is not None:
            return _invite(row)
        existing = await session.fetchrow("SELECT * FROM invites WHERE code_hash = $1", code_hash)
        if existing is None:
            raise InviteUnusable(UnusableReason.UNKNOWN)
        raise InviteUnusable(_invite(existing).unusable_reason(now) or UnusableReason.USED)

    async def enroll_operator(
        self, code_hash: bytes, now: float, public_key: bytes, key_thumbprint: str
    ) -> tuple[Operator, Invite]:
        """In one transaction: consume the invite and create the operator it names."""
        operator_id = new_id("op")
        async with self._transaction() as session:
            invite = await self._consume_invite(session, bytes(code_hash), now, operator_id)
            # No check against a disable of the email's operator: the disable expires its unused
            # invites in its own transaction, and comparing the invite's created_at (the clock of
            # whoever ran `invite create`) with disabled_at (the serving instance's clock) refused
            # a legitimate re-invite from a host a moment behind.
            operator = Operator(
                id=operator_id, team_id=invite.team_id, email=invite.email, role=invite.role,
                public_key=bytes(public_key), key_thumbprint=key_thumbprint, created_at=now,
                disabled_at=None, tokens_valid_after=now,
            )  # fmt: skip
            try:
                await session.execute(
                    """INSERT INTO operators (id, team_id, email, role, public_key,
                                              key_thumbprint, created_at, tokens_valid_after)
                       VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
                    operator.id, operator.team_id, operator.email, operator.role,
                    operator.public_key, operator.key_thumbprint, now, now,
                )  # fmt: skip
            except AlreadyExists:
                raise AlreadyExists("this operator key is already enrolled") from None
        return operator, invite

    # ---- operators -----------------------------------------------------------------------

    async def get_operator(self, team_id: str, operator_id: str) -> Operator | None:
        """The team's operator with this id, or None."""
        row = await self._read_fetchrow(
            "SELECT * FROM operators WHERE team_id = $1 AND id = $2", team_id, operator_id
        )
        return _operator(row) if row else None

    async def get_operator_by_thumbprint(self, key_thumbprint: str) -> Operator | None:
        """The operator whose key has this RFC 7638 thumbprint (any team), or None."""
        row = await self._read_fetchrow(
            "SELECT * FROM operators WHERE key_thumbprint = $1", key_thumbprint
        )
        return _operator(row) if row else None

    async def list_operators(self, team_id: str) -> list[Operator]:
        """The team's operators, ordered by email."""
        rows = await self._read_fetch(
            "SELECT * FROM operators WHERE team_id = $1 ORDER BY email, id", team_id
        )
        return [_operator(row) for row in rows]

    async def operators_matching(self, team_id: str, id_or_email: str) -> list[Operator]:
        """The team's operators with this id or email (ASCII case ignored), oldest first."""
        rows = await self._read_fetch(
            """SELECT * FROM operators
               WHERE team_id = $1 AND (id = $2 OR lower(email) = lower($2))
               ORDER BY created_at, id LIMIT $3""",
            team_id, id_or_email, MAX_MATCHES,
        )  # fmt: skip
        return [_operator(row) for row in rows]

    async def disable_operator(
        self, team_id: str, operator_id: str, now: float, *, keep_an_active_admin: bool = False
    ) -> Operator:
        """Disable the operator and kill all its tokens (tokens_valid_after = now), revoking
        what it holds as ``disable_operator_and_holdings`` does. NotFound; with
        ``keep_an_active_admin``, LastActiveAdmin if it is the team's last active admin."""
        disabled = await self.disable_operator_and_holdings(
            team_id, operator_id, now, keep_an_active_admin=keep_an_active_admin
        )
        return disabled.operator

    async def disable_operator_and_holdings(
        self,
        team_id: str,
        operator_id: str,
        now: float,
        *,
        keep_an_active_admin: bool = False,
        keep_a_signer: frozenset[str] | None = None,
    ) -> DisabledOperator:
        """In one transaction: disable the operator, kill its tokens, revoke its API keys and
        the unused, unexpired registration keys it or those API keys created (ids returned)."""
        async with self._transaction() as session:
            if keep_a_signer is not None:
                await session.execute("UPDATE teams SET name = name WHERE id = $1", team_id)
                admins = await session.fetch(
                    """SELECT id, key_thumbprint FROM operators
                       WHERE team_id = $1 AND role = 'admin' AND disabled_at IS NULL""",
                    team_id,
                )  # fmt: skip
                signers = {row["id"] for row in admins if row["key_thumbprint"] in keep_a_signer}
                if signers == {operator_id}:
                    raise LastRosterSigner("this is the signed roster's last active admin")
            if keep_an_active_admin:
                # The team row's lock queues concurrent disables in one team, so two admins
                # disabling each other cannot both count the other as still active.
                await session.execute("UPDATE teams SET name = name WHERE id = $1", team_id)
                others = await session.fetchrow(
                    """SELECT COUNT(*) AS n FROM operators
                       WHERE team_id = $1 AND id <> $2 AND role = 'admin'
                         AND disabled_at IS NULL""",
                    team_id, operator_id,
                )  # fmt: skip
                target = await session.fetchrow(
                    "SELECT role, disabled_at FROM operators WHERE team_id = $1 AND id = $2",
                    team_id, operator_id,
                )  # fmt: skip
                if (
                    target is not None and target["role"] == "admin"
                    and target["disabled_at"] is None and others is not None and others["n"] == 0
                ):  # fmt: skip
                    raise LastActiveAdmin("this is the team's last active admin")
            # The first disable to commit sets disabled_at (a concurrent one waits on the row
            # lock, then matches nothing here); it alone revokes what the operator held.
            row = await session.fetchrow(
                """UPDATE operators
                   SET disabled_at = $3,
                       tokens_valid_after = CASE WHEN tokens_valid_after > $3
                                                 THEN tokens_valid_after ELSE $3 END
                   WHERE team_id = $1 AND id = $2 AND disabled_at IS NULL RETURNING *""",
                team_id, operator_id, now,
            )  # fmt: skip
            if row is None:
                row = await session.fetchrow(
                    """UPDATE operators
                       SET tokens_valid_after = CASE WHEN tokens_valid_after > $3
                                                     THEN tokens_valid_after ELSE $3 END
                       WHERE team_id = $1 AND id = $2 RETURNING *""",
                    team_id, operator_id, now,
                )  # fmt: skip
                if row is None:
                    raise NotFound("no such operator")
                # Already disabled (a repeat, or a concurrent disable committed first): that
                # disable revoked what it held; an invite for the email made since is a
                # deliberate re-invite, and a key made since is refused at use anyway.
                return DisabledOperator(
                    operator=_operator(row), revoked_api_keys=(), revoked_registration_keys=(),
                    already_disabled=True,
                )  # fmt: skip
            invites = await self._invites_for_email(session, team_id, row["email"], now)
            for invite_id in invites:
                # Revoked for good (INVITE_REVOKED_EXPIRES_AT), not "expired now": a login that
                # read its clock before this commits must not pass ``expires_at > now`` after.
                await session.execute(
                    """UPDATE invites SET expires_at = $4
                       WHERE team_id = $1 AND id = $2 AND used_at IS NULL AND expires_at > $3""",
                    team_id, invite_id, now, INVITE_REVOKED_EXPIRES_AT,
                )  # fmt: skip
            # Registration keys first: the API keys that made some are still unrevoked then.
            registration_keys = await session.fetch(
                """UPDATE registration_keys SET revoked_at = $3
                   WHERE team_id = $1 AND revoked_at IS NULL AND used_at IS NULL
                     AND expires_at > $3
                     AND (created_by = $2
                          OR created_by IN (SELECT id FROM api_keys
                                            WHERE team_id = $1 AND created_by = $2))
                   RETURNING id""",
                team_id, operator_id, now,
            )  # fmt: skip
            api_keys = await session.fetch(
                """UPDATE api_keys SET revoked_at = $3
                   WHERE team_id = $1 AND created_by = $2 AND revoked_at IS NULL
                   RETURNING id""",
                team_id, operator_id, now,
            )  # fmt: skip
        return DisabledOperator(
            operator=_operator(row),
            revoked_api_keys=tuple(sorted(key["id"] for key in api_keys)),
            revoked_registration_keys=tuple(sorted(key["id"] for key in registration_keys)),
            revoked_invites=invites,
        )

    async def operator_holdings(
        self, team_id: str, operator_id: str, now: float
    ) -> OperatorHoldings:
        """What ``disable_operator_and_holdings`` would revoke at ``now`` (a read)."""
        async with self._transaction() as session:
            operator = await session.fetchrow(
                "SELECT email FROM operators WHERE team_id = $1 AND id = $2",
                team_id, operator_id,
            )  # fmt: skip
            invites = (
                ()
                if operator is None
                else await self._invites_for_email(session, team_id, operator["email"], now)
            )
            registration_keys = await session.fetch(
                """SELECT id FROM registration_keys
                   WHERE team_id = $1 AND revoked_at IS NULL AND used_at IS NULL
                     AND expires_at > $3
                     AND (created_by = $2
                          OR created_by IN (SELECT id FROM api_keys
                                            WHERE team_id = $1 AND created_by = $2))""",
                team_id, operator_id, now,
            )  # fmt: skip
            api_keys = await session.fetch(
                """SELECT id FROM api_keys
                   WHERE team_id = $1 AND created_by = $2 AND revoked_at IS NULL""",
                team_id, operator_id,
            )  # fmt: skip
        return OperatorHoldings(
            api_keys=tuple(sorted(key["id"] for key in api_keys)),
            registration_keys=tuple(sorted(key["id"] for key in registration_keys)),
            invites=invites,
        )

    async def _invites_for_email(
        self, session: SqlSession, team_id: str, email: str, now: float
    ) -> tuple[str, ...]:
        # Compared with str.casefold, as the invite duplicate check does: SQL lower() leaves
        # non-ASCII letters (É) alone, so the filter cannot be in SQL.
        rows = await session.fetch(
            """SELECT id, email FROM invites
               WHERE team_id = $1 AND used_at IS NULL AND expires_at > $2""",
            team_id, now,
        )  # fmt: skip
        wanted = email.casefold()
        return tuple(sorted(row["id"] for row in rows if row["email"].casefold() == wanted))

    async def email_holders(
        self, team_id: str, email: str, now: float
    ) -> tuple[list[Operator], list[Invite]]:
        """The team's enabled operators and usable invites whose email is casefold-equal to
        ``email`` (all of them), oldest first."""
        async with self._transaction() as session:
            operators = await session.fetch(
                """SELECT * FROM operators WHERE team_id = $1 AND disabled_at IS NULL
                   ORDER BY created_at, id""",
                team_id,
            )  # fmt: skip
            invites = await session.fetch(
                """SELECT * FROM invites
                   WHERE team_id = $1 AND used_at IS NULL AND expires_at > $2
                   ORDER BY created_at, id""",
                team_id, now,
            )  # fmt: skip
        wanted = email.casefold()
        return (
            [_operator(row) for row in operators if row["email"].casefold() == wanted],
            [_invite(row) for row in invites if row["email"].casefold() == wanted],
        )

    async def revoke_operator_tokens(self, team_id: str, operator_id: str, now: float) -> Operator:
        """Kill every token issued to the operator before ``now`` (logout everywhere). NotFound."""
        row = await self._fetchrow(
            """UPDATE operators
               SET tokens_valid_after = CASE WHEN tokens_valid_after > $3
                                             THEN tokens_valid_after ELSE $3 END
               WHERE team_id = $1 AND id = $2 RETURNING *""",
            team_id, operator_id, now,
        )  # fmt: skip
        if row is None:
            raise NotFound("no such operator")
        return _operator(row)

    # ---- login challenges ----------------------------------------------------------------

    async def create_login_challenge(
        self,
        challenge_id: str,
        challenge: str,
        expires_at: float,
        now: float,
        subject: str | None = None,
    ) -> LoginChallenge:
        """Remember a login challenge until ``expires_at``. AlreadyExists on a repeated id."""
        await self._execute(
            """INSERT INTO login_challenges (id, challenge, subject, expires_at, created_at)
               VALUES ($1, $2, $3, $4, $5)""",
            challenge_id, challenge, subject, expires_at, now,
        )  # fmt: skip
        return LoginChallenge(challenge_id, challenge, subject, expires_at, now)

    async def consume_login_challenge(self, challenge_id: str, now: float) -> LoginChallenge:
        """Atomically delete and return the challenge; ChallengeUnusable if unknown/used/expired."""
        # The row is deleted even when expired, so a late answer also burns the challenge.
        row = await self._fetchrow(
            "DELETE FROM login_challenges WHERE id = $1 RETURNING *", challenge_id
        )
        if row is None:
            raise ChallengeUnusable(UnusableReason.UNKNOWN)
        challenge = LoginChallenge(
            row["id"], row["challenge"], row["subject"], row["expires_at"], row["created_at"]
        )
        if now >= challenge.expires_at:
            raise ChallengeUnusable(UnusableReason.EXPIRED)
        return challenge

    # ---- token revocation and replay ------------------------------------------------------

    async def revoke_token(self, team_id: str, jti: str, expires_at: float, now: float) -> None:
        """Add a token id to the revocation list until the token would expire anyway."""
        await self._execute(
            """INSERT INTO revoked_tokens (jti, team_id, expires_at, revoked_at)
               VALUES ($1, $2, $3, $4) ON CONFLICT (jti, team_id) DO NOTHING""",
            jti, team_id, expires_at, now,
        )  # fmt: skip

    async def is_token_revoked(self, jti: str, team_id: str | None = None) -> bool:
        """True if this token id was revoked (by ``team_id``, when given)."""
        row = await self._read_fetchrow(
            """SELECT 1 FROM revoked_tokens
               WHERE jti = $1 AND (CAST($2 AS TEXT) IS NULL OR team_id = CAST($2 AS TEXT))
               LIMIT 1""",
            jti, team_id,
        )  # fmt: skip
        return row is not None

    async def token_holder(self, team_id: str, operator_id: str, jti: str) -> TokenHolder:
        """The token's operator (None if not in ``team_id``) and whether ``jti`` was revoked."""
        row = await self._read_fetchrow(_HOLDER_QUERY, team_id, operator_id, jti)
        if row is None:
            raise StoreError("the token holder query returned no row")
        return _token_holder(row)

    async def token_holder_and_agent_listing(
        self, team_id: str, operator_id: str, jti: str, query: AgentQuery = EVERY_AGENT
    ) -> tuple[TokenHolder, AgentListing]:
        """``token_holder`` and ``agent_listing(team_id, query)`` answered by one query."""
        sql, values = _agent_listing_statement(
            query, with_holder=True, carries_tags=self._agent_carries_tags,
            page_apart=self._agent_page_apart
        )  # fmt: skip
        rows = await self._read_fetch(sql, team_id, operator_id, jti, *values)
        if not rows:
            raise StoreError("the token holder query returned no row")
        return _token_holder(rows[0]), _agent_listing(rows, query.limit)

    async def remember_nonce(self, scope: str, nonce: str, expires_at: float, now: float) -> bool:
        """Atomically record ``(scope, nonce)``; False if it is already remembered and unexpired."""
        # An expired row is overwritten in place, so a stale entry never blocks a fresh use.
        row = await self._fetchrow(
            """INSERT INTO seen_nonces (scope, nonce, expires_at) VALUES ($1, $2, $3)
               ON CONFLICT (scope, nonce) DO UPDATE SET expires_at = excluded.expires_at
               WHERE seen_nonces.expires_at <= $4
               RETURNING scope""",
            scope, nonce, expires_at, now,
        )  # fmt: skip
        return row is not None

    async def prune_expired(self, now: float) -> int:
        """Delete expired nonces, challenges, revocations and stale connections; count them."""
        async with self._transaction() as session:
            removed = await session.execute("DELETE FROM seen_nonces WHERE expires_at <= $1", now)
            removed += await session.execute(
                "DELETE FROM login_challenges WHERE expires_at <= $1", now
            )
            removed += await session.execute(
                "DELETE FROM revoked_tokens WHERE expires_at <= $1", now
            )
            removed += await session.execute(
                "DELETE FROM agent_connections WHERE heartbeat_at <= $1",
                now - CONNECTION_STALE_AFTER_SECONDS,
            )
        return removed

    async def prunable_history(self, team_id: str, before: float) -> PrunedHistory:
        """How many of the team's history rows ``prune_history`` would delete in all."""
        approvals = await self._read_fetchrow(
            f"SELECT COUNT(*) AS n FROM approval_requests WHERE {_SETTLED_APPROVALS}",  # noqa: S608
            team_id, before,
        )  # fmt: skip
        sessions = await self._read_fetchrow(
            f"""SELECT COUNT(*) AS n FROM sessions
                WHERE {_FINISHED_SESSIONS} AND id NOT IN ({_SESSIONS_NAMED_BY_KEPT_APPROVALS})""",  # noqa: S608, E501
            team_id, before,
        )  # fmt: skip
        return PrunedHistory(
            sessions=int(sessions["n"]) if sessions else 0,
            approval_requests=int(approvals["n"]) if approvals else 0,
        )

    async def prune_history(self, team_id: str, before: float, limit: int) -> PrunedHistory:
        """Delete up to ``limit`` settled approval requests and ``limit`` finished sessions of
        the team that last changed before ``before`` (never a session a request that stays
        names); count them."""
        if limit <= 0:
            raise InvalidArgument("a prune batch deletes at least one row")
        async with self._transaction() as session:
            approvals = await session.execute(
                _PRUNE_APPROVALS_BATCH, team_id, before, limit,
            )  # fmt: skip
            sessions = await session.execute(
                _PRUNE_SESSIONS_BATCH, team_id, before, limit,
            )  # fmt: skip
        return PrunedHistory(sessions=sessions, approval_requests=approvals)

    async def probe_writes(self, scope: str, key: str) -> None:
        """Insert and delete, in one transaction, a seen_nonces row of ``_write_probe_bytes``
        random bytes: it needs new pages (journal, WAL), which a full disk refuses."""
        payload = key + "_" + secrets.token_hex(self._write_probe_bytes // 2)
        async with self._transaction() as session:
            await session.execute(
                "INSERT INTO seen_nonces (scope, nonce, expires_at) VALUES ($1, $2, 0)",
                scope, payload,
            )  # fmt: skip
            await session.execute(
                "DELETE FROM seen_nonces WHERE scope = $1 AND nonce = $2", scope, payload
            )

    # ---- API keys ------------------------------------------------------------------------

    async def create_api_key(
        self,
        team_id: str,
        name: str,
        scopes: Sequence[str],
        key_hash: bytes,
        created_by: str,
        now: float,
    ) -> ApiKey:
        """Store a new API key (hashed). NotFound if the team does not exist."""
        _check_text("API key name", name, MAX_NAME_LENGTH)
        scope_list = _check_labels("scopes", scopes, MAX_SCOPES)
        api_key = ApiKey(
            id=new_id("ak"), team_id=team_id, name=name, scopes=scope_list,
            created_by=created_by, created_at=now, revoked_at=None,
        )  # fmt: skip
        async with self._transaction() as session:
            await self._require_team(session, team_id)
            await session.execute(
                """INSERT INTO api_keys (id, team_id, name, scopes, key_hash, created_by,
                                         created_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7)""",
                api_key.id, team_id, name, json.dumps(list(scope_list)), bytes(key_hash),
                created_by, now,
            )  # fmt: skip
        return api_key

    async def get_api_key_by_hash(self, key_hash: bytes) -> ApiKey | None:
        """The API key with this hash (revoked ones too: check ``is_active``), or None."""
        # Checked at use as well as revoked at the disable: a key its creator made while being
        # disabled (authenticated just before the disable committed) dies all the same.
        row = await self._read_fetchrow(
            """SELECT k.id, k.team_id, k.name, k.scopes, k.created_by, k.created_at,
                      COALESCE(k.revoked_at, o.disabled_at) AS revoked_at
               FROM api_keys k
               LEFT JOIN operators o ON o.team_id = k.team_id AND o.id = k.created_by
               WHERE k.key_hash = $1""",
            bytes(key_hash),
        )  # fmt: skip
        return _api_key(row) if row else None

    async def list_api_keys(self, team_id: str) -> list[ApiKey]:
        """The team's API keys, newest first; one whose creator is disabled reads as revoked
        (as at use: get_api_key_by_hash)."""
        rows = await self._fetch(
            """SELECT k.id, k.team_id, k.name, k.scopes, k.created_by, k.created_at,
                      COALESCE(k.revoked_at, o.disabled_at) AS revoked_at
               FROM api_keys k
               LEFT JOIN operators o ON o.team_id = k.team_id AND o.id = k.created_by
               WHERE k.team_id = $1 ORDER BY k.created_at DESC, k.id""",
            team_id,
        )  # fmt: skip
        return [_api_key(row) for row in rows]

    async def revoke_api_key(self, team_id: str, api_key_id: str, now: float) -> ApiKey:
        """Revoke the key (idempotent: keeps the first revocation time). NotFound."""
        row = await self._fetchrow(
            """UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $3)
               WHERE team_id = $1 AND id = $2 RETURNING *""",
            team_id, api_key_id, now,
        )  # fmt: skip
        if row is None:
            raise NotFound("no such API key")
        return _api_key(row)

    # ---- registration keys and agents ----------------------------------------------------

    async def create_registration_key(
        self,
        team_id: str,
        key_hash: bytes,
        tags: Sequence[str],
        expires_at: float,
        created_by: str,
        now: float,
    ) -> RegistrationKey:
        """Store a new single-use registration key (hashed). NotFound if no such team."""
        tag_list = _check_labels("tags", tags, MAX_TAGS)
        key = RegistrationKey(
            id=new_id("rk"), team_id=team_id, tags=tag_list, expires_at=expires_at,
            created_by=created_by, created_at=now, used_at=None, used_by_agent=None,
            revoked_at=None,
        )  # fmt: skip
        async with self._transaction() as session:
            await self._require_team(session, team_id)
            await session.execute(
                """INSERT INTO registration_keys (id, team_id, key_hash, tags, expires_at,
                                                  created_by, created_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7)""",
                key.id, team_id, bytes(key_hash), json.dumps(list(tag_list)), expires_at,
                created_by, now,
            )  # fmt: skip
        return key

    async def get_registration_key(self, team_id: str, key_id: str) -> RegistrationKey | None:
        """The team's registration key with this public id, or None."""
        row = await self._fetchrow(
            "SELECT * FROM registration_keys WHERE team_id = $1 AND id = $2", team_id, key_id
        )
        return _registration_key(row) if row else None

    async def list_registration_keys(self, team_id: str) -> list[RegistrationKey]:
        """The team's registration keys, newest first; an unused one whose creator (directly
        or through its API key) is disabled reads as revoked, as it is refused at use."""
        rows = await self._fetch(
            f"""SELECT id, team_id, tags, expires_at, created_by, created_at, used_at,
                       used_by_agent,
                       COALESCE(revoked_at, CASE WHEN used_at IS NULL
                                                 THEN {_CREATOR_DISABLED_AT} END) AS revoked_at
                FROM registration_keys WHERE team_id = $1 ORDER BY created_at DESC, id""",  # noqa: S608 - a constant, no input
            team_id,
        )  # fmt: skip
        return [_registration_key(row) for row in rows]

    async def revoke_registration_key(
        self, team_id: str, key_id: str, now: float
    ) -> RegistrationKey:
        """Revoke the key (idempotent: keeps the first revocation time). NotFound."""
        row = await self._fetchrow(
            """UPDATE registration_keys SET revoked_at = COALESCE(revoked_at, $3)
               WHERE team_id = $1 AND id = $2 RETURNING *""",
            team_id, key_id, now,
        )  # fmt: skip
        if row is None:
            raise NotFound("no such registration key")
        return _registration_key(row)

    async def register_agent(
        self,
        key_hash: bytes,
        now: float,
        public_key: bytes,
        key_fingerprint: str,
        machine_fingerprint: str,
        hostname: str,
        name: str,
        expected_team_id: str | None = None,
    ) -> tuple[Agent, RegistrationKey]:
        """In one transaction: check the key is usable, mark it used, create the agent."""
        _check_text("agent name", name, MAX_NAME_LENGTH)
        _check_text("hostname", hostname, MAX_NAME_LENGTH)
        agent_id = new_id("agt")
        key_hash = bytes(key_hash)
        async with self._transaction() as session:
            row = await session.fetchrow(
                f"""UPDATE registration_keys SET used_at = $2, used_by_agent = $3
                   WHERE key_hash = $1 AND used_at IS NULL AND revoked_at IS NULL
                         AND expires_at > $2
                         AND (CAST($4 AS TEXT) IS NULL OR team_id = CAST($4 AS TEXT))
                         AND NOT {_CREATOR_DISABLED}
                   RETURNING *""",  # noqa: S608 - a constant, no input
                key_hash, now, agent_id, expected_team_id,
            )  # fmt: skip
            if row is None:
                raise RegistrationKeyUnusable(
                    await self._registration_refusal(session, key_hash, now, expected_team_id)
                )
            key = _registration_key(row)
            agent = _new_agent(
                agent_id, key, name, hostname, public_key, key_fingerprint, machine_fingerprint,
                now,
            )  # fmt: skip
            try:
                await session.execute(
                    """INSERT INTO agents (id, team_id, name, hostname, tags, public_key,
                                           key_fingerprint, machine_fingerprint,
                                           registration_key_id, registered_at)
                       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)""",
                    agent.id, agent.team_id, name, hostname, json.dumps(list(agent.tags)),
                    agent.public_key, key_fingerprint, machine_fingerprint, key.id, now,
                )  # fmt: skip
            except AlreadyExists:
                raise AlreadyExists("an agent with this public key is already registered") from None
        return agent, key

    async def _registration_refusal(
        self, session: SqlSession, key_hash: bytes, now: float, expected_team_id: str | None
    ) -> UnusableReason:
        row = await session.fetchrow(
            "SELECT * FROM registration_keys WHERE key_hash = $1", key_hash
        )
        if row is None:
            return UnusableReason.UNKNOWN
        key = _registration_key(row)
        if expected_team_id is not None and key.team_id != expected_team_id:
            return UnusableReason.UNKNOWN
        creator_disabled = await session.fetchrow(
            f"SELECT 1 AS disabled FROM registration_keys WHERE key_hash = $1 "  # noqa: S608
            f"AND {_CREATOR_DISABLED}",
            key_hash,
        )
        if creator_disabled is not None and key.unusable_reason(now) is None:
            return UnusableReason.REVOKED
        # Nothing else can make the conditional update miss; USED covers a lost race.
        return key.unusable_reason(now) or UnusableReason.USED

    async def get_agent(
        self, team_id: str, agent_id: str, *, include_removed: bool = False
    ) -> Agent | None:
        """The team's agent with this id, or None (also for a removed one, unless
        ``include_removed``)."""
        row = await self._read_fetchrow(
            f"""SELECT {_AGENT_COLUMNS} FROM agents a
                WHERE a.team_id = $1 AND a.id = $2
                  AND (a.removed_at IS NULL OR $3)""",  # noqa: S608
            team_id, agent_id, include_removed,
        )  # fmt: skip
        return _agent(row) if row else None

    async def get_agent_by_public_key(self, public_key: bytes) -> Agent | None:
        """The agent holding this public key (any team), or None."""
        row = await self._fetchrow(
            f"SELECT {_AGENT_COLUMNS} FROM agents a WHERE a.public_key = $1",  # noqa: S608
            bytes(public_key),
        )
        return _agent(row) if row else None

    async def find_agent(self, team_id: str, name_or_id: str) -> Agent | None:
        """The team's agent by id, else by unique name; None; AmbiguousName if several match."""
        by_id = await self.get_agent(team_id, name_or_id)
        if by_id is not None:
            return by_id
        rows = await self._fetch(
            f"""SELECT {_AGENT_COLUMNS} FROM agents a
                WHERE a.team_id = $1 AND a.name = $2 AND a.removed_at IS NULL
                ORDER BY a.id LIMIT 2""",  # noqa: S608
            team_id, name_or_id,
        )  # fmt: skip
        if len(rows) > 1:
            raise AmbiguousName(f"several agents are named {name_or_id!r}; use the agent id")
        return _agent(rows[0]) if rows else None

    async def agents_matching(self, team_id: str, name_or_id: str) -> list[Agent]:
        """The team's agents, removed ones too, with this id or name: current ones first."""
        rows = await self._read_fetch(
            f"""SELECT {_AGENT_COLUMNS} FROM agents a
                WHERE a.team_id = $1 AND (a.id = $2 OR a.name = $2)
                ORDER BY a.removed_at IS NOT NULL, a.id LIMIT $3""",  # noqa: S608
            team_id, name_or_id, MAX_MATCHES,
        )  # fmt: skip
        return [_agent(row) for row in rows]

    async def list_agents(self, team_id: str) -> list[Agent]:
        """The team's agents, ordered by name then id."""
        rows = await self._read_fetch(
            f"SELECT {_AGENT_COLUMNS} FROM agents a "  # noqa: S608
            "WHERE a.team_id = $1 AND a.removed_at IS NULL ORDER BY a.name, a.id",
            team_id,
        )
        return [_agent(row) for row in rows]

    async def agent_listing(self, team_id: str, query: AgentQuery = EVERY_AGENT) -> AgentListing:
        """The team's agents ``query`` selects, ordered by name then id, and its newest policy
        version, in one query."""
        sql, values = _agent_listing_statement(
            query, with_holder=False, carries_tags=self._agent_carries_tags,
            page_apart=self._agent_page_apart
        )  # fmt: skip
        return _agent_listing(await self._read_fetch(sql, team_id, *values), query.limit)

    async def set_agent_tags(
        self,
        team_id: str,
        agent_id: str,
        tags: Sequence[str],
        *,
        expected: Sequence[str] | None = None,
    ) -> Agent:
        """Replace the tags of a (not removed) agent of the team. NotFound; with ``expected``,
        TagsChanged (and nothing written) unless those are its tags now."""
        tag_list = _check_labels("tags", tags, MAX_TAGS)
        async with self._transaction() as session:
            if expected is not None:
                # The no-op UPDATE takes the row lock (SQLite: BEGIN IMMEDIATE has every writer
                # wait), so the tags compared below are still the row's when it is written.
                await session.execute(
                    "UPDATE agents SET tags = tags WHERE team_id = $1 AND id = $2",
                    team_id, agent_id,
                )  # fmt: skip
                current = await session.fetchrow(
                    """SELECT tags FROM agents
                       WHERE team_id = $1 AND id = $2 AND removed_at IS NULL""",
                    team_id, agent_id,
                )  # fmt: skip
                if current is None:
                    raise NotFound("no such agent")
                now_tags = tuple(json.loads(current["tags"]))
                if now_tags != tuple(expected):
                    raise TagsChanged(now_tags)
            updated = await session.execute(
                """UPDATE agents SET tags = $3
                   WHERE team_id = $1 AND id = $2 AND removed_at IS NULL""",
                team_id, agent_id, json.dumps(list(tag_list)),
            )  # fmt: skip
            if not updated:
                raise NotFound("no such agent")
            row = await session.fetchrow(
                f"SELECT {_AGENT_COLUMNS} FROM agents a WHERE a.team_id = $1 AND a.id = $2",  # noqa: S608
                team_id, agent_id,
            )  # fmt: skip
        if row is None:
            raise NotFound("no such agent")
        return _agent(row)

    async def remove_agent(
        self, team_id: str, agent_id: str, now: float
    ) -> tuple[Agent, list[AgentConnection]]:
        """Mark the agent removed (keeping the first time) and forget its live connections, in
        one transaction; the removed agent and the connections forgotten. NotFound."""
        async with self._transaction() as session:
            # The row lock (SQLite's write lock) orders this against mark_agent_connected, whose
            # UPDATE skips removed agents: no connection is recorded after this commits.
            updated = await session.execute(
                """UPDATE agents SET removed_at = COALESCE(removed_at, $3)
                   WHERE team_id = $1 AND id = $2""",
                team_id, agent_id, now,
            )  # fmt: skip
            if not updated:
                raise NotFound("no such agent")
            forgotten = await session.fetch(
                """DELETE FROM agent_connections WHERE team_id = $1 AND agent_id = $2
                   RETURNING *""",
                team_id, agent_id,
            )  # fmt: skip
            row = await session.fetchrow(
                f"SELECT {_AGENT_COLUMNS} FROM agents a WHERE a.team_id = $1 AND a.id = $2",  # noqa: S608
                team_id, agent_id,
            )  # fmt: skip
        if row is None:
            raise NotFound("no such agent")
        connections = sorted(
            (_connection(forgotten_row) for forgotten_row in forgotten),
            key=lambda connection: (connection.connected_at, connection.connection_id),
        )
        return _agent(row), connections

    async def mark_agent_connected(
        self,
        team_id: str,
        agent_id: str,
        instance_id: str,
        connection_id: str,
        machine_fingerprint: str,
        now: float,
        replaces: str | None = None,
    ) -> ConnectionReport:
        """Record a live control connection and report clone signs. NotFound if no such agent.

        ``replaces``: the agent's own earlier connection (same team, agent and machine
        fingerprint), removed rather than reported; anything else it names stays.
        """
        async with self._transaction() as session:
            agent_row = await session.fetchrow(
                "UPDATE agents SET last_seen_at = $3 "
                "WHERE team_id = $1 AND id = $2 AND removed_at IS NULL "
                "RETURNING machine_fingerprint",
                team_id, agent_id, now,
            )  # fmt: skip
            if agent_row is None:
                raise NotFound("no such agent")
            # A connection silent this long belongs to an instance that died without clearing it.
            await session.execute(
                """DELETE FROM agent_connections
                   WHERE team_id = $1 AND agent_id = $2 AND heartbeat_at <= $3""",
                team_id, agent_id, now - CONNECTION_STALE_AFTER_SECONDS,
            )  # fmt: skip
            superseded = None
            if replaces is not None:
                # A reconnect after a silent drop names the connection the agent last held: the
                # rendezvous may not have noticed it is dead yet. Only the agent's own goes.
                superseded = await session.fetchrow(
                    """DELETE FROM agent_connections
                       WHERE team_id = $1 AND agent_id = $2 AND connection_id = $3
                         AND machine_fingerprint = $4
                       RETURNING *""",
                    team_id, agent_id, replaces, machine_fingerprint,
                )  # fmt: skip
            others = await session.fetch(
                """SELECT * FROM agent_connections
                   WHERE team_id = $1 AND agent_id = $2 AND connection_id <> $3
                   ORDER BY connected_at, connection_id""",
                team_id, agent_id, connection_id,
            )  # fmt: skip
            await session.execute(
                """INSERT INTO agent_connections (connection_id, agent_id, team_id, instance_id,
                                                  machine_fingerprint, connected_at, heartbeat_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $6)""",
                connection_id, agent_id, team_id, instance_id, machine_fingerprint, now,
            )  # fmt: skip
        registered = str(agent_row["machine_fingerprint"])
        return ConnectionReport(
            other_connections=tuple(_connection(row) for row in others),
            fingerprint_mismatch=registered != machine_fingerprint,
            registered_fingerprint=registered,
            presented_fingerprint=machine_fingerprint,
            superseded=None if superseded is None else _connection(superseded),
        )

    async def mark_agent_disconnected(
        self, team_id: str, agent_id: str, connection_id: str, now: float
    ) -> None:
        """Forget the connection and update last-seen. Idempotent."""
        async with self._transaction() as session:
            await session.execute(
                """DELETE FROM agent_connections
                   WHERE team_id = $1 AND agent_id = $2 AND connection_id = $3""",
                team_id, agent_id, connection_id,
            )  # fmt: skip
            await _touch(session, team_id, agent_id, now)

    async def touch_agent(
        self, team_id: str, agent_id: str, now: float, connection_id: str | None = None
    ) -> bool:
        """Update last-seen and the heartbeat of one connection (or, without an id, all).

        True if that connection (without an id: any of the agent's) is still recorded.
        """
        async with self._transaction() as session:
            await _touch(session, team_id, agent_id, now)
            touched = await session.execute(
                """UPDATE agent_connections SET heartbeat_at = $3
                   WHERE team_id = $1 AND agent_id = $2 AND heartbeat_at < $3
                     AND (CAST($4 AS TEXT) IS NULL OR connection_id = CAST($4 AS TEXT))""",
                team_id, agent_id, now, connection_id,
            )  # fmt: skip
            if touched:
                return True
            # Rare: nothing older than ``now`` to move forward; say whether the row is there.
            row = await session.fetchrow(
                """SELECT 1 AS present FROM agent_connections
                   WHERE team_id = $1 AND agent_id = $2
                     AND (CAST($3 AS TEXT) IS NULL OR connection_id = CAST($3 AS TEXT))""",
                team_id, agent_id, connection_id,
            )  # fmt: skip
            return row is not None

    async def list_agent_connections(self, team_id: str, agent_id: str) -> list[AgentConnection]:
        """The agent's live control connections, oldest first."""
        rows = await self._fetch(
            """SELECT * FROM agent_connections WHERE team_id = $1 AND agent_id = $2
               ORDER BY connected_at, connection_id""",
            team_id, agent_id,
        )  # fmt: skip
        return [_connection(row) for row in rows]

    async def clear_instance_connections(self, instance_id: str, now: float) -> int:
        """Forget every connection held by an instance (call at its start-up and shutdown)."""
        return await self._clear_connections("instance_id = $1", instance_id, now)

    async def clear_other_instances_connections(self, instance_id: str, now: float) -> int:
        """Forget every connection held by any other instance (only when no other can be live)."""
        return await self._clear_connections("instance_id <> $1", instance_id, now)

    async def _clear_connections(self, holders: str, instance_id: str, now: float) -> int:
        async with self._transaction() as session:
            # Keep what we knew: everyone these connections held was last seen no earlier than now.
            await session.execute(
                f"""UPDATE agents SET last_seen_at = $2
                    WHERE id IN (SELECT agent_id FROM agent_connections WHERE {holders})
                      AND (last_seen_at IS NULL OR last_seen_at < $2)""",  # noqa: S608
                instance_id, now,
            )  # fmt: skip
            return await session.execute(
                f"DELETE FROM agent_connections WHERE {holders}",  # noqa: S608
                instance_id,
            )

    # ---- sessions ------------------------------------------------------------------------

    async def create_session(self, session: Session) -> Session:
        """Store a new session row. NotFound unless the agent exists in the session's team."""
        _check_text("session id", session.id, MAX_NAME_LENGTH)
        command = None if session.command is None else json.dumps(list(session.command))
        async with self._transaction() as session_sql:
            # A no-op UPDATE, not a SELECT: it takes the agent's row lock (SQLite: BEGIN
            # IMMEDIATE queues every writer), so a removal committing meanwhile is seen here,
            # and one waiting on the lock lists this session once it has committed.
            agent = await session_sql.fetchrow(
                """UPDATE agents SET removed_at = removed_at
                   WHERE team_id = $1 AND id = $2 AND removed_at IS NULL RETURNING id""",
                session.team_id, session.agent_id,
            )  # fmt: skip
            if agent is None:
                raise NotFound("no such agent")
            await session_sql.execute(
                """INSERT INTO sessions (id, team_id, agent_id, operator_id,
                                         operator_key_thumbprint, mode, command, relay_id,
                                         relay_host, relay_port, relay_udp_port, policy_result,
                                         policy_rule_id, state, state_reason, created_at,
                                         expires_at, updated_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
                           $16, $17, $18)""",
                session.id, session.team_id, session.agent_id, session.operator_id,
                session.operator_key_thumbprint, session.mode, command, session.relay_id,
                session.relay_host, session.relay_port, session.relay_udp_port,
                session.policy_result, session.policy_rule_id, session.state.value,
                session.state_reason, session.created_at, session.expires_at, session.updated_at,
            )  # fmt: skip
        return session

    async def claim_session_end(
        self, team_id: str, agent_id: str, session_id: str, live_after: float, until: float
    ) -> Session | None:
        """Claim the ending of the agent's open session until ``until`` unless a claim is live
        (one conditional UPDATE: of two claims at once exactly one matches)."""
        row = await self._fetchrow(
            """UPDATE sessions SET updated_at = $5
               WHERE team_id = $1 AND agent_id = $2 AND id = $3
                 AND state IN ('offered', 'accepted') AND updated_at <= $4
               RETURNING *""",
            team_id, agent_id, session_id, live_after, until,
        )  # fmt: skip
        return _session(row) if row else None

    async def release_session_end(
        self, team_id: str, agent_id: str, session_id: str, claim: float, now: float
    ) -> None:
        """Give up a claim that did not end the session, if it is still the row's."""
        await self._execute(
            """UPDATE sessions SET updated_at = $5
               WHERE team_id = $1 AND agent_id = $2 AND id = $3 AND updated_at = $4
                 AND state IN ('offered', 'accepted')""",
            team_id, agent_id, session_id, claim, now,
        )  # fmt: skip

    async def ended_sessions_among(
        self, team_id: str, agent_id: str, session_ids: Sequence[str], reasons: Sequence[str]
    ) -> list[Session]:
        """The agent's sessions among ``session_ids`` ended with one of ``reasons``."""
        ids, wanted = list(dict.fromkeys(session_ids)), list(dict.fromkeys(reasons))
        if not ids or not wanted:
            return []
        # Numbered placeholders only are spliced in; the values are parameters.
        id_marks = ", ".join(f"${4 + index}" for index in range(len(ids)))
        reason_marks = ", ".join(f"${4 + len(ids) + index}" for index in range(len(wanted)))
        rows = await self._read_fetch(
            f"""SELECT * FROM sessions
                WHERE team_id = $1 AND agent_id = $2 AND state = $3
                  AND id IN ({id_marks}) AND state_reason IN ({reason_marks})""",  # noqa: S608
            team_id, agent_id, SessionState.ENDED.value, *ids, *wanted,
        )  # fmt: skip
        return [_session(row) for row in rows]

    async def get_session(self, team_id: str, session_id: str) -> Session | None:
        """The team's session with this id, or None."""
        row = await self._fetchrow(
            "SELECT * FROM sessions WHERE team_id = $1 AND id = $2", team_id, session_id
        )
        return _session(row) if row else None

    async def listed_session(self, team_id: str, session_id: str) -> ListedSession | None:
        """The team's session with this id with its agent's name and operator's email, in one
        query; or None."""
        row = await self._read_fetchrow(
            f"{_LISTED_SESSIONS} WHERE s.team_id = $1 AND s.id = $2",  # noqa: S608 - constant
            team_id, session_id,
        )  # fmt: skip
        return _listed_session(row) if row else None

    async def open_sessions_of_absent_agents(
        self, offline_before: float, limit: int
    ) -> list[Session]:
        """Open sessions whose agent is offline and was last seen before ``offline_before``."""
        rows = await self._read_fetch(_OPEN_SESSIONS_OF_ABSENT_AGENTS, offline_before, limit)
        return [_session(row) for row in rows]

    async def open_sessions_of_disabled_operators(
        self, instance_id: str, limit: int, *, after: tuple[str, str] | None = None
    ) -> list[Session]:
        """Open sessions of disabled operators on agents whose channel ``instance_id`` holds,
        in (team id, session id) order from just past ``after``."""
        after_team, after_id = after if after is not None else ("", "")
        rows = await self._read_fetch(
            _OPEN_SESSIONS_OF_DISABLED_OPERATORS, instance_id, after_team, after_id, limit
        )
        return [_session(row) for row in rows]

    async def session_listing(
        self, team_id: str, query: SessionQuery = EVERY_SESSION
    ) -> SessionListing:
        """The team's sessions ``query`` selects, newest first, with agent names and operator
        emails, in one query."""
        sql, values = _session_listing_statement(query)
        rows = await self._read_fetch(sql, team_id, *values)
        sessions = [_listed_session(row) for row in rows]
        more = query.limit is not None and len(sessions) > query.limit
        if more:
            del sessions[query.limit :]
        return SessionListing(sessions=sessions, more=more)

    async def update_session_state(
        self,
        team_id: str,
        agent_id: str,
        session_id: str,
        state: SessionState,
        reason: str | None,
        now: float,
        *,
        from_states: Sequence[SessionState],
        exit_code: int | None = None,
        exit_signal: str | None = None,
    ) -> Session | None:
        """Atomically move the agent's session to ``state`` if it is in one of ``from_states``
        (with how its command ended, if given)."""
        if not from_states:
            return None
        if exit_code is not None and (type(exit_code) is not int or not 0 <= exit_code <= 255):
            raise InvalidArgument("an exit code is a whole number of 0..255")
        if exit_signal is not None:
            _check_text("exit signal", exit_signal, MAX_SIGNAL_NAME_LENGTH)
        # Placeholders for the allowed states only (their values are passed as parameters).
        allowed = ", ".join(f"${9 + index}" for index in range(len(from_states)))
        # Between open states (an offer accepted) a later updated_at stays: it is a live
        # claim_session_end claim, which a second end of the session must still see.
        row = await self._fetchrow(
            f"""UPDATE sessions SET state = $4, state_reason = $5,
                                    updated_at = CASE
                                        WHEN $4 IN ('offered', 'accepted') AND updated_at > $6
                                        THEN updated_at ELSE $6 END,
                                    exit_code = $7, exit_signal = $8
                WHERE team_id = $1 AND agent_id = $2 AND id = $3
                  AND state IN ({allowed})
                RETURNING *""",  # noqa: S608 - only numbered placeholders are spliced in
            team_id, agent_id, session_id, SessionState(state).value,
            None if reason is None else reason[:MAX_NAME_LENGTH], now, exit_code, exit_signal,
            *(SessionState(value).value for value in from_states),
        )  # fmt: skip
        return _session(row) if row else None

    # ---- policy bundles ----------------------------------------------------------------------

    async def latest_policy_bundle(self, team_id: str) -> StoredPolicyBundle | None:
        """The team's newest policy bundle, or None if it never stored one (or only the mark
        of a retired chain)."""
        row = await self._read_fetchrow(
            "SELECT * FROM policy_bundles WHERE team_id = $1 ORDER BY version DESC LIMIT 1",
            team_id,
        )
        if not row or row["bundle"] == _RETIRED_CHAIN_MARK:
            return None
        return _policy_bundle(row)

    async def newest_policy_version(self, team_id: str) -> int:
        """The highest version the team ever stored, a retired chain's included (0: none)."""
        row = await self._read_fetchrow(
            "SELECT COALESCE(MAX(version), 0) AS newest FROM policy_bundles WHERE team_id = $1",
            team_id,
        )
        return int(row["newest"]) if row else 0

    async def store_policy_bundle(self, bundle: StoredPolicyBundle) -> StoredPolicyBundle:
        """Store the next version atomically: AlreadyExists unless it is exactly newest + 1."""
        async with self._transaction() as session:
            await self._require_team(session, bundle.team_id)
            row = await session.fetchrow(
                "SELECT COALESCE(MAX(version), 0) AS newest FROM policy_bundles "
                "WHERE team_id = $1",
                bundle.team_id,
            )
            newest = int(row["newest"]) if row else 0
            if bundle.version != newest + 1:
                raise AlreadyExists(
                    f"the team's policy is at version {newest}; the next one must be {newest + 1}"
                )
            # The primary key (team_id, version) settles a race between two instances.
            await session.execute(
                """INSERT INTO policy_bundles (team_id, version, content_sha256, policy_sha256,
                                               bundle, admin_key_id, created_by, created_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
                bundle.team_id, bundle.version, bundle.content_sha256, bundle.policy_sha256,
                bundle.bundle, bundle.admin_key_id, bundle.created_by, bundle.created_at,
            )  # fmt: skip
        return bundle

    async def retire_policy_bundles(self, team_id: str, now: float) -> int:
        """Delete the team's bundles, leaving in the last one's place the mark of a retired
        chain (its version and hashes, no bundle): the next version stays last + 1."""
        async with self._transaction() as session:
            await self._require_team(session, team_id)
            last = await session.fetchrow(
                "SELECT * FROM policy_bundles WHERE team_id = $1 ORDER BY version DESC LIMIT 1",
                team_id,
            )
            if not last or last["bundle"] == _RETIRED_CHAIN_MARK:
                return 0
            row = await session.fetchrow(
                "SELECT COUNT(*) AS bundles FROM policy_bundles WHERE team_id = $1", team_id
            )
            await session.execute("DELETE FROM policy_bundles WHERE team_id = $1", team_id)
            await session.execute(
                """INSERT INTO policy_bundles (team_id, version, content_sha256, policy_sha256,
                                               bundle, admin_key_id, created_by, created_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
                team_id, last["version"], last["content_sha256"], last["policy_sha256"],
                _RETIRED_CHAIN_MARK, last["admin_key_id"], _RETIRED_CHAIN_BY, now,
            )  # fmt: skip
        return int(row["bundles"]) if row else 0

    async def set_agent_policy_version(
        self, team_id: str, agent_id: str, version: int | None, refusal: str | None
    ) -> None:
        """Record the version the agent applied and why it refused a newer one (None: didn't)."""
        await self._execute(
            """UPDATE agents SET policy_version = $3, policy_refusal = $4
               WHERE team_id = $1 AND id = $2""",
            team_id, agent_id, version, None if refusal is None else refusal[:MAX_NAME_LENGTH],
        )  # fmt: skip

    # ---- approval requests -------------------------------------------------------------------

    async def create_approval_request(
        self, request: ApprovalRequest, *, max_pending: int | None = None
    ) -> ApprovalRequest:
        """Store a new parked request. NotFound unless the agent exists in its team; with
        ``max_pending``, TooManyPendingRequests if the requester has that many waiting."""
        _check_text("approval request id", request.id, MAX_NAME_LENGTH)
        command = None if request.command is None else json.dumps(list(request.command))
        async with self._transaction() as session:
            if max_pending is not None:
                # The team row's lock queues the team's concurrent requests (PostgreSQL; SQLite's
                # BEGIN IMMEDIATE queues every writer), so the count below holds until commit.
                await session.execute(
                    "UPDATE teams SET name = name WHERE id = $1", request.team_id
                )
                waiting = await session.fetchrow(
                    """SELECT COUNT(*) AS pending FROM approval_requests
                       WHERE team_id = $1 AND requester_id = $2
                         AND state IN ('pending', 'recording') AND expires_at > $3""",
                    request.team_id, request.requester_id, request.created_at,
                )  # fmt: skip
                pending = int(waiting["pending"]) if waiting else 0
                if pending >= max_pending:
                    raise TooManyPendingRequests(pending)
            agent = await session.fetchrow(
                "SELECT id FROM agents WHERE team_id = $1 AND id = $2 AND removed_at IS NULL",
                request.team_id, request.agent_id,
            )  # fmt: skip
            if agent is None:
                raise NotFound("no such agent")
            await session.execute(
                """INSERT INTO approval_requests (id, team_id, agent_id, requester_id,
                                                  requester_email, requester_thumbprint, mode,
                                                  command, command_sha256, policy_version,
                                                  rule_id, reason, state, created_at, expires_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)""",
                request.id, request.team_id, request.agent_id, request.requester_id,
                request.requester_email, request.requester_thumbprint, request.mode, command,
                request.command_sha256, request.policy_version, request.rule_id,
                request.reason[:MAX_NAME_LENGTH], request.state.value, request.created_at,
                request.expires_at,
            )  # fmt: skip
        return request

    async def publish_approval_request(
        self, team_id: str, request_id: str
    ) -> ApprovalRequest | None:
        """Atomically make a recording request pending; None if it is not recording."""
        row = await self._fetchrow(
            """UPDATE approval_requests SET state = 'pending'
               WHERE team_id = $1 AND id = $2 AND state = 'recording'
               RETURNING *""",
            team_id, request_id,
        )  # fmt: skip
        return _approval_request(row) if row else None

    async def withdraw_unrecorded_approval_request(
        self,
        team_id: str,
        request_id: str,
        *,
        decided_by: str,
        decided_by_email: str,
        reason: str,
        now: float,
    ) -> ApprovalRequest | None:
        """Atomically withdraw a recording request; None if it is not recording."""
        row = await self._fetchrow(
            """UPDATE approval_requests
               SET state = 'withdrawn', decided_by = $3, decided_by_email = $4,
                   decision_reason = $5, decided_at = $6
               WHERE team_id = $1 AND id = $2 AND state = 'recording'
               RETURNING *""",
            team_id, request_id, decided_by, decided_by_email, reason[:MAX_NAME_LENGTH], now,
        )  # fmt: skip
        return _approval_request(row) if row else None

    async def get_approval_request(self, team_id: str, request_id: str) -> ApprovalRequest | None:
        """The team's approval request with this id, or None."""
        row = await self._fetchrow(
            "SELECT * FROM approval_requests WHERE team_id = $1 AND id = $2", team_id, request_id
        )
        return _approval_request(row) if row else None

    async def list_approval_requests(
        self, team_id: str, states: Sequence[ApprovalState]
    ) -> list[ApprovalRequest]:
        """The team's requests in one of ``states``, oldest first."""
        if not states:
            return []
        # Placeholders for the states only (their values are passed as parameters).
        wanted = ", ".join(f"${2 + index}" for index in range(len(states)))
        rows = await self._fetch(
            f"""SELECT * FROM approval_requests WHERE team_id = $1 AND state IN ({wanted})
                ORDER BY created_at, id""",  # noqa: S608 - only numbered placeholders are spliced
            team_id, *(ApprovalState(state).value for state in states),
        )  # fmt: skip
        return [_approval_request(row) for row in rows]

    async def count_pending_approval_requests(
        self, team_id: str, requester_id: str, now: float
    ) -> int:
        """How many of the team's requests by ``requester_id`` still wait for a decision."""
        row = await self._fetchrow(
            """SELECT COUNT(*) AS pending FROM approval_requests
               WHERE team_id = $1 AND requester_id = $2
                 AND state IN ('pending', 'recording') AND expires_at > $3""",
            team_id, requester_id, now,
        )  # fmt: skip
        return int(row["pending"]) if row else 0

    async def decide_approval_request(
        self,
        team_id: str,
        request_id: str,
        state: ApprovalState,
        *,
        decided_by: str,
        decided_by_email: str,
        reason: str | None,
        approval: str | None,
        now: float,
        expires_at: float | None = None,
    ) -> ApprovalRequest | None:
        """Atomically approve, deny or withdraw a pending, unexpired request; None if it is not
        one."""
        if state not in (ApprovalState.APPROVED, ApprovalState.DENIED, ApprovalState.WITHDRAWN):
            raise InvalidArgument("a decision approves, denies or withdraws")
        row = await self._fetchrow(
            """UPDATE approval_requests
               SET state = $3, decided_by = $4, decided_by_email = $5, decision_reason = $6,
                   approval = $7, decided_at = $8,
                   expires_at = COALESCE(CAST($9 AS DOUBLE PRECISION), expires_at)
               WHERE team_id = $1 AND id = $2 AND state = 'pending' AND expires_at > $8
               RETURNING *""",
            team_id, request_id, state.value, decided_by, decided_by_email,
            None if reason is None else reason[:MAX_NAME_LENGTH], approval, now, expires_at,
        )  # fmt: skip
        return _approval_request(row) if row else None

    async def expire_approval_request(
        self, team_id: str, request_id: str, now: float
    ) -> ApprovalRequest | None:
        """Atomically mark a pending or approved (unused) request past its time expired."""
        row = await self._fetchrow(
            """UPDATE approval_requests SET state = 'expired'
               WHERE team_id = $1 AND id = $2 AND state IN ('pending', 'approved')
                 AND expires_at <= $3
               RETURNING *""",
            team_id, request_id, now,
        )  # fmt: skip
        return _approval_request(row) if row else None

    async def execute_approval_request(
        self, team_id: str, request_id: str, session_id: str, now: float
    ) -> ApprovalRequest | None:
        """Atomically mark an approved request executed by ``session_id``; None if not approved."""
        row = await self._fetchrow(
            """UPDATE approval_requests SET state = 'executed', session_id = $3, executed_at = $4
               WHERE team_id = $1 AND id = $2 AND state = 'approved'
               RETURNING *""",
            team_id, request_id, session_id, now,
        )  # fmt: skip
        return _approval_request(row) if row else None

    # ---- service keys ------------------------------------------------------------------------

    async def pin_service_key_fingerprints(
        self, fingerprints: Mapping[str, str], now: float
    ) -> dict[str, str]:
        """Record the fingerprint of each role not recorded yet; return every recorded one."""
        async with self._transaction() as session:
            for role, fingerprint in sorted(fingerprints.items()):
                # The first writer wins a race between instances initialising at once.
                await session.execute(
                    """INSERT INTO service_key_fingerprints (role, fingerprint, recorded_at)
                       VALUES ($1, $2, $3) ON CONFLICT (role) DO NOTHING""",
                    role, fingerprint, now,
                )  # fmt: skip
            rows = await session.fetch("SELECT role, fingerprint FROM service_key_fingerprints")
        return {row["role"]: row["fingerprint"] for row in rows}

    async def service_key_fingerprints(self) -> dict[str, str]:
        """The service key fingerprints recorded in the database, by role (empty: none yet)."""
        rows = await self._fetch("SELECT role, fingerprint FROM service_key_fingerprints")
        return {row["role"]: row["fingerprint"] for row in rows}

    async def rotate_service_key(self, retired: RetiredServiceKey, now: float) -> bool:
        """In one transaction, pin ``retired.replaced_by`` for its role and keep ``retired``."""
        async with self._transaction() as session:
            changed = await session.execute(
                """UPDATE service_key_fingerprints SET fingerprint = $1, recorded_at = $2
                   WHERE role = $3 AND fingerprint = $4""",
                retired.replaced_by, now, retired.role, retired.fingerprint,
            )  # fmt: skip
            if changed != 1:
                return False
            await session.execute(
                """INSERT INTO retired_service_keys
                   (role, fingerprint, public_key, replaced_by, retired_at, accept_until,
                    statement)
                   VALUES ($1, $2, $3, $4, $5, $6, $7)""",
                retired.role, retired.fingerprint, retired.public_key, retired.replaced_by,
                retired.retired_at, retired.accept_until, retired.statement,
            )  # fmt: skip
        return True

    async def retired_service_keys(self) -> list[RetiredServiceKey]:
        """Every retired service key, oldest first."""
        rows = await self._fetch(
            """SELECT role, fingerprint, public_key, replaced_by, retired_at, accept_until,
                      statement
               FROM retired_service_keys ORDER BY retired_at, role, fingerprint"""
        )
        return [
            RetiredServiceKey(
                role=row["role"], fingerprint=row["fingerprint"], public_key=row["public_key"],
                replaced_by=row["replaced_by"], retired_at=row["retired_at"],
                accept_until=row["accept_until"], statement=row["statement"],
            )  # fmt: skip
            for row in rows
        ]


# Stores nothing unless seq is exactly the size it sees and (where the backend has turns) no
# other writer holds the team's turn; {turn_free} is the backend's condition for the latter.
_AUDIT_APPEND_SQL = """
    INSERT INTO audit_records (team_id, seq, time, record_hash, leaf_hash, canonical)
    SELECT $1, $2, $3, $4, $5, $6
    WHERE {turn_free}
      AND (SELECT COALESCE(MAX(seq) + 1, 0) FROM audit_records WHERE team_id = $1) = $2"""

# The same for an agent-signed event, which is also refused while the team holds its digest. The
# NOT EXISTS only saves a unique-index error (and, on PostgreSQL, an aborted writer turn) in the
# common case; the partial unique index audit_records_event_digest is what decides a race.
_AUDIT_APPEND_AGENT_EVENT_SQL = """
    INSERT INTO audit_records (team_id, seq, time, record_hash, leaf_hash, canonical, event_digest)
    SELECT $1, $2, $3, $4, $5, $6, $7
    WHERE {turn_free}
      AND (SELECT COALESCE(MAX(seq) + 1, 0) FROM audit_records WHERE team_id = $1) = $2
      AND NOT EXISTS (SELECT 1 FROM audit_records WHERE team_id = $1 AND event_digest = $7)"""


class SqlAuditStore:
    """The audit/store.py ``AuditStore`` interface on the rendezvous database.

    Bound to a session (see ``exclusive``), every statement runs on that session's connection.
    """

    def __init__(self, store: SqlStore, session: SqlSession | None = None) -> None:
        self._store = store
        self._session = session
        self._append_sql = _AUDIT_APPEND_SQL.replace("{turn_free}", store._audit_turn_free)
        self._append_agent_event_sql = _AUDIT_APPEND_AGENT_EVENT_SQL.replace(
            "{turn_free}", store._audit_turn_free
        )

    async def _fetch(self, sql: str, *args: Any) -> list[Row]:
        if self._session is not None:
            return await self._session.fetch(sql, *args)
        return await self._store._fetch(sql, *args)

    async def _fetchrow(self, sql: str, *args: Any) -> Row | None:
        rows = await self._fetch(sql, *args)
        return rows[0] if rows else None

    async def _execute(self, sql: str, *args: Any) -> int:
        if self._session is not None:
            return await self._session.execute(sql, *args)
        return await self._store._execute(sql, *args)

    @asynccontextmanager
    async def exclusive(self, team_id: str) -> AsyncIterator[SqlAuditStore]:
        """A view on one connection holding the team log's writer turn (see SqlStore)."""
        async with self._store._audit_writer_turn(team_id) as session:
            yield SqlAuditStore(self._store, session)

    async def append(self, team_id: str, record: StoredRecord) -> None:
        """Durably store ``record`` iff its seq is the team's current size, else AppendConflict;
        DuplicateEvent if the team already holds a record with its event digest."""
        # One conditional INSERT (one round trip, one commit); the (team_id, seq) key refuses a
        # concurrent twin, and for agent events the (team_id, event_digest) index a concurrent
        # copy of the same event.
        try:
            if record.event_digest is None:
                stored = await self._execute(
                    self._append_sql, team_id, record.seq, record.time, record.record_hash,
                    record.leaf_hash, record.canonical,
                )  # fmt: skip
            else:
                stored = await self._execute(
                    self._append_agent_event_sql, team_id, record.seq, record.time,
                    record.record_hash, record.leaf_hash, record.canonical, record.event_digest,
                )  # fmt: skip
        except AlreadyExists:
            # A concurrent writer on another connection took this sequence number (or stored this
            # event) first; once it has, the retry in the writer turn finds the event held.
            raise AppendConflict(
                f"another writer already stored sequence number {record.seq} or this event"
            ) from None
        except StoreError as exc:
            raise AuditStoreError(str(exc)) from exc
        if stored == 1:
            return
        if record.event_digest is not None:
            existing = await self._record_holding(team_id, record.event_digest)
            if existing is not None:
                raise DuplicateEvent(existing)
        raise AppendConflict(
            f"the team log's size is not {record.seq}, or another writer has its turn"
        )

    async def _record_holding(self, team_id: str, event_digest: bytes) -> StoredRecord | None:
        """The team's record of the agent event with ``event_digest``, if it holds one."""
        try:
            row = await self._fetchrow(
                "SELECT * FROM audit_records WHERE team_id = $1 AND event_digest = $2",
                team_id, event_digest,
            )  # fmt: skip
        except StoreError as exc:
            raise AuditStoreError(str(exc)) from exc
        return _stored_record(row) if row else None

    async def head(self, team_id: str) -> StoredRecord | None:
        """The team's last record, or None for an empty log."""
        row = await self._fetchrow(
            "SELECT * FROM audit_records WHERE team_id = $1 ORDER BY seq DESC LIMIT 1", team_id
        )
        return _stored_record(row) if row else None

    async def read_records(self, team_id: str, start: int, end: int) -> list[StoredRecord]:
        """Records with ``start <= seq < end`` in sequence order."""
        _check_range(start, end)
        rows = await self._fetch(
            """SELECT * FROM audit_records WHERE team_id = $1 AND seq >= $2 AND seq < $3
               ORDER BY seq""",
            team_id, start, end,
        )  # fmt: skip
        return [_stored_record(row) for row in rows]

    async def read_leaf_hashes(self, team_id: str, start: int, end: int) -> list[bytes]:
        """Merkle leaf hashes of records ``start <= seq < end`` in order."""
        _check_range(start, end)
        rows = await self._fetch(
            """SELECT leaf_hash FROM audit_records WHERE team_id = $1 AND seq >= $2 AND seq < $3
               ORDER BY seq""",
            team_id, start, end,
        )  # fmt: skip
        return [bytes(row["leaf_hash"]) for row in rows]

    async def save_checkpoint(self, team_id: str, checkpoint: StoredCheckpoint) -> None:
        """Keep a signed checkpoint; one covering fewer records never replaces a larger one."""
        await self._execute(
            """INSERT INTO audit_checkpoints (team_id, size, note) VALUES ($1, $2, $3)
               ON CONFLICT (team_id) DO UPDATE SET size = excluded.size, note = excluded.note
               WHERE audit_checkpoints.size < excluded.size""",
            team_id, checkpoint.size, checkpoint.note,
        )  # fmt: skip

    async def latest_checkpoint(self, team_id: str) -> StoredCheckpoint | None:
        """The stored checkpoint covering the most records, or None."""
        row = await self._fetchrow(
            "SELECT size, note FROM audit_checkpoints WHERE team_id = $1", team_id
        )
        return StoredCheckpoint(int(row["size"]), bytes(row["note"])) if row else None


# ---- row mapping and argument checks ---------------------------------------------------------


async def _touch(session: SqlSession, team_id: str, agent_id: str, now: float) -> None:
    await session.execute(
        """UPDATE agents SET last_seen_at = $3
           WHERE team_id = $1 AND id = $2 AND (last_seen_at IS NULL OR last_seen_at < $3)""",
        team_id, agent_id, now,
    )  # fmt: skip


def _check_text(what: str, value: str, limit: int) -> None:
    if not isinstance(value, str) or not value or len(value) > limit:
        raise InvalidArgument(f"{what} must be 1..{limit} characters")


def _check_labels(what: str, values: Sequence[str], limit: int) -> tuple[str, ...]:
    if isinstance(values, str):
        raise InvalidArgument(f"{what} must be a list of strings, not one string")
    labels = tuple(values)
    if len(labels) > limit:
        raise InvalidArgument(f"at most {limit} {what}")
    for label in labels:
        _check_text(what[:-1], label, MAX_NAME_LENGTH)
    return labels


def _check_range(start: int, end: int) -> None:
    if start < 0 or end < 0:
        raise AuditStoreError("record ranges never start or end below zero")


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _team(row: Row) -> Team:
    return Team(id=row["id"], name=row["name"], created_at=float(row["created_at"]))


def _invite(row: Row) -> Invite:
    return Invite(
        id=row["id"], team_id=row["team_id"], email=row["email"], role=row["role"],
        expires_at=float(row["expires_at"]), created_by=row["created_by"],
        created_at=float(row["created_at"]), used_at=_optional_float(row["used_at"]),
        used_by=row["used_by"],
    )  # fmt: skip


def _operator(row: Row, prefix: str = "") -> Operator:
    def column(name: str) -> Any:
        return row[prefix + name]

    return Operator(
        id=column("id"), team_id=column("team_id"), email=column("email"), role=column("role"),
        public_key=bytes(column("public_key")), key_thumbprint=column("key_thumbprint"),
        created_at=float(column("created_at")),
        disabled_at=_optional_float(column("disabled_at")),
        tokens_valid_after=float(column("tokens_valid_after")),
    )  # fmt: skip


def _token_holder(row: Row) -> TokenHolder:
    """A row of ``_HOLDER_QUERY`` (or one that includes its columns)."""
    operator = _operator(row, "holder_") if row["holder_id"] is not None else None
    return TokenHolder(operator=operator, token_revoked=bool(row["token_revoked"]))


def _agent_listing(rows: Sequence[Row], limit: int | None) -> AgentListing:
    """The ordered rows of ``_agent_listing_sql`` (asked for ``limit`` + 1 rows when limited)."""
    version = rows[0]["team_policy_version"] if rows else None
    agents = [_agent(row) for row in rows if row["id"] is not None]
    more = limit is not None and len(agents) > limit
    if more:
        del agents[limit:]
    return AgentListing(policy_version=int(version or 0), agents=agents, more=more)


# When the operator that made a registration_keys row (directly, or through one of its API
# keys) was disabled; NULL while it is enabled. Listings show such an unused key as revoked.
_CREATOR_DISABLED_AT = """(
    SELECT MIN(creator.disabled_at) FROM operators creator
    WHERE creator.team_id = registration_keys.team_id AND creator.disabled_at IS NOT NULL
      AND (creator.id = registration_keys.created_by
           OR creator.id IN (SELECT api_key.created_by FROM api_keys api_key
                             WHERE api_key.team_id = registration_keys.team_id
                               AND api_key.id = registration_keys.created_by)))"""


# Whether a registration_keys row was made by a disabled operator, directly or through one of
# its API keys: such a key is refused at use even if the disable's revocation missed it (it
# was being created as the disable committed).
_CREATOR_DISABLED = """EXISTS (
    SELECT 1 FROM operators creator
    WHERE creator.team_id = registration_keys.team_id AND creator.disabled_at IS NOT NULL
      AND (creator.id = registration_keys.created_by
           OR creator.id IN (SELECT api_key.created_by FROM api_keys api_key
                             WHERE api_key.team_id = registration_keys.team_id
                               AND api_key.id = registration_keys.created_by)))"""


def _api_key(row: Row) -> ApiKey:
    return ApiKey(
        id=row["id"], team_id=row["team_id"], name=row["name"],
        scopes=tuple(json.loads(row["scopes"])), created_by=row["created_by"],
        created_at=float(row["created_at"]), revoked_at=_optional_float(row["revoked_at"]),
    )  # fmt: skip


def _registration_key(row: Row) -> RegistrationKey:
    return RegistrationKey(
        id=row["id"], team_id=row["team_id"], tags=tuple(json.loads(row["tags"])),
        expires_at=float(row["expires_at"]), created_by=row["created_by"],
        created_at=float(row["created_at"]), used_at=_optional_float(row["used_at"]),
        used_by_agent=row["used_by_agent"], revoked_at=_optional_float(row["revoked_at"]),
    )  # fmt: skip


def _agent(row: Row) -> Agent:
    return Agent(
        id=row["id"], team_id=row["team_id"], name=row["name"], hostname=row["hostname"],
        tags=tuple(json.loads(row["tags"])), public_key=bytes(row["public_key"]),
        key_fingerprint=row["key_fingerprint"], machine_fingerprint=row["machine_fingerprint"],
        registration_key_id=row["registration_key_id"],
        registered_at=float(row["registered_at"]),
        last_seen_at=_optional_float(row["last_seen_at"]), online=bool(row["online"]),
        policy_version=None if row["policy_version"] is None else int(row["policy_version"]),
        policy_refusal=row["policy_refusal"], removed_at=_optional_float(row["removed_at"]),
    )  # fmt: skip


def _new_agent(
    agent_id: str,
    key: RegistrationKey,
    name: str,
    hostname: str,
    public_key: bytes,
    key_fingerprint: str,
    machine_fingerprint: str,
    now: float,
) -> Agent:
    """The agent a registration creates with ``key`` (its tags come from the key)."""
    return Agent(
        id=agent_id, team_id=key.team_id, name=name, hostname=hostname, tags=key.tags,
        public_key=bytes(public_key), key_fingerprint=key_fingerprint,
        machine_fingerprint=machine_fingerprint, registration_key_id=key.id,
        registered_at=now, last_seen_at=None, online=False,
    )  # fmt: skip


def _session(row: Row) -> Session:
    command = row["command"]
    return Session(
        id=row["id"], team_id=row["team_id"], agent_id=row["agent_id"],
        operator_id=row["operator_id"], operator_key_thumbprint=row["operator_key_thumbprint"],
        mode=row["mode"], command=None if command is None else tuple(json.loads(command)),
        relay_id=row["relay_id"], relay_host=row["relay_host"], relay_port=int(row["relay_port"]),
        relay_udp_port=None if row["relay_udp_port"] is None else int(row["relay_udp_port"]),
        policy_result=row["policy_result"], policy_rule_id=row["policy_rule_id"],
        state=SessionState(row["state"]), state_reason=row["state_reason"],
        created_at=float(row["created_at"]), expires_at=float(row["expires_at"]),
        updated_at=float(row["updated_at"]),
        exit_code=None if row["exit_code"] is None else int(row["exit_code"]),
        exit_signal=row["exit_signal"],
    )  # fmt: skip


def _listed_session(row: Row) -> ListedSession:
    return ListedSession(_session(row), row["listed_agent_name"], row["listed_operator_email"])


# ``team reset-policy`` leaves, in place of a team's bundles, one row with this empty bundle at
# the retired chain's last version: no schema change, and ``store_policy_bundle``'s MAX(version)
# makes the new chain's first version follow it. Never read as a bundle.
_RETIRED_CHAIN_MARK = ""
_RETIRED_CHAIN_BY = "team reset-policy"


def _policy_bundle(row: Row) -> StoredPolicyBundle:
    return StoredPolicyBundle(
        team_id=row["team_id"], version=int(row["version"]),
        content_sha256=row["content_sha256"], policy_sha256=row["policy_sha256"],
        bundle=row["bundle"], admin_key_id=row["admin_key_id"], created_by=row["created_by"],
        created_at=float(row["created_at"]),
    )  # fmt: skip


# The sweep's page ($1 instance id, $2/$3 the (team id, session id) key to go on after, $4 the
# page size). Driven by the operators (few), each disabled one's open sessions found through the
# partial index sessions_open_team_operator (migration 11; its WHERE is repeated here word for
# word, as SQLite uses a partial index only then): CROSS JOIN keeps SQLite from scanning every
# session instead (PostgreSQL plans it as an inner join). Only open rows are read and sorted,
# never an operator's whole history.
# The partial index of migration 11 serves it: its WHERE is repeated word for word.
_OPEN_SESSIONS_OF_ABSENT_AGENTS = """
    SELECT s.* FROM sessions s JOIN agents a ON a.team_id = s.team_id AND a.id = s.agent_id
    WHERE s.state IN ('offered', 'accepted') AND s.updated_at < $1
      AND COALESCE(a.last_seen_at, a.registered_at) < $1
      AND NOT EXISTS (SELECT 1 FROM agent_connections c
                      WHERE c.team_id = s.team_id AND c.agent_id = s.agent_id)
    ORDER BY s.team_id, s.id
    LIMIT $2"""

_OPEN_SESSIONS_OF_DISABLED_OPERATORS = """
    SELECT s.* FROM operators o CROSS JOIN sessions s
    WHERE s.team_id = o.team_id AND s.operator_id = o.id
      AND o.disabled_at IS NOT NULL AND s.state IN ('offered', 'accepted')
      AND (s.team_id > $2 OR (s.team_id = $2 AND s.id > $3))
      AND EXISTS (SELECT 1 FROM agent_connections c
                  WHERE c.instance_id = $1 AND c.team_id = s.team_id AND c.agent_id = s.agent_id)
    ORDER BY s.team_id, s.id
    LIMIT $4"""


def _approval_request(row: Row) -> ApprovalRequest:
    command = row["command"]
    return ApprovalRequest(
        id=row["id"], team_id=row["team_id"], agent_id=row["agent_id"],
        requester_id=row["requester_id"], requester_email=row["requester_email"],
        requester_thumbprint=row["requester_thumbprint"], mode=row["mode"],
        command=None if command is None else tuple(json.loads(command)),
        command_sha256=row["command_sha256"], policy_version=int(row["policy_version"]),
        rule_id=row["rule_id"], reason=row["reason"], state=ApprovalState(row["state"]),
        created_at=float(row["created_at"]), expires_at=float(row["expires_at"]),
        decided_by=row["decided_by"], decided_by_email=row["decided_by_email"],
        decision_reason=row["decision_reason"], decided_at=_optional_float(row["decided_at"]),
        approval=row["approval"], session_id=row["session_id"],
        executed_at=_optional_float(row["executed_at"]),
    )  # fmt: skip


def _connection(row: Row) -> AgentConnection:
    return AgentConnection(
        connection_id=row["connection_id"], agent_id=row["agent_id"], team_id=row["team_id"],
        instance_id=row["instance_id"], machine_fingerprint=row["machine_fingerprint"],
        connected_at=float(row["connected_at"]), heartbeat_at=float(row["heartbeat_at"]),
    )  # fmt: skip


def _stored_record(row: Row) -> StoredRecord:
    event_digest = row["event_digest"]
    return StoredRecord(
        seq=int(row["seq"]), time=row["time"], record_hash=bytes(row["record_hash"]),
        leaf_hash=bytes(row["leaf_hash"]), canonical=bytes(row["canonical"]),
        event_digest=None if event_digest is None else bytes(event_digest),
    )  # fmt: skip
