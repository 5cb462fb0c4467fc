"""Sealed frames: AES-256-GCM per direction, strict or windowed receive, rekey along a key chain.

Wire format of one sealed frame (all integers big-endian)::

    type u8 | key epoch u32 | counter u64 | ciphertext | 16-byte GCM tag
    \\________ header, 13 bytes ________/

* AAD = header || session id, so type, epoch and counter are authenticated and a frame from one
  session never opens in another.
* nonce = direction tag (u32) || counter (u64). The two directions use different keys *and*
  different tags, so a frame reflected back to its sender does not open.
* The counter starts at 0, goes up by one per frame, and never resets (not even on rekey).
* The key epoch says which key of the direction's chain sealed the frame
  (``session_keys.next_traffic_key``). A sender steps to the next key after
  ``rekey_after_messages`` frames or ``rekey_after_time`` seconds on one key; the receiver follows
  when it sees a frame of the next epoch whose tag verifies. Once the counter reaches
  ``reject_after_messages`` the sender refuses: the caller must run a new handshake. A receiver
  refuses frames under a key it has held for longer than ``reject_after_time``.

Receive modes: STREAM (TCP through the relay) accepts exactly the next counter and epoch, and any
other frame ends the session. DATAGRAM (UDP) accepts counters through a ReplayWindow, marking a
counter seen only after its tag verified, and keeps the previous epoch's key for late frames.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import NamedTuple, NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from protocol.errors import FrameError
from protocol.replay_window import ReplayWindow
from protocol.session_keys import Role, SessionKeys, next_traffic_key

MAX_FRAME_PAYLOAD = 64 * 1024
HEADER_SIZE = 13
TAG_SIZE = 16
MAX_SEALED_FRAME_SIZE = HEADER_SIZE + MAX_FRAME_PAYLOAD + TAG_SIZE
MIN_SEALED_FRAME_SIZE = HEADER_SIZE + TAG_SIZE
_MIN_BODY_SIZE, _MAX_BODY_SIZE = TAG_SIZE, MAX_FRAME_PAYLOAD + TAG_SIZE

# Timers and the hard counter limit after WireGuard; REKEY_AFTER_MESSAGES stays under TLS 1.3's
# bound of 2**24.5 full-size records per AES-GCM key.
REKEY_AFTER_MESSAGES = 2**24
REJECT_AFTER_MESSAGES = 2**64 - 2**13 - 1
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
MAX_KEY_EPOCH = 2**32 - 1
# How many epochs a datagram receiver may step forward at once (frames of a whole epoch were lost).
MAX_DATAGRAM_EPOCH_JUMP = 4

OPERATOR_TO_AGENT_TAG = 0x6F326100  # "o2a\0"
AGENT_TO_OPERATOR_TAG = 0x61326F00  # "a2o\0"

_HEADER = struct.Struct(">BIQ")
_NONCE = struct.Struct(">IQ")
assert _HEADER.size == HEADER_SIZE
_pack_header, _unpack_header, _pack_nonce = _HEADER.pack, _HEADER.unpack_from, _NONCE.pack
_NOTHING_SENDABLE: frozenset[FrameType] = frozenset()


class FrameType(IntEnum):
    """What a frame carries. Each direction may send only its own types (see ``SENDABLE``)."""

    DATA = 1  # operator -> agent: stdin / PTY input
    STDOUT = 2  # agent -> operator
    STDERR = 3  # agent -> operator
    CONTROL = 4  # either way: a msgpack control message (protocol.control)
    CLOSE = 5  # either way: the last frame this sender will send


SENDABLE: dict[Role, frozenset[FrameType]] = {
    Role.OPERATOR: frozenset({FrameType.DATA, FrameType.CONTROL, FrameType.CLOSE}),
    Role.AGENT: frozenset(
        {FrameType.STDOUT, FrameType.STDERR, FrameType.CONTROL, FrameType.CLOSE}
    ),
}


class ReceiveMode(Enum):
    """How a receiver treats counters: exactly-next (streams) or a replay window (datagrams)."""

    STREAM = "stream"
    DATAGRAM = "datagram"


@dataclass(frozen=True)
class RekeyLimits:
    """When to step to the next key and when to refuse; tests construct smaller ones."""

    rekey_after_messages: int = REKEY_AFTER_MESSAGES
    reject_after_messages: int = REJECT_AFTER_MESSAGES
    rekey_after_time: float = REKEY_AFTER_TIME
    reject_after_time: float = REJECT_AFTER_TIME

    def __post_init__(self) -> None:
        if not 0 < self.rekey_after_messages <= self.reject_after_messages <= REJECT_AFTER_MESSAGES:
            raise ValueError("need 0 < rekey_after_messages <= reject_after_messages <= maximum")
        if not 0 < self.rekey_after_time < self.reject_after_time:
            raise ValueError("need 0 < rekey_after_time < reject_after_time")


# (13-byte header, ciphertext || tag); the frame on the wire is the two concatenated.
SealedParts = tuple[bytes, bytes]


class Frame(NamedTuple):
    """An opened frame."""

    type: FrameType
    counter: int
    payload: bytes


# Building the NamedTuple through tuple.__new__ skips its Python-level __new__ on the hot path.
_new_frame = tuple.__new__
_CLOSE = FrameType.CLOSE


def direction_tag(sender: Role) -> int:
    """The nonce prefix for frames sealed by ``sender``."""
    return OPERATOR_TO_AGENT_TAG if sender is Role.OPERATOR else AGENT_TO_OPERATOR_TAG


class FrameSealer:
    """Seals one direction's frames: counter, key epoch and rekey timers live here."""

    __slots__ = (
        "_allowed", "_closed", "_counter", "_direction", "_encrypt", "_epoch", "_key", "_limits",
        "_rekey_at_counter", "_rekey_at_time", "_session_id",
    )

    def __init__(
        self, keys: SessionKeys, sender: Role, now: float, limits: RekeyLimits | None = None
    ) -> None:
        self._key = keys.sending_key(sender)
        self._encrypt = AESGCM(self._key).encrypt
        self._session_id = keys.session_id
        self._direction = direction_tag(sender)
        self._allowed = SENDABLE[sender]
        self._limits = limits or RekeyLimits()
        self._counter = 0
        self._epoch = 0
        self._closed = False
        self._schedule_rekey(now)

    @property
    def epoch(self) -> int:
        """The key epoch of the most recently sealed frame."""
        return self._epoch

    @property
    def counter(self) -> int:
        """The counter of the next frame."""
        return self._counter

    def seal(self, frame_type: FrameType, payload: bytes, now: float) -> bytes:
        """Encrypt ``payload`` as the next frame: the whole frame, header and body in one buffer."""
        header, body = self.seal_parts(frame_type, payload, now)
        return header + body

    def seal_parts(self, frame_type: FrameType, payload: bytes, now: float) -> SealedParts:
        """Encrypt ``payload`` as the next frame, returned as (header, body) so a stream writer
        can put its length prefix, the header and the body together with one copy."""
        if frame_type not in self._allowed or len(payload) > MAX_FRAME_PAYLOAD:
            raise FrameError(self._refusal(frame_type, len(payload)))
        counter = self._counter
        # One comparison each covers rekey-after-messages, the hard limit, and rekey-after-time.
        if counter >= self._rekey_at_counter or now >= self._rekey_at_time:
            self._step(counter, now)
        header = _pack_header(frame_type, self._epoch, counter)
        body = self._encrypt(
            _pack_nonce(self._direction, counter), payload, header + self._session_id
        )
        self._counter = counter + 1
        if frame_type == _CLOSE:
            self._closed = True
            self._allowed = _NOTHING_SENDABLE
        return header, body

    def _schedule_rekey(self, now: float) -> None:
        limits = self._limits
        self._rekey_at_counter = min(
            self._counter + limits.rekey_after_messages, limits.reject_after_messages
        )
        self._rekey_at_time = now + limits.rekey_after_time

    def _step(self, counter: int, now: float) -> None:
        if counter >= self._limits.reject_after_messages:
            raise FrameError("this session has sent its last permitted frame; start a new session")
        if self._epoch >= MAX_KEY_EPOCH:
            raise FrameError("this session has used its last key epoch; start a new session")
        self._key = next_traffic_key(self._key, self._session_id)
        self._encrypt = AESGCM(self._key).encrypt
        self._epoch += 1
        self._schedule_rekey(now)

    def _refusal(self, frame_type: FrameType, size: int) -> str:
        if size > MAX_FRAME_PAYLOAD:
            return f"frame payload of {size} bytes exceeds {MAX_FRAME_PAYLOAD}"
        if self._closed:
            return "the channel is closed: a CLOSE frame was already sent"
        return f"frame type {frame_type!r} may not be sent in this direction"


