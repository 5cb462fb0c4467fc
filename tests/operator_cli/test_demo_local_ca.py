"""The demo's throwaway CA: a server certificate for loopback that verifies under that CA only."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID

from operator_cli.local_ca import create_local_certificates


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_the_server_certificate_is_issued_by_the_local_ca_for_loopback(tmp_path: Path) -> None:
    paths = create_local_certificates(tmp_path / "tls")
    ca, server = load(paths.ca_cert), load(paths.server_cert)
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usage
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_the_ca_can_sign_servers_only_not_other_cas(tmp_path: Path) -> None:
    ca = load(create_local_certificates(tmp_path / "tls").ca_cert)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0


def test_the_server_key_is_private_and_the_ca_key_is_not_kept(tmp_path: Path) -> None:
    paths = create_local_certificates(tmp_path / "tls")
    assert stat.S_IMODE(paths.server_key.stat().st_mode) == 0o600
    assert sorted(p.name for p in (tmp_path / "tls").iterdir()) == [
        "ca.pem", "server.key", "server.pem",
    ]


def test_each_run_makes_a_different_ca(tmp_path: Path) -> None:
    first = load(create_local_certificates(tmp_path / "one").ca_cert)
    second = load(create_local_certificates(tmp_path / "two").ca_cert)
    server_of_second = load(tmp_path / "two" / "server.pem")
    with pytest.raises(InvalidSignature):
        server_of_second.verify_directly_issued_by(first)
    assert first.public_key() != second.public_key()
