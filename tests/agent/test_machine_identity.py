"""The machine fingerprint, read from fake filesystem trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.machine_identity import (
    MachineIdentifiers,
    MachineIdentityError,
    read_machine_identifiers,
)

MACHINE_ID = "3d1219c7c4c5404aaa1f6d2a48adfda4"
PRODUCT_UUID = "4c4c4544-0042-3510-8052-b4c04f564433"


def make_interface(root: Path, name: str, mac: str, virtual: bool = False) -> None:
    """A sysfs-like interface: /sys/class/net/NAME -> ../../devices/{pci,virtual}/net/NAME."""
    kind = "virtual" if virtual else "pci0000:00/0000:00:03.0"
    device = root / "sys/devices" / kind / "net" / name
    device.mkdir(parents=True)
    (device / "address").write_text(mac + "\n")
    link_dir = root / "sys/class/net"
    link_dir.mkdir(parents=True, exist_ok=True)
    (link_dir / name).symlink_to(device)


def make_tree(root: Path, machine_id: str | None = MACHINE_ID, uuid: str | None = None) -> Path:
    if machine_id is not None:
        (root / "etc").mkdir(parents=True, exist_ok=True)
        (root / "etc/machine-id").write_text(machine_id + "\n")
    if uuid is not None:
        (root / "sys/class/dmi/id").mkdir(parents=True, exist_ok=True)
        (root / "sys/class/dmi/id/product_uuid").write_text(uuid.upper() + "\n")
    return root


def test_all_identifier_kinds_are_read_and_normalised(tmp_path: Path) -> None:
    make_tree(tmp_path, uuid=PRODUCT_UUID)
    make_interface(tmp_path, "eth0", "02:FC:00:00:00:01")
    make_interface(tmp_path, "enp3s0", "52:54:00:12:34:56")
    identifiers = read_machine_identifiers(tmp_path)
    assert identifiers.machine_id == MACHINE_ID
    assert identifiers.product_uuid == PRODUCT_UUID
    assert identifiers.mac_addresses == ("02:fc:00:00:00:01", "52:54:00:12:34:56")


def test_loopback_virtual_and_zero_mac_interfaces_are_skipped(tmp_path: Path) -> None:
    make_tree(tmp_path)
    make_interface(tmp_path, "lo", "00:00:00:00:00:00", virtual=True)
    make_interface(tmp_path, "veth12ab", "aa:bb:cc:dd:ee:01")
    make_interface(tmp_path, "docker0", "aa:bb:cc:dd:ee:02")
    make_interface(tmp_path, "br-1234", "aa:bb:cc:dd:ee:03")
    make_interface(tmp_path, "virbr0", "aa:bb:cc:dd:ee:04")
    make_interface(tmp_path, "dummy0", "aa:bb:cc:dd:ee:05", virtual=True)
    make_interface(tmp_path, "eth1", "00:00:00:00:00:00")
    make_interface(tmp_path, "eth0", "aa:bb:cc:dd:ee:ff")
    assert read_machine_identifiers(tmp_path).mac_addresses == ("aa:bb:cc:dd:ee:ff",)


def test_dbus_machine_id_is_used_when_etc_machine_id_is_missing(tmp_path: Path) -> None:
    (tmp_path / "var/lib/dbus").mkdir(parents=True)
    (tmp_path / "var/lib/dbus/machine-id").write_text(MACHINE_ID)
    assert read_machine_identifiers(tmp_path).machine_id == MACHINE_ID


@pytest.mark.parametrize("content", ["", "uninitialized", "0" * 32, "not-hex" * 5, "x" * 10_000])
def test_empty_or_placeholder_machine_id_is_ignored(tmp_path: Path, content: str) -> None:
    make_tree(tmp_path, machine_id=content)
    make_interface(tmp_path, "eth0", "aa:bb:cc:dd:ee:ff")
    assert read_machine_identifiers(tmp_path).machine_id is None


def test_placeholder_product_uuid_is_ignored(tmp_path: Path) -> None:
    make_tree(tmp_path, uuid="00000000-0000-0000-0000-000000000000")
    assert read_machine_identifiers(tmp_path).product_uuid is None


def test_machine_without_any_identifier_is_refused_with_advice(tmp_path: Path) -> None:
    make_tree(tmp_path, machine_id=None)
    make_interface(tmp_path, "lo", "00:00:00:00:00:00", virtual=True)
    with pytest.raises(MachineIdentityError, match="machine-id"):
        read_machine_identifiers(tmp_path)


def test_fingerprint_is_sha256_hex_and_independent_of_interface_order(tmp_path: Path) -> None:
    first = MachineIdentifiers(MACHINE_ID, None, ("aa:bb:cc:dd:ee:01", "aa:bb:cc:dd:ee:02"))
    second = MachineIdentifiers(MACHINE_ID, None, ("aa:bb:cc:dd:ee:02", "aa:bb:cc:dd:ee:01"))
    assert first.fingerprint() == second.fingerprint()
    assert first.fingerprint().startswith("SHA256:")
    assert len(first.fingerprint()) == len("SHA256:") + 64


def test_fingerprint_changes_with_any_identifier() -> None:
    base = MachineIdentifiers(MACHINE_ID, PRODUCT_UUID, ("aa:bb:cc:dd:ee:01",))
    variants = [
        MachineIdentifiers("f" * 32, PRODUCT_UUID, ("aa:bb:cc:dd:ee:01",)),
        MachineIdentifiers(MACHINE_ID, None, ("aa:bb:cc:dd:ee:01",)),
        MachineIdentifiers(MACHINE_ID, PRODUCT_UUID, ("aa:bb:cc:dd:ee:02",)),
    ]
    assert len({base.fingerprint(), *(variant.fingerprint() for variant in variants)}) == 4


def test_state_key_material_ignores_network_cards_when_a_stable_id_exists() -> None:
    docked = MachineIdentifiers(MACHINE_ID, None, ("aa:bb:cc:dd:ee:01", "aa:bb:cc:dd:ee:02"))
    undocked = MachineIdentifiers(MACHINE_ID, None, ("aa:bb:cc:dd:ee:01",))
    assert docked.key_material() == undocked.key_material()
    assert docked.fingerprint() != undocked.fingerprint()


def test_state_key_material_falls_back_to_mac_addresses() -> None:
    only_macs = MachineIdentifiers(None, None, ("aa:bb:cc:dd:ee:01",))
    other_macs = MachineIdentifiers(None, None, ("aa:bb:cc:dd:ee:02",))
    assert only_macs.key_material() != other_macs.key_material()


def test_empty_identifiers_have_no_fingerprint() -> None:
    with pytest.raises(MachineIdentityError):
        MachineIdentifiers().fingerprint()
    with pytest.raises(MachineIdentityError):
        MachineIdentifiers().key_material()


def test_this_machine_has_a_fingerprint() -> None:
    try:
        identifiers = read_machine_identifiers()
    except MachineIdentityError:
        pytest.skip("this machine has no identifiers at all")
    assert identifiers.fingerprint().startswith("SHA256:")
