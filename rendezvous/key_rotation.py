"""Rotating a service key (``tucdesk-rendezvous keys rotate PURPOSE``) and picking it up (SIGHUP).

A rotation, in this order (so a crash at any point leaves a state that names its way out):

0. an exclusive lock (flock on ``keys/.rotate.lock``) is taken for the whole rotation: a second
   ``keys rotate`` on the same data dir is refused at once;
1. a new key is written beside the old one (``KEYFILE.new.RANDOM``, 0600, atomic; a name of
   its own, so no other rotation can overwrite or move it);
2. one database transaction moves the role's pin from the old key to the new one only if the
   old one is still pinned (compare-and-set: of two hosts sharing the database rotating at
   once, one wins; the other removes its file, records nothing and exits non-zero) and keeps
   the old public key as retired, accepted until ``accept_until`` for tokens and grants (now,
   with ``--retire-old-now``);
3. ``service_key.rotated`` is recorded in the service log and in every team's log ("no audit,
   no action": only a rotation that happened is recorded), naming the old and new fingerprints
   and carrying the new public key. For the audit signer these records are signed by the OLD
   key, whose file is still in place: an auditor who pinned it follows the rotation to the new
   key (audit/trust.py);
4. the new key file replaces the old one, so the old private key file no longer exists: a
   rotated key signs nothing more once the running instances reloaded;
5. on PostgreSQL, a ``service_keys_rotated`` notice (rendezvous/offer_bus.py) tells every
   serving instance to reload its service keys at once, exactly as SIGHUP does. A notice lost is
   made up for by each instance's minute sweep (``reload_if_pins_changed``), which also serves
   SQLite: an instance whose loaded keys are not the ones the database pins reloads, and while
   the key files it reads do not match the pins (a keys dir not shared or not copied) it logs an
   ERROR saying so each minute and keeps signing with the keys it has.

Interrupted between 2 and 4, every start names the one ``mv`` left (service_keys.py), and
says the audit records may be missing.

Before its private key is gone, the old key also signs a *rotation statement*: ``{purpose,
old_key_id, new_key, new_key_id, rotated_at}`` (RFC 8785) under the domain prefix
``tucdesk-service-key-rotation-v1``, kept with the retired key. Every agent is sent the current
keys and the statements it can still need (those of the purposes agents follow, within the
rotation horizon: rendezvous/service_keys.py) on each (re)connect and, after a reload that
changed the keys (SIGHUP), on every channel the instance holds (``service_keys`` control
message); it follows the chain from the keys it pinned at enrollment (agent/enrollment.py
``follow_key_rotations``).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import math
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import rfc8785

from audit.trust import service_key_rotation_context
from protocol.domains import Purpose
from protocol.identity import PublicIdentity, SigningIdentity, b64url, sync_directory
from protocol.tokens import DEFAULT_LEEWAY_SECONDS
from rendezvous.audit_trail import SERVICE_LOG, Action, AuditTrail, service_actor
from rendezvous.config import MAX_ACCESS_TOKEN_SECONDS
from rendezvous.errors import ConfigError
from rendezvous.service_keys import (
    KEY_ROLES,
    KEYS_DIRECTORY,
    ROTATION_LOCK_FILE,
    ServiceKeyMismatch,
    ServiceKeys,
    check_pinned_keys,
    key_path,
    load_service_keys,
    pending_key_path,
    with_retired_keys,
)
from rendezvous.store import StoreError
from rendezvous.store.base import RetiredServiceKey

if TYPE_CHECKING:
    from rendezvous.context import ServiceContext
    from rendezvous.store import Store

logger = logging.getLogger("tucdesk.rendezvous")

# Access tokens live at most MAX_ACCESS_TOKEN_SECONDS; session grants and relay tokens less
# (protocol.session_grant, protocol.relay_token). Whatever a retired key signed before the
# rotation has expired once this much time (with the verifiers' leeway) has passed.
RETIRED_KEY_GRACE_SECONDS = MAX_ACCESS_TOKEN_SECONDS + DEFAULT_LEEWAY_SECONDS
ROTATION_TARGET_PREFIX = "service-key:"
AUDIT_SIGNER_ROLE = "audit-signer"
SERVICE_KEYS_MESSAGE = "service_keys"
# The offer-bus notice kind after a rotation: every instance reloads its service keys.
KEYS_ROTATED_NOTICE_KIND = "service_keys_rotated"
SIGHUP_RELOAD = "received SIGHUP"
# How an admin makes running instances take rotated keys now rather than at their minute check
# (rendezvous/server.py PRUNE_INTERVAL_SECONDS; the systemd unit's ExecReload sends SIGHUP).
RELOAD_NOW_HINT = (
    "send SIGHUP to every instance (systemctl reload tucdesk-rendezvous, or kill -HUP PID)"
)


@dataclass(frozen=True)
class Rotation:
    """What one ``keys rotate`` did."""

    role: str
    old_key: PublicIdentity
    new_key: PublicIdentity
    accept_old_until: float
    logs_recorded: int
    retired_now: bool = False
    """``--retire-old-now``: what the old key signed is refused once an instance reloads."""
    announced: bool = False
    """Whether a database notice told the serving instances to reload (PostgreSQL)."""

    def takes_effect(self) -> str:
        """When running instances take the new key (and, with --retire-old-now, refuse what the
        old key signed) and how to make that immediate: a line of the admin command's output."""
        then = ("sign with it and refuse what the old key signed" if self.retired_now
                else "sign with it")
        if self.announced:
            when = ("running instances sharing this database reload by themselves within "
                    "seconds (a database notice; one that missed it, at its minute check: up to "
                    f"60 s from now), then {then}")
        else:
            when = ("running instances reload by themselves only at their minute check (up to "
                    "60 s from now; until then they sign with the old key and accept what it "
                    f"signed), then {then}")
        return f"{when}; to make it take effect at once, {RELOAD_NOW_HINT}"


