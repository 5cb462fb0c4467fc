"""The operator CLI's home directory: server settings, the operator key and the cached token.

Location: ``--home DIR``, else ``TUCDESK_HOME``, else ``$XDG_CONFIG_HOME/tucdesk`` (default
``~/.config/tucdesk``). The key and the token are 0600 files; the directory is 0700.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.x509 import load_pem_x509_certificates

from protocol.errors import KeyFileError
from protocol.identity import SigningIdentity, read_private_file, write_private_file

HOME_ENVIRONMENT = "TUCDESK_HOME"
HOME_MODE = 0o700
SETTINGS_FILE = "settings.json"
OPERATOR_KEY_FILE = "operator.key"
TOKEN_FILE = "token.json"  # noqa: S105 - a file name
# Login keeps its own copy of the CA certificates: the saved settings then do not break when
# the file named by --ca-file is moved or deleted.
CA_COPY_FILE = "ca.pem"
MAX_STATE_FILE_BYTES = 64 * 1024
MAX_CA_FILE_BYTES = 1024 * 1024


class HomeError(Exception):
    """The CLI home is unusable or lacks what a command needs; the message says what to do."""


def default_home(environ: Mapping[str, str]) -> Path:
    """The home directory when ``--home`` is not given."""
    if environ.get(HOME_ENVIRONMENT):
        return Path(environ[HOME_ENVIRONMENT]).expanduser()
    base = environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "tucdesk"


@dataclass
class Settings:
    """Where the service is and how to trust it."""

    server: str
    ca_file: str | None = None


class CliHome:
    """Reads and writes the CLI's state files."""

    def __init__(
        self, path: Path, *, server: str | None = None, ca_file: str | None = None
    ) -> None:
        self.path = Path(path)
        # This run's global --server and --ca-file (login saves its own; see command_settings).
        self.requested_server = server
        self.requested_ca_file = ca_file
        # Set when a damaged token cache was found (and removed) by load_token.
        self.token_was_damaged = False
        # A fresh token the home could not store (read-only): load_token returns it meanwhile.
        self._token_in_memory: dict[str, Any] | None = None

    def ensure(self) -> None:
        """Create the directory (0700) if needed, or give it that mode (only if it has another:
        a read-only home with the right mode is left alone)."""
        self.path.mkdir(parents=True, exist_ok=True)
        if stat.S_IMODE(self.path.stat().st_mode) != HOME_MODE:
            os.chmod(self.path, HOME_MODE)

    @property
    def key_path(self) -> Path:
        """The operator's private key file."""
        return self.path / OPERATOR_KEY_FILE

    def load_settings(self) -> Settings | None:
        """The saved server settings, or None before the first login."""
        data = self._read_json(self.path / SETTINGS_FILE, secret=False)
        if data is None:
            return None
        server = data.get("server")
        if not isinstance(server, str):
            raise HomeError(f"{self.path / SETTINGS_FILE} is damaged; log in again with --server")
        ca_file = data.get("ca_file")
        return Settings(
            server=server, ca_file=self._resolve_saved_ca_file(ca_file)
            if isinstance(ca_file, str) else None,
        )

    def _resolve_saved_ca_file(self, saved: str) -> str:
        """The CA file settings.json names, as a path usable from here.

        The home's own copy is saved relative to the home, so a moved or copied home uses its
        own copy. Settings saved before that name the copy by an absolute path: one that
        points at the copy of a home elsewhere (this home was moved or copied: that home is
        gone, or is a CLI home) means this home's copy when it has one, never the other
        home's. A CA file of the user's that is merely named ca.pem is used as saved.
        """
        own_copy = self.ca_copy_path.absolute()
        if not os.path.isabs(saved):
            return str(self.path.absolute() / saved)
        recorded = Path(saved)
        if (recorded.name == CA_COPY_FILE and own_copy.exists()
                and recorded.resolve() != own_copy.resolve()
                and (not recorded.exists() or (recorded.parent / SETTINGS_FILE).exists())):
            return str(own_copy)
        return saved

    def command_settings(self) -> Settings | None:
        """The saved settings as this run's --server and --ca-file leave them, or None.

        The token was issued by the saved server and goes nowhere else: a --server naming
        another one is refused (HomeError), never silently ignored. --ca-file is used for this
        command in place of the saved one (it only changes how that same server is verified).
        """
        saved = self.load_settings()
        if saved is None:
            return None
        requested = self.requested_server
        if requested is not None and server_key(requested) != server_key(saved.server):
            raise HomeError(
                f"you are logged in to {saved.server}; to use {requested} run "
                f"'tucdesk login --server {requested}' (or use another --home)"
            )
        if self.requested_ca_file is None:
            if saved.ca_file is not None:
                # Checked here so that a missing file is blamed on settings.json, not --ca-file.
                read_ca_certificates(
                    saved.ca_file, source=f"saved in {self.path / SETTINGS_FILE}",
                    remedy="; log in again with --ca-file FILE",
                )
            return saved
        return Settings(server=saved.server, ca_file=str(Path(self.requested_ca_file).resolve()))

    def save_settings(self, settings: Settings) -> None:
        """Remember the server and CA file for later commands."""
        self.ensure()
        ca_file = settings.ca_file
        if ca_file is not None and Path(ca_file).resolve() == self.ca_copy_path.resolve():
            ca_file = CA_COPY_FILE  # relative to the home: still this home's copy once moved
        text = json.dumps({"server": settings.server, "ca_file": ca_file}, indent=2)
        (self.path / SETTINGS_FILE).write_text(text + "\n")

    @property
    def ca_copy_path(self) -> Path:
        """Where login keeps its copy of the CA certificates given with --ca-file."""
        return self.path / CA_COPY_FILE

    def save_ca_copy(self, certificates: bytes) -> Path:
        """Write ``certificates`` (checked by ``read_ca_certificates``) as the home's CA copy,
        0600 and atomically; return its path."""
        self.ensure()
        try:
            write_private_file(self.ca_copy_path, certificates)
        except KeyFileError as error:
            raise HomeError(f"cannot keep a copy of the CA file: {error}") from None
        return self.ca_copy_path

    def load_key(self) -> SigningIdentity | None:
        """The operator key, or None if none was generated here yet."""
        if not self.key_path.exists():
            return None
        return SigningIdentity.load(self.key_path)

    def create_key(self) -> SigningIdentity:
        """Generate the operator key locally and save it 0600 (only its public half leaves)."""
        self.ensure()
        identity = SigningIdentity.generate()
        identity.save(self.key_path)
        return identity

    def load_token(self) -> dict[str, Any] | None:
        """The cached access token record, or None.

        The token is only a cache the operator key can refresh: a damaged one (not JSON, or
        not a token record) is removed with a warning and treated as expired, so no command
        is blocked by it (``token_was_damaged`` tells the caller). Too-open permissions are
        still refused (KeyFileError).
        """
        if self._token_in_memory is not None:
            return self._token_in_memory
        path = self.path / TOKEN_FILE
        try:
            record = self._read_json(path, secret=True)
        except HomeError:
            record = {}
        if record is None or _is_token_record(record):
            return record
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            # A read-only home (a CI job's): sign in anyway; the fresh token then serves this
            # command from memory (Session.token).
            print(f"tucdesk: warning: the cached token in {path} is damaged and cannot be "
                  f"removed ({error.strerror or error}); it is ignored", file=sys.stderr)
        else:
            print(f"tucdesk: the cached token in {path} is damaged; it is ignored and will be "
                  "replaced", file=sys.stderr)
        self.token_was_damaged = True
        return None

    def save_token(self, record: Mapping[str, Any]) -> None:
        """Cache the access token (0600)."""
        self.ensure()
        write_private_file(self.path / TOKEN_FILE, json.dumps(dict(record)).encode())

    def keep_token_in_memory(self, record: Mapping[str, Any]) -> None:
        """Serve ``record`` from load_token for the rest of this process (save_token failed)."""
        self._token_in_memory = dict(record)

    def forget_token(self) -> None:
        """Delete the cached access token."""
        (self.path / TOKEN_FILE).unlink(missing_ok=True)

    def _read_json(self, path: Path, *, secret: bool) -> dict[str, Any] | None:
        if not path.exists():
            return None
        try:
            if secret:
                raw = read_private_file(path)
            else:
                if path.stat().st_size > MAX_STATE_FILE_BYTES:
                    raise HomeError(f"{path} is too large to be a TucDesk state file")
                raw = path.read_bytes()
            data = json.loads(raw)
        except ValueError:
            raise HomeError(f"{path} is damaged; delete it and log in again") from None
        if not isinstance(data, dict):
            raise HomeError(f"{path} is damaged; delete it and log in again")
        return data