class _EpochKey:
    """One receive key of a direction's chain, with the time past which it is refused."""

    __slots__ = ("decrypt", "epoch", "expires", "key")

    def __init__(self, key: bytes, epoch: int, expires: float) -> None:
        self.key = key
        self.decrypt = AESGCM(key).decrypt
        self.epoch = epoch
        self.expires = expires


def _size_refusal(header_size: int, body_size: int) -> str:
    size = header_size + body_size
    if not MIN_SEALED_FRAME_SIZE <= size <= MAX_SEALED_FRAME_SIZE:
        low, high = MIN_SEALED_FRAME_SIZE, MAX_SEALED_FRAME_SIZE
        return f"a sealed frame is {low} to {high} bytes, got {size}"
    return f"a frame header is {HEADER_SIZE} bytes, got {header_size}"


class FrameOpener:
    """Opens one direction's frames, strictly in order (STREAM) or through a replay window."""

    __slots__ = (
        "_ahead", "_allowed", "_counter_limit", "_current", "_direction", "_ended", "_limits",
        "_next_counter", "_previous", "_session_id", "_stream", "_window",
    )

    def __init__(
        self,
        keys: SessionKeys,
        receiver: Role,
        now: float,
        mode: ReceiveMode = ReceiveMode.STREAM,
        limits: RekeyLimits | None = None,
        window: ReplayWindow | None = None,
    ) -> None:
        sender = receiver.peer
        self._limits = limits or RekeyLimits()
        self._current = _EpochKey(
            keys.sending_key(sender), 0, now + self._limits.reject_after_time
        )
        self._previous: _EpochKey | None = None
        # Keys of later epochs derived for frames that claimed them, kept until one is adopted,
        # so forged frames cannot make this side run HKDF again and again.
        self._ahead: dict[int, _EpochKey] = {}
        self._session_id = keys.session_id
        self._direction = direction_tag(sender)
        self._allowed = {int(kind): kind for kind in SENDABLE[sender]}
        self._counter_limit = self._limits.reject_after_messages
        self._stream = mode is ReceiveMode.STREAM
        self._window = window if window is not None else ReplayWindow()
        self._next_counter = 0
        self._ended: str | None = None  # why every later frame is refused, once that is so

    @property
    def epoch(self) -> int:
        """The key epoch of the most recent frame that opened."""
        return self._current.epoch

    def open(self, frame: bytes, now: float) -> Frame:
        """Verify and decrypt one sealed frame (header and body in one buffer); FrameError if not.

        In STREAM mode any refused frame ends the session: every later call raises too.
        """
        return self.open_parts(frame[:HEADER_SIZE], memoryview(frame)[HEADER_SIZE:], now)

    def open_parts(self, header: bytes, body: bytes | memoryview, now: float) -> Frame:
        """``open`` for a frame whose 13-byte header and body arrive as separate buffers."""
        if len(header) != HEADER_SIZE or not _MIN_BODY_SIZE <= len(body) <= _MAX_BODY_SIZE:
            return self._refuse(_size_refusal(len(header), len(body)))
        raw_type, epoch, counter = _unpack_header(header)
        kind = self._allowed.get(raw_type)  # nothing is allowed once the channel has ended
        if kind is None:
            return self._refuse(f"frame type {raw_type} is not valid in this direction")
        stream = self._stream
        if stream:
            if counter != self._next_counter:
                return self._refuse(f"expected frame {self._next_counter}, got {counter}")
        elif not self._window.is_acceptable(counter):
            return self._refuse(f"frame {counter} is a replay or older than the window")
        if counter >= self._counter_limit:
            return self._refuse("frame counter is past the session's limit")
        key = self._current
        if epoch != key.epoch:
            key = self._key_for_epoch(epoch)
        if now > key.expires:
            return self._refuse("frame is sealed under a key past its lifetime")
        try:
            payload = key.decrypt(
                _pack_nonce(self._direction, counter), body, header + self._session_id
            )
        except InvalidTag:
            return self._refuse("frame failed authentication (tampered, reflected or wrong key)")
        if key is not self._current:
            self._adopt(key, now)
        if stream:
            self._next_counter = counter + 1
        else:
            self._window.accept(counter)
        if kind is _CLOSE:
            self._end("the channel is closed: a CLOSE frame was already received")
        return _new_frame(Frame, (kind, counter, payload))

    def _adopt(self, key: _EpochKey, now: float) -> None:
        """Make a later epoch's key current (its lifetime starts now); keep the one before it."""
        current = self._current
        if key.epoch <= current.epoch:
            return  # a late frame under the previous key
        expires = now + self._limits.reject_after_time
        previous = self._ahead.get(key.epoch - 1, current)
        if previous is not current:
            previous.expires = expires
        key.expires = expires
        self._previous, self._current = previous, key
        self._ahead = {epoch: ahead for epoch, ahead in self._ahead.items() if epoch > key.epoch}

    def _key_for_epoch(self, epoch: int) -> _EpochKey:
        """The key for a frame's epoch, not yet committed to; refuses epochs out of reach."""
        current = self._current
        if self._stream:
            max_jump = 1
        else:
            previous = self._previous
            if previous is not None and epoch == previous.epoch:
                return previous
            max_jump = MAX_DATAGRAM_EPOCH_JUMP
        if not current.epoch < epoch <= min(current.epoch + max_jump, MAX_KEY_EPOCH):
            self._refuse(f"frame key epoch {epoch} is not acceptable now")
        key = current
        for step in range(current.epoch + 1, epoch + 1):
            following = self._ahead.get(step)
            if following is None:
                # Not in use yet, so not expiring yet: _adopt starts its lifetime.
                following = _EpochKey(next_traffic_key(key.key, self._session_id), step, math.inf)
                self._ahead[step] = following
            key = following
        return key

    def _end(self, reason: str) -> None:
        self._ended = reason
        self._allowed = {}

    def _refuse(self, reason: str) -> NoReturn:
        if self._ended is not None:
            raise FrameError(self._ended)
        if self._stream:
            self._end(f"the session ended after a refused frame ({reason})")
        raise FrameError(reason)


class SecureChannel:
    """Both directions of a session for one role.

    ``seal``/``seal_parts`` are FrameSealer's and ``open``/``open_parts`` FrameOpener's, bound
    directly (no extra call per frame).
    """

    __slots__ = ("open", "open_parts", "opener", "role", "seal", "seal_parts", "sealer")
    seal: Callable[[FrameType, bytes, float], bytes]
    seal_parts: Callable[[FrameType, bytes, float], SealedParts]
    open: Callable[[bytes, float], Frame]
    open_parts: Callable[[bytes, bytes | memoryview, float], Frame]

    def __init__(
        self,
        keys: SessionKeys,
        role: Role,
        now: float,
        mode: ReceiveMode = ReceiveMode.STREAM,
        limits: RekeyLimits | None = None,
    ) -> None:
        self.role = role
        self.sealer = FrameSealer(keys, role, now, limits)
        self.opener = FrameOpener(keys, role, now, mode, limits)
        self.seal = self.sealer.seal
        self.seal_parts = self.sealer.seal_parts
        self.open = self.opener.open
        self.open_parts = self.opener.open_parts