async def rotate_service_key(
    store: Store,
    data_dir: Path,
    role: str,
    *,
    issuer: str,
    retire_old_now: bool,
    now: float,
) -> Rotation:
    """Replace the ``role`` key (see the module docstring); ConfigError if it cannot be done."""
    if role not in KEY_ROLES:
        raise ConfigError(f"no service key {role!r}; one of {', '.join(KEY_ROLES)}")
    load_service_keys(data_dir)  # names a missing key file (and keys directory) first
    with _rotation_lock(data_dir):
        rotation = await _rotate_locked(
            store, data_dir, role, issuer=issuer, retire_old_now=retire_old_now, now=now
        )
    announced = await announce_rotation(store, role)
    return dataclasses.replace(rotation, retired_now=retire_old_now, announced=announced)


async def announce_rotation(store: Store, role: str) -> bool:
    """Tell every serving instance (PostgreSQL) to reload its service keys now; best effort:
    their minute sweep finds the new pins anyway. True if the notice went out."""
    if not store.notifications_supported:
        return False  # SQLite: one instance, whose minute sweep reloads
    from rendezvous.offer_bus import OFFER_CHANNEL  # the bus imports this module

    notice = json.dumps({"kind": KEYS_ROTATED_NOTICE_KIND, "role": role})
    try:
        await store.notify(OFFER_CHANNEL, notice)
    except StoreError as error:
        logger.warning("telling the serving instances about the %s rotation failed (%s); they "
                       "reload within a minute anyway", role, type(error).__name__)  # fmt: skip
        return False
    return True


async def _rotate_locked(
    store: Store, data_dir: Path, role: str, *, issuer: str, retire_old_now: bool, now: float
) -> Rotation:
    keys = load_service_keys(data_dir)
    # Pins what no init pinned yet (a database from before pinning), as serve would.
    await check_pinned_keys(store, keys, data_dir, now, pin=True)
    old = keys.by_role()[role]
    new = SigningIdentity.generate()
    pending = pending_key_path(data_dir, role, secrets.token_hex(8))
    new.save(pending)
    accept_old_until = now if retire_old_now else now + RETIRED_KEY_GRACE_SECONDS
    retired = RetiredServiceKey(
        role=role,
        fingerprint=old.public.fingerprint,
        public_key=b64url(old.public.raw),
        replaced_by=new.public.fingerprint,
        retired_at=now,
        accept_until=accept_old_until,
        statement=json.dumps(rotation_statement(role, old, new.public, now)),
    )
    try:
        pinned = await store.rotate_service_key(retired, now)
    except Exception as error:
        # Whether the transaction committed is unknown: the file may hold the pinned key, so it
        # is kept (a start with keys that do not match names it if the database pins it).
        raise ConfigError(
            f"the database transaction of the {role} rotation failed ({error}); if 'keys show' "
            f"now shows {new.public.fingerprint} as current, finish it: mv {pending} "
            f"{key_path(data_dir, role)}; otherwise nothing changed: delete {pending}"
        ) from error
    if not pinned:
        pending.unlink(missing_ok=True)
        raise ServiceKeyMismatch(
            f"the database no longer pins {role} key {old.public.fingerprint}: another "
            f"rotation (on another host sharing the database) won; this one changed and "
            f"recorded nothing. Run 'keys show' and copy {Path(data_dir) / KEYS_DIRECTORY} "
            "from where that rotation ran"
        )
    # The database pins the new key now: from here on its file must never be deleted.
    try:
        logs = await _record_rotation(
            store, keys, role, old, new.public, issuer=issuer,
            retire_old_now=retire_old_now, accept_old_until=accept_old_until,
        )  # fmt: skip
    except Exception as error:
        raise ConfigError(
            f"the database pins the new {role} key {new.public.fingerprint}, but recording "
            f"service_key.rotated failed ({error}); finish the rotation: mv {pending} "
            f"{key_path(data_dir, role)}"
        ) from error
    # The rename drops the old private key file: from here on only its public half exists.
    os.replace(pending, key_path(data_dir, role))
    sync_directory(pending.parent)
    return Rotation(role, old.public, new.public, accept_old_until, logs)


