"""Protocol benchmark: frame sealing overhead against raw AES-GCM, and handshake CPU time.

Run from the repository root:  .venv/bin/python bench/bench_protocol.py [--quick]

* Frames: seal + open of 16 KiB payloads through protocol.frames.SecureChannel (stream and
  datagram receive modes) against bare ``cryptography`` AESGCM encrypt + decrypt of the same
  payload in the same process, interleaved round by round so both see the same machine load.
  Reported as throughput ratio raw_time / protocol_time (target >= 0.8, judged on the stream
  path with header and body as separate parts, which the TCP transport uses), best round and
  median; the one-buffer API and datagram mode are reported beside it.
* Handshake: CPU time (time.process_time) for a complete four-message handshake, both sides
  together, averaged over many iterations (target <= 2 ms).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cryptography  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from protocol.frames import FrameType, ReceiveMode, SecureChannel  # noqa: E402
from protocol.handshake import AgentHandshake, OperatorHandshake, pin_agent_key  # noqa: E402
from protocol.identity import PublicIdentity, SigningIdentity  # noqa: E402
from protocol.session_keys import Role, derive_session_keys  # noqa: E402

PAYLOAD_SIZE = 16 * 1024
SESSION_ID = b"sess-6f1c2a9e-0d4b-4c37-8e55-b2a1f0c9d3e7"
FRAME_TARGET_RATIO = 0.8
# The TCP session path seals and opens header and body as separate parts (protocol.frames).
TARGET_PATH = "stream, parts"
HANDSHAKE_TARGET_MS = 2.0


def time_protocol_frames(mode: ReceiveMode, parts: bool, payload: bytes, count: int) -> float:
    """Seconds per seal + open through SecureChannel: the frame as one buffer (seal/open) or as
    header and body (seal_parts/open_parts, what the stream transport writes and reads)."""
    keys = derive_session_keys(os.urandom(32), os.urandom(32), SESSION_ID)
    operator = SecureChannel(keys, Role.OPERATOR, 0.0, mode)
    agent = SecureChannel(keys, Role.AGENT, 0.0, mode)
    data = FrameType.DATA
    if parts:
        seal_parts, open_parts = operator.seal_parts, agent.open_parts
        start = time.process_time()
        for _ in range(count):
            header, body = seal_parts(data, payload, 1.0)
            open_parts(header, body, 1.0)
    else:
        seal, open_frame = operator.seal, agent.open
        start = time.process_time()
        for _ in range(count):
            open_frame(seal(data, payload, 1.0), 1.0)
    return (time.process_time() - start) / count


def time_raw_aesgcm(payload: bytes, count: int) -> float:
    """Seconds per bare AESGCM encrypt + decrypt with the same AAD size and a fixed nonce."""
    aead = AESGCM(os.urandom(32))
    nonce = os.urandom(12)
    associated = bytes(13) + SESSION_ID
    encrypt, decrypt = aead.encrypt, aead.decrypt
    start = time.process_time()
    for _ in range(count):
        decrypt(nonce, encrypt(nonce, payload, associated), associated)
    return (time.process_time() - start) / count


def time_wire_format_floor(payload: bytes, count: int) -> float:
    """Seconds per seal + open written inline with no checks and no method calls, header and body
    kept apart as on the target path: the cost of the wire format alone (header and nonce
    packing, AAD concatenation, header unpacking)."""
    aead = AESGCM(os.urandom(32))
    header_struct, nonce_struct = struct.Struct(">BIQ"), struct.Struct(">IQ")
    encrypt, decrypt = aead.encrypt, aead.decrypt
    start = time.process_time()
    for counter in range(count):
        header = header_struct.pack(1, 0, counter)
        body = encrypt(nonce_struct.pack(7, counter), payload, header + SESSION_ID)
        _, _, opened_counter = header_struct.unpack_from(header)
        decrypt(nonce_struct.pack(7, opened_counter), body, header + SESSION_ID)
    return (time.process_time() - start) / count


def bench_frames(rounds: int, count: int) -> dict[str, tuple[float, float, float, float]]:
    """Per mode: (best protocol s/op, best raw s/op, ratio of bests, median per-round ratio)."""
    payload = os.urandom(PAYLOAD_SIZE)
    results = {}
    floor_times, floor_raw = [], []
    for _ in range(rounds):
        floor_times.append(time_wire_format_floor(payload, count))
        floor_raw.append(time_raw_aesgcm(payload, count))
    best_floor, best_floor_raw = min(floor_times), min(floor_raw)
    results["floor"] = (best_floor, best_floor_raw, best_floor_raw / best_floor, float("nan"))
    for mode, parts in [(mode, parts) for mode in ReceiveMode for parts in (True, False)]:
        protocol_times, raw_times, ratios = [], [], []
        time_protocol_frames(mode, parts, payload, count // 10)  # warm up
        time_raw_aesgcm(payload, count // 10)
        for _ in range(rounds):
            ours = time_protocol_frames(mode, parts, payload, count)
            raw = time_raw_aesgcm(payload, count)
            protocol_times.append(ours)
            raw_times.append(raw)
            ratios.append(raw / ours)
        best_ours, best_raw = min(protocol_times), min(raw_times)
        name = f"{mode.value}, {'parts' if parts else 'one buffer'}"
        results[name] = (best_ours, best_raw, best_raw / best_ours, statistics.median(ratios))
    return results


def bench_handshake(iterations: int) -> float:
    """CPU milliseconds for one full handshake, both sides."""
    agent_identity = SigningIdentity.generate()
    operator_identity = SigningIdentity.generate()
    grant = "eyJhbGciOiJFZERTQSIsInR5cCI6InR1Y2Rlc2stZ3JhbnQrand0In0." + "x" * 400 + ".sig"

    def accept(grant: str | bytes, operator: PublicIdentity) -> str | None:
        return None

    pin = pin_agent_key(agent_identity.public)

    def one() -> None:
        operator = OperatorHandshake(operator_identity, SESSION_ID, grant, pin, deadline=10.0)
        agent = AgentHandshake(agent_identity, SESSION_ID, accept, deadline=10.0)
        m3 = operator.receive(agent.receive(operator.start(1.0), 1.0), 1.0)
        assert m3 is not None
        operator.receive(agent.receive(m3, 1.0), 1.0)
        assert operator.is_complete and agent.is_complete

    for _ in range(20):
        one()
    start = time.process_time()
    for _ in range(iterations):
        one()
    return (time.process_time() - start) / iterations * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (smoke run)")
    arguments = parser.parse_args()
    rounds, count, handshakes = (3, 2000, 200) if arguments.quick else (15, 20000, 2000)

    print(f"python {platform.python_version()}, cryptography {cryptography.__version__}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs")
    print(f"frames: {PAYLOAD_SIZE // 1024} KiB payload, {rounds} rounds x {count} seal+open")
    frames_ok = False
    for mode, (ours, raw, best_ratio, median_ratio) in bench_frames(rounds, count).items():
        if mode == "floor":
            print(
                f"  wire-format floor (inline, no checks) {ours * 1e6:6.2f} us/frame, "
                f"raw {raw * 1e6:6.2f} us, ratio {best_ratio:.2f}"
            )
            continue
        if mode == TARGET_PATH:
            frames_ok = best_ratio >= FRAME_TARGET_RATIO
        print(
            f"  {mode:20} protocol {ours * 1e6:6.2f} us/frame "
            f"({PAYLOAD_SIZE / ours / 1e9:5.2f} GB/s)"
            f"  raw AESGCM {raw * 1e6:6.2f} us  ratio {best_ratio:.2f} (median round "
            f"{median_ratio:.2f}, target >= {FRAME_TARGET_RATIO})"
        )
    handshake_ms = bench_handshake(handshakes)
    print(f"handshake: {handshake_ms:.3f} ms CPU per handshake, both sides "
          f"({handshakes} iterations, target <= {HANDSHAKE_TARGET_MS} ms)")
    met = frames_ok and handshake_ms <= HANDSHAKE_TARGET_MS
    print("targets:", "met" if met else "MISSED")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