def server_key(url: str) -> tuple[str, str, int | None, str]:
    """What makes two server URLs the same server: scheme, host and port (defaults filled in),
    path; case and a trailing slash do not count."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return (url, "", None, "")
    scheme = parts.scheme.lower()
    default_port = {"https": 443, "http": 80}.get(scheme)
    return (scheme, (parts.hostname or "").lower(), port or default_port,
            parts.path.rstrip("/"))


def _is_token_record(record: Mapping[str, Any]) -> bool:
    expires_at = record.get("expires_at")
    return (isinstance(record.get("access_token"), str) and isinstance(expires_at, int | float)
            and not isinstance(expires_at, bool))


def read_ca_certificates(ca_file: str, *, source: str = "--ca-file", remedy: str = "") -> bytes:
    """The contents of ``ca_file`` if it holds PEM certificates (and nothing unreadable);
    HomeError naming the file and where it came from (``source``) otherwise."""
    try:
        with open(ca_file, "rb") as handle:
            data = handle.read(MAX_CA_FILE_BYTES + 1)
    except OSError as error:
        raise HomeError(
            f"cannot use the CA file {ca_file} ({source}): {error.strerror}{remedy}"
        ) from None
    if len(data) > MAX_CA_FILE_BYTES:
        raise HomeError(
            f"cannot use the CA file {ca_file} ({source}): larger than {MAX_CA_FILE_BYTES} "
            f"bytes{remedy}"
        )
    try:
        load_pem_x509_certificates(data)
    except ValueError:
        raise HomeError(
            f"cannot use the CA file {ca_file} ({source}): it holds no PEM certificates "
            f"(-----BEGIN CERTIFICATE-----){remedy}"
        ) from None
    return data