@contextmanager
def _rotation_lock(data_dir: Path) -> Iterator[None]:
    """Hold the data dir's rotation lock, or raise ConfigError if another rotation holds it."""
    directory = Path(data_dir) / KEYS_DIRECTORY
    fd = os.open(directory / ROTATION_LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"another 'keys rotate' is running on {directory}; nothing was changed: wait "
                "for it to finish, then run 'keys show'"
            ) from None
        yield
    finally:
        os.close(fd)


def rotation_statement(
    purpose: str, old: SigningIdentity, new_key: PublicIdentity, rotated_at: float
) -> dict[str, Any]:
    """The statement by which ``old`` names ``new_key`` its successor for ``purpose``."""
    statement: dict[str, Any] = {
        "purpose": purpose,
        "old_key_id": old.public.key_id,
        "new_key": b64url(new_key.raw),
        "new_key_id": new_key.key_id,
        "rotated_at": int(rotated_at),
    }
    signature = old.sign(Purpose.SERVICE_KEY_ROTATION, rfc8785.dumps(statement))
    return {**statement, "signature": b64url(signature)}


def service_keys_message(keys: ServiceKeys) -> dict[str, Any]:
    """The control message that tells an agent the current keys and how they came to be."""
    return {
        "type": SERVICE_KEYS_MESSAGE,
        "keys": keys.jwks()["keys"],
        "rotations": keys.rotation_statements(),
    }


async def _record_rotation(
    store: Store,
    keys: ServiceKeys,
    role: str,
    old: SigningIdentity,
    new_key: PublicIdentity,
    *,
    issuer: str,
    retire_old_now: bool,
    accept_old_until: float,
) -> int:
    """Record ``service_key.rotated`` in the service log and every team's log; the count."""
    # The audit signer's successor is introduced by records its predecessor signs.
    signer = old if role == AUDIT_SIGNER_ROLE else keys.audit_signer
    trail = AuditTrail(store.audit, signer, origin=issuer)
    context = service_key_rotation_context(
        role,
        old.public,
        new_key,
        retire_old_now=retire_old_now,
        accept_old_until=math.ceil(accept_old_until),
    )
    log_ids = [SERVICE_LOG, *(team.id for team in await store.list_teams())]
    for log_id in log_ids:
        await trail.record(
            log_id,
            actor=service_actor("admin command"),
            action=Action.SERVICE_KEY_ROTATED,
            target=ROTATION_TARGET_PREFIX + role,
            details=context,
        )
    return len(log_ids)


async def reload_service_keys(ctx: ServiceContext, why: str = SIGHUP_RELOAD) -> bool:
    """Load the data dir's keys and the retired ones into ``ctx`` (on SIGHUP, or ``why``); True
    if they changed. Keys that do not match the database's pins are not taken: the instance
    keeps serving with the ones it has, and says why."""
    try:
        keys = await with_retired_keys(ctx.store, load_service_keys(ctx.config.data_dir))
        await check_pinned_keys(ctx.store, keys, ctx.config.data_dir, ctx.now(), pin=False)
    except Exception as error:  # noqa: BLE001 - a reload failure must never stop the service
        logger.error("%s; kept the current service keys: %s", why, error)
        return False
    if _fingerprints(keys) == _fingerprints(ctx.keys):
        return False
    if keys.audit_signer.public.key_id != ctx.keys.audit_signer.public.key_id:
        # The callers' refusal budgets (and counts not yet recorded) carry over.
        ctx.audit = AuditTrail(
            ctx.store.audit, keys.audit_signer, origin=ctx.config.issuer,
            refusal_budget=ctx.audit.refusal_budget,
        )  # fmt: skip
    ctx.keys = keys
    logger.info(
        "%s; now signing with service keys %s", why,
        ", ".join(f"{role} {key.public.fingerprint}" for role, key in keys.by_role().items()),
    )
    if ctx.connections is not None:
        # Connected agents follow a new grant signer (and drop a key retired at once) now,
        # not at their next reconnect.
        told = ctx.connections.send_to_every_channel(service_keys_message(keys))
        logger.info("sent the service keys to %d connected agent channel(s)", told)
    return True


async def reload_if_pins_changed(ctx: ServiceContext) -> bool:
    """The minute sweep: reload (as SIGHUP does) if the database pins other service keys than
    this instance signs with (a rotation whose notice was lost, or SQLite); True if reloaded."""
    pinned = await ctx.store.service_key_fingerprints()
    held = {role: key.public.fingerprint for role, key in ctx.keys.by_role().items()}
    if all(pinned.get(role, held[role]) == fingerprint for role, fingerprint in held.items()):
        return False
    return await reload_service_keys(ctx, "the database pins other service keys")


def _fingerprints(keys: ServiceKeys) -> tuple[tuple[str, ...], tuple[str, ...]]:
    current = tuple(key.public.fingerprint for key in keys.by_role().values())
    retired = tuple(f"{key.public.fingerprint}@{key.accept_until}" for key in keys.retired)
    return current, retired
