"""Known-answer tests for the key schedule's primitives, run through protocol.session_keys."""

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocol.errors import HandshakeError
from protocol.session_keys import (
    EphemeralKey,
    hkdf_sha256,
    x25519_public_key,
    x25519_shared_secret,
)

# RFC 7748 section 5.2: (scalar, u-coordinate, output u-coordinate).
RFC7748_VECTORS = [
    (
        "a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
        "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
        "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552",
    ),
    (
        "4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
        "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
        "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957",
    ),
]


@pytest.mark.parametrize(("scalar", "u", "expected"), RFC7748_VECTORS)
def test_x25519_matches_rfc7748_section_5_2(scalar: str, u: str, expected: str) -> None:
    assert x25519_shared_secret(bytes.fromhex(scalar), bytes.fromhex(u)).hex() == expected


@pytest.mark.parametrize(
    ("iterations", "expected"),
    [
        (1, "422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079"),
        (1000, "684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51"),
    ],
)
def test_x25519_iterated_matches_rfc7748(iterations: int, expected: str) -> None:
    k = u = bytes([9]) + bytes(31)
    for _ in range(iterations):
        k, u = x25519_shared_secret(k, u), k
    assert k.hex() == expected


ALICE_PRIVATE = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
ALICE_PUBLIC = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
BOB_PRIVATE = "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"
BOB_PUBLIC = "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
SHARED_SECRET = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"


def test_x25519_diffie_hellman_matches_rfc7748_section_6_1() -> None:
    alice, bob = bytes.fromhex(ALICE_PRIVATE), bytes.fromhex(BOB_PRIVATE)
    assert x25519_public_key(alice).hex() == ALICE_PUBLIC
    assert x25519_public_key(bob).hex() == BOB_PUBLIC
    assert x25519_shared_secret(alice, bytes.fromhex(BOB_PUBLIC)).hex() == SHARED_SECRET
    assert x25519_shared_secret(bob, bytes.fromhex(ALICE_PUBLIC)).hex() == SHARED_SECRET


def test_ephemeral_key_agrees_with_rfc7748_section_6_1() -> None:
    alice = EphemeralKey(X25519PrivateKey.from_private_bytes(bytes.fromhex(ALICE_PRIVATE)))
    assert alice.public.hex() == ALICE_PUBLIC
    assert alice.shared_secret(bytes.fromhex(BOB_PUBLIC)).hex() == SHARED_SECRET


@pytest.mark.parametrize(
    "low_order_point",
    [
        bytes(32),  # 0
        bytes([1]) + bytes(31),  # 1
        bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
        bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
        bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),  # p - 1
    ],
)
def test_x25519_refuses_low_order_points(low_order_point: bytes) -> None:
    with pytest.raises(HandshakeError, match="low-order"):
        x25519_shared_secret(bytes.fromhex(ALICE_PRIVATE), low_order_point)


# RFC 5869 appendix A, test cases 1-3 (SHA-256): (ikm, salt, info, length, okm).
RFC5869_VECTORS = [
    (
        bytes([0x0B] * 22),
        bytes(range(0x00, 0x0D)),
        bytes(range(0xF0, 0xFA)),
        42,
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
    ),
    (
        bytes(range(0x00, 0x50)),
        bytes(range(0x60, 0xB0)),
        bytes(range(0xB0, 0x100)),
        82,
        "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c"
        "59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71"
        "cc30c58179ec3e87c14c01d5c1f3434f1d87",
    ),
    (
        bytes([0x0B] * 22),
        b"",
        b"",
        42,
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
    ),
]


@pytest.mark.parametrize(("ikm", "salt", "info", "length", "okm"), RFC5869_VECTORS)
def test_hkdf_sha256_matches_rfc5869(
    ikm: bytes, salt: bytes, info: bytes, length: int, okm: str
) -> None:
    assert hkdf_sha256(ikm, salt, info, length).hex() == okm


def test_hkdf_sha256_without_salt_equals_zero_salt() -> None:
    ikm = bytes([0x0B] * 22)
    assert hkdf_sha256(ikm, None, b"", 42) == hkdf_sha256(ikm, bytes(32), b"", 42)
