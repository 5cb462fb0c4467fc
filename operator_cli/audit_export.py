"""`tucdesk audit export`'s download: the bundle streamed to a file that appears only whole.

The bundle goes to a 0600 temporary file beside the destination, fsynced, and renamed over it
only when it arrived complete: no transport error, the declared Content-Length if one was sent
(http.client ends a short body silently), and a last line that parses as the bundle's signed
trailer (a body the server delimits by closing cannot otherwise tell a cut from an end). A
device or FIFO (/dev/stdout, a named pipe) is written in place. While it runs, an optional
progress line (audit.progress) shows bytes, lines and rate.
"""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path
from typing import BinaryIO

from audit.bundle import MAX_BUNDLE_LINE_BYTES, parse_trailer
from audit.errors import AuditError
from audit.progress import ProgressLine, format_bytes
from audit.record import strict_json
from operator_cli.http import Response, TransportError
from protocol.errors import ProtocolError


class ExportIncomplete(Exception):
    """The export's body stopped or ended before the bundle's last line (its checkpoint)."""


class ExportReceiver:
    """Copies the streamed bundle to a file, counting it for the progress line, and checks that
    it arrived whole: the declared length if any, and a last line that is the bundle trailer."""

    def __init__(self, line: ProgressLine | None) -> None:
        self.line = line
        self.bytes = 0
        self.lines = 0
        self._last_line = b""  # the bundle's last line so far (a trailer when it is complete)
        self._last_line_limit = MAX_BUNDLE_LINE_BYTES + 1  # longer is no trailer anyway

    def receive(self, response: Response, sink: BinaryIO) -> None:
        """Write the whole body to ``sink``; ExportIncomplete if it stops or ends early."""
        try:
            for chunk in response.iter_bytes():
                sink.write(chunk)
                self._count(chunk)
        except TransportError as error:
            raise ExportIncomplete(
                f"the export stopped after {self.bytes:,} bytes ({error.reason})"
            ) from error
        self._check_complete(response.headers.get("Content-Length"))

    def _count(self, chunk: bytes) -> None:
        self.bytes += len(chunk)
        self.lines += chunk.count(b"\n")
        cut = chunk.rfind(b"\n", 0, len(chunk) - 1)
        if cut >= 0:
            self._last_line = chunk[cut + 1 :]
        else:
            started = b"" if self._last_line.endswith(b"\n") else self._last_line
            self._last_line = (started + chunk)[-self._last_line_limit :]
        if self.line is not None and self.line.due():
            elapsed = self.line.elapsed()
            rate = f", {format_bytes(self.bytes / elapsed)}/s" if elapsed > 0 else ""
            self.line.show(f"downloading audit export: {format_bytes(self.bytes)}, "
                           f"{self.lines:,} lines{rate}")

    def _check_complete(self, declared_length: str | None) -> None:
        # http.client ends a body shorter than its Content-Length silently, and a body the
        # server delimits by closing cannot tell a cut from an end: the trailer tells.
        if declared_length is not None and declared_length != str(self.bytes):
            raise ExportIncomplete(f"the export ended after {self.bytes:,} of "
                                    f"{declared_length} bytes")
        body = self._last_line[:-1]
        try:
            value = strict_json(body)
            if not self._last_line.endswith(b"\n") or not isinstance(value, dict):
                raise ValueError("the last line is not a bundle trailer")
            parse_trailer(value, body)
        except (AuditError, ProtocolError, ValueError, TypeError):
            raise ExportIncomplete(
                f"the export ended after {self.bytes:,} bytes without the bundle's signed "
                "checkpoint (cut short?)"
            ) from None


def is_stream(output: Path) -> bool:
    """Whether ``output`` is a device or FIFO (/dev/stdout, a named pipe): written in place, as
    a rename cannot replace it (a missing file or a directory is not one)."""
    return output.exists() and not output.is_file() and not output.is_dir()


class ExportNotWritten(OSError):
    """The bundle cannot be written to the file the user named (the message names that file,
    never the temporary one beside it)."""

    def __init__(self, output: Path, error: OSError) -> None:
        super().__init__(f"cannot write {output}: {error.strerror or error}")
        self.errno = error.errno


def receive_into_place(receiver: ExportReceiver, response: Response, output: Path) -> None:
    """Download into a 0600 temporary file beside ``output``, renamed over it once complete;
    ExportNotWritten (naming ``output``) if the file cannot be created or written."""
    destination = Path(os.path.realpath(output))  # write through a symlink, as open() would
    temporary: Path | None = None
    try:
        # Ctrl-C is held while the file is created and named here, so it cannot land between
        # the two and leave a file nothing removes.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            fd, temporary_name = tempfile.mkstemp(
                dir=destination.parent, prefix=f".{destination.name}.", suffix=".partial"
            )
            temporary = Path(temporary_name)
        except OSError as error:
            raise ExportNotWritten(output, error) from None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        with os.fdopen(fd, "wb") as sink:
            try:
                # Network failures arrive as ExportIncomplete: an OSError here is the disk's.
                receiver.receive(response, sink)
                sink.flush()
                os.fsync(sink.fileno())
            except OSError as error:
                raise ExportNotWritten(output, error) from None
        try:
            os.replace(temporary, destination)
        except OSError as error:
            raise ExportNotWritten(output, error) from None
    except BaseException:
        # Also a Ctrl-C that lands just after the file was created.
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        raise


def verify_hint(output: Path | None) -> str:
    """What `tucdesk audit export` says at its end: how to verify the file, and how to check
    the pinned key's fingerprint out of band first."""
    bundle = output if output is not None else "BUNDLE"
    return (
        f"check it with: tucdesk-audit verify {bundle} --key AUDIT_KEY; first compare "
        "'tucdesk-audit key AUDIT_KEY' with the audit-signer fingerprint from "
        "'tucdesk-rendezvous keys show' (or your administrator)"
    )
