"""The machine fingerprint: OS and hardware identifiers that bind an agent's state to one host.

Sources, whichever the platform has: the systemd/D-Bus machine id, the DMI product UUID
(often readable by root only, absent in many containers and VMs), and the MAC addresses of
physical network interfaces. Everything is read relative to a root directory so tests can
build fake trees.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

MACHINE_ID_PATHS = ("etc/machine-id", "var/lib/dbus/machine-id")
DMI_PRODUCT_UUID_PATH = "sys/class/dmi/id/product_uuid"
NET_CLASS_PATH = "sys/class/net"
# Interfaces that come and go with containers, bridges and VMs say nothing about the machine.
VIRTUAL_INTERFACE_PREFIXES = ("lo", "veth", "docker", "br-", "virbr", "vnet", "tun", "tap", "ifb")
# A sysfs interface link that resolves under this directory is a software (virtual) device.
VIRTUAL_DEVICE_MARKER = "/devices/virtual/"
MAX_IDENTIFIER_FILE_SIZE = 4096
MAX_INTERFACES = 256
FINGERPRINT_ENCODING_VERSION = "tucdesk-machine-v1"

_MACHINE_ID_PATTERN = re.compile(r"[0-9a-f]{32}")
_UUID_PATTERN = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_MAC_PATTERN = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
# Firmware placeholders that many boards ship instead of a real product UUID.
_PLACEHOLDER_UUIDS = frozenset(
    {"00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff"}
)
_ZERO_MAC = "00:00:00:00:00:00"


class MachineIdentityError(Exception):
    """The machine offers no identifier at all, so no machine-bound state can be made."""


@dataclass(frozen=True)
class MachineIdentifiers:
    """What this host says about itself; each field is None or empty when the platform lacks it."""

    machine_id: str | None = None
    product_uuid: str | None = None
    mac_addresses: tuple[str, ...] = ()

    def is_empty(self) -> bool:
        """True when no identifier at all was found."""
        return self.machine_id is None and self.product_uuid is None and not self.mac_addresses

    def canonical_encoding(self) -> bytes:
        """Every identifier as sorted ``kind=value`` lines after a version line."""
        lines = [f"{kind}={value}" for kind, value in self._entries()]
        return _encode(lines)

    def key_material(self) -> bytes:
        """The stable identifiers only, as input for deriving the state-file key.

        The machine id and product UUID survive reboots and hardware changes such as a new
        network card or a docking station; MAC addresses are used only when neither exists.
        """
        stable = [(kind, value) for kind, value in self._entries() if kind != "mac"]
        chosen = stable or list(self._entries())
        if not chosen:
            raise MachineIdentityError(_NO_IDENTIFIER_MESSAGE)
        return _encode([f"{kind}={value}" for kind, value in chosen])

    def digest(self) -> bytes:
        """SHA-256 over the canonical encoding of every identifier."""
        if self.is_empty():
            raise MachineIdentityError(_NO_IDENTIFIER_MESSAGE)
        return hashlib.sha256(self.canonical_encoding()).digest()

    def fingerprint(self) -> str:
        """The machine fingerprint as shown to people and sent at enrollment: ``SHA256:<hex>``."""
        return "SHA256:" + self.digest().hex()

    def _entries(self) -> list[tuple[str, str]]:
        entries: list[tuple[str, str]] = []
        if self.machine_id is not None:
            entries.append(("machine-id", self.machine_id))
        if self.product_uuid is not None:
            entries.append(("product-uuid", self.product_uuid))
        entries.extend(("mac", mac) for mac in self.mac_addresses)
        return sorted(entries)


_NO_IDENTIFIER_MESSAGE = (
    "this machine has no usable identifier (no /etc/machine-id, no DMI product UUID, no physical "
    "network interface); create one with 'systemd-machine-id-setup' or 'dbus-uuidgen "
    "--ensure=/etc/machine-id' and try again"
)


def read_machine_identifiers(root: Path = Path("/")) -> MachineIdentifiers:
    """Read every identifier found under ``root``; raise MachineIdentityError if there is none."""
    root = Path(root)
    identifiers = MachineIdentifiers(
        machine_id=_read_machine_id(root),
        product_uuid=_read_product_uuid(root),
        mac_addresses=_read_mac_addresses(root),
    )
    if identifiers.is_empty():
        raise MachineIdentityError(_NO_IDENTIFIER_MESSAGE)
    return identifiers


def _encode(lines: list[str]) -> bytes:
    return "\n".join([FINGERPRINT_ENCODING_VERSION, *sorted(lines)]).encode("ascii") + b"\n"


def _read_small_text(path: Path) -> str | None:
    """The stripped, lower-cased text of a small file, or None when it is missing or unreadable."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_IDENTIFIER_FILE_SIZE + 1)
    except OSError:
        return None
    if len(data) > MAX_IDENTIFIER_FILE_SIZE:
        return None
    try:
        return data.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        return None


def _read_machine_id(root: Path) -> str | None:
    for relative in MACHINE_ID_PATHS:
        value = _read_small_text(root / relative)
        # An empty or "uninitialized" machine id (first boot, some images) identifies nothing.
        if value is not None and _MACHINE_ID_PATTERN.fullmatch(value) and set(value) != {"0"}:
            return value
    return None


def _read_product_uuid(root: Path) -> str | None:
    value = _read_small_text(root / DMI_PRODUCT_UUID_PATH)
    if value is None or not _UUID_PATTERN.fullmatch(value) or value in _PLACEHOLDER_UUIDS:
        return None
    return value


def _read_mac_addresses(root: Path) -> tuple[str, ...]:
    net = root / NET_CLASS_PATH
    try:
        interfaces = sorted(net.iterdir())[:MAX_INTERFACES]
    except OSError:
        return ()
    addresses: set[str] = set()
    for interface in interfaces:
        if interface.name.startswith(VIRTUAL_INTERFACE_PREFIXES) or _is_virtual_device(interface):
            continue
        mac = _read_small_text(interface / "address")
        if mac is not None and _MAC_PATTERN.fullmatch(mac) and mac != _ZERO_MAC:
            addresses.add(mac)
    return tuple(sorted(addresses))


def _is_virtual_device(interface: Path) -> bool:
    try:
        target = interface.resolve()
    except OSError:
        return False
    return VIRTUAL_DEVICE_MARKER in target.as_posix() + "/"
