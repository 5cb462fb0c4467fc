"""Identities: RFC 8032 known answers, purposeful signatures, OpenSSH fingerprints, key files."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.domains import Purpose, framed_message
from protocol.errors import KeyFileError, PayloadError, SignatureError
from protocol.identity import (
    MAX_KEY_FILE_SIZE,
    PrivateKeyFileError,
    PublicIdentity,
    SigningIdentity,
    b64url,
    b64url_decode,
    jwk_thumbprint,
    load_public_key_file,
    load_verifying_key_file,
)

# RFC 8032 section 7.1: (secret key, public key, message, signature), all hex.
RFC8032_TEST_1024_MESSAGE = (
    "08b8b2b733424243760fe426a4b54908632110a66c2f6591eabd3345e3e4eb98"
    "fa6e264bf09efe12ee50f8f54e9f77b1e355f6c50544e23fb1433ddf73be84d8"
    "79de7c0046dc4996d9e773f4bc9efe5738829adb26c81b37c93a1b270b20329d"
    "658675fc6ea534e0810a4432826bf58c941efb65d57a338bbd2e26640f89ffbc"
    "1a858efcb8550ee3a5e1998bd177e93a7363c344fe6b199ee5d02e82d522c4fe"
    "ba15452f80288a821a579116ec6dad2b3b310da903401aa62100ab5d1a36553e"
    "06203b33890cc9b832f79ef80560ccb9a39ce767967ed628c6ad573cb116dbef"
    "efd75499da96bd68a8a97b928a8bbc103b6621fcde2beca1231d206be6cd9ec7"
    "aff6f6c94fcd7204ed3455c68c83f4a41da4af2b74ef5c53f1d8ac70bdcb7ed1"
    "85ce81bd84359d44254d95629e9855a94a7c1958d1f8ada5d0532ed8a5aa3fb2"
    "d17ba70eb6248e594e1a2297acbbb39d502f1a8c6eb6f1ce22b3de1a1f40cc24"
    "554119a831a9aad6079cad88425de6bde1a9187ebb6092cf67bf2b13fd65f270"
    "88d78b7e883c8759d2c4f5c65adb7553878ad575f9fad878e80a0c9ba63bcbcc"
    "2732e69485bbc9c90bfbd62481d9089beccf80cfe2df16a2cf65bd92dd597b07"
    "07e0917af48bbb75fed413d238f5555a7a569d80c3414a8d0859dc65a46128ba"
    "b27af87a71314f318c782b23ebfe808b82b0ce26401d2e22f04d83d1255dc51a"
    "ddd3b75a2b1ae0784504df543af8969be3ea7082ff7fc9888c144da2af58429e"
    "c96031dbcad3dad9af0dcbaaaf268cb8fcffead94f3c7ca495e056a9b47acdb7"
    "51fb73e666c6c655ade8297297d07ad1ba5e43f1bca32301651339e22904cc8c"
    "42f58c30c04aafdb038dda0847dd988dcda6f3bfd15c4b4c4525004aa06eeff8"
    "ca61783aacec57fb3d1f92b0fe2fd1a85f6724517b65e614ad6808d6f6ee34df"
    "f7310fdc82aebfd904b01e1dc54b2927094b2db68d6f903b68401adebf5a7e08"
    "d78ff4ef5d63653a65040cf9bfd4aca7984a74d37145986780fc0b16ac451649"
    "de6188a7dbdf191f64b5fc5e2ab47b57f7f7276cd419c17a3ca8e1b939ae49e4"
    "88acba6b965610b5480109c8b17b80e1b7b750dfc7598d5d5011fd2dcc5600a3"
    "2ef5b52a1ecc820e308aa342721aac0943bf6686b64b2579376504ccc493d97e"
    "6aed3fb0f9cd71a43dd497f01f17c0e2cb3797aa2a2f256656168e6c496afc5f"
    "b93246f6b1116398a346f1a641f3b041e989f7914f90cc2c7fff357876e506b5"
    "0d334ba77c225bc307ba537152f3f1610e4eafe595f6d9d90d11faa933a15ef1"
    "369546868a7f3a45a96768d40fd9d03412c091c6315cf4fde7cb68606937380d"
    "b2eaaa707b4c4185c32eddcdd306705e4dc1ffc872eeee475a64dfac86aba41c"
    "0618983f8741c5ef68d3a101e8a3b8cac60c905c15fc910840b94c00a0b9d0"
)
RFC8032_VECTORS = {
    "TEST 1": (
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555"
        "fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    "TEST 2": (
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
        "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
    "TEST 3": (
        "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac"
        "18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
    ),
    "TEST 1024": (
        "f5e5767cf153319517630f226876b86c8160cc583bc013744c6bf255f5cc0ee5",
        "278117fc144c72340f67d0f2316e8386ceffbf2b2428c9c51fef7c597f1d426e",
        RFC8032_TEST_1024_MESSAGE,
        "0aab4c900501b3e24d7cdf4663326a3a87df5e4843b2cbdb67cbf6e460fec350"
        "aa5371b1508f9f4528ecea23c436d94b5e8fcd4f681e30a6ac00a9704a188a03",
    ),
    "TEST SHA(abc)": (
        "833fe62409237b9d62ec77587520911e9a759cec1d19755b7da901b96dca3d42",
        "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
        hashlib.sha512(b"abc").hexdigest(),
        "dc2a4459e7369633a52b1bf277839a00201009a3efbf3ecb69bea2186c26b589"
        "09351fc9ac90b3ecfdfbc7c66431e0303dca179c138ac17ad9bef1177331a704",
    ),
}


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """Run with umask 000, so a file is only private if the code makes it so."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.parametrize("name", list(RFC8032_VECTORS))
def test_rfc8032_known_answers(name: str) -> None:
    secret, public, message, signature = (bytes.fromhex(part) for part in RFC8032_VECTORS[name])
    if name == "TEST 1024":
        assert len(message) == 1023
    identity = SigningIdentity.from_seed(secret)
    assert identity.public.raw == public
    assert identity.seed() == secret
    assert identity.to_cryptography().sign(message) == signature
    PublicIdentity(public).to_cryptography().verify(signature, message)


def test_purposeful_signature_is_over_prefix_nul_message() -> None:
    identity = SigningIdentity.from_seed(bytes.fromhex(RFC8032_VECTORS["TEST 1"][0]))
    signature = identity.sign(Purpose.REGISTER, b"hello")
    # Ed25519 is deterministic, so the framing is pinned by comparing with a raw signature.
    assert signature == identity.to_cryptography().sign(b"tucdesk-register-v1\x00hello")
    assert framed_message(Purpose.REGISTER, b"hello") == b"tucdesk-register-v1\x00hello"


@pytest.mark.parametrize("purpose", list(Purpose))
def test_sign_and_verify_round_trip_for_every_purpose(purpose: Purpose) -> None:
    identity = SigningIdentity.generate()
    identity.public.verify(purpose, b"message", identity.sign(purpose, b"message"))


def test_signature_for_one_purpose_fails_for_every_other() -> None:
    identity = SigningIdentity.generate()
    for purpose in Purpose:
        signature = identity.sign(purpose, b"message")
        for other in Purpose:
            if other is not purpose:
                with pytest.raises(SignatureError, match=other.value):
                    identity.public.verify(other, b"message", signature)


def test_raw_signature_without_a_purpose_is_refused() -> None:
    identity = SigningIdentity.generate()
    signature = identity.to_cryptography().sign(b"message")
    with pytest.raises(SignatureError):
        identity.public.verify(Purpose.REGISTER, b"message", signature)


def test_signature_over_another_message_or_by_another_key_is_refused() -> None:
    identity, other = SigningIdentity.generate(), SigningIdentity.generate()
    signature = identity.sign(Purpose.APPROVAL, b"message")
    with pytest.raises(SignatureError):
        identity.public.verify(Purpose.APPROVAL, b"messagf", signature)
    with pytest.raises(SignatureError):
        other.public.verify(Purpose.APPROVAL, b"message", signature)


@pytest.mark.parametrize("signature", [b"", b"\x00" * 63, b"\x00" * 65, b"\xff" * 64, "x" * 64])
def test_malformed_signature_is_refused(signature: bytes) -> None:
    identity = SigningIdentity.generate()
    with pytest.raises(SignatureError):
        identity.public.verify(Purpose.REGISTER, b"m", signature)


@pytest.mark.parametrize("raw", [b"", b"\x00" * 31, b"\x00" * 33, "a" * 32])
def test_public_key_of_the_wrong_size_or_type_is_refused(raw: bytes) -> None:
    with pytest.raises(KeyFileError):
        PublicIdentity(raw)


def test_seed_of_the_wrong_size_is_refused() -> None:
    with pytest.raises(KeyFileError):
        SigningIdentity.from_seed(b"\x00" * 31)


def test_repr_names_the_fingerprint_and_never_the_seed() -> None:
    identity = SigningIdentity.from_seed(bytes(range(32)))
    text = repr(identity)
    assert identity.public.fingerprint in text
    seed = identity.seed()
    for encoding in (seed.hex(), b64url(seed), base64.b64encode(seed).decode(), repr(seed)):
        assert encoding not in text


def _independent_fingerprint(raw: bytes) -> str:
    name = b"ssh-ed25519"
    blob = struct.pack(">I", len(name)) + name + struct.pack(">I", len(raw)) + raw
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def test_fingerprint_is_openssh_sha256_of_the_key_blob() -> None:
    identity = SigningIdentity.generate()
    assert identity.public.fingerprint == _independent_fingerprint(identity.public.raw)
    assert len(identity.public.fingerprint) == len("SHA256:") + 43


def test_fingerprint_matches_the_cryptography_openssh_encoding() -> None:
    identity = SigningIdentity.generate()
    line = identity.public.to_cryptography().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    blob = base64.b64decode(line.split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    assert identity.public.fingerprint == "SHA256:" + digest


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen is not installed")
def test_fingerprint_matches_ssh_keygen(tmp_path: Path) -> None:
    key_path = tmp_path / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", str(key_path)],
        check=True, timeout=30, capture_output=True,
    )
    listed = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", str(key_path) + ".pub"],
        check=True, timeout=30, capture_output=True, text=True,
    )
    expected = listed.stdout.split()[1]
    private = serialization.load_ssh_private_key(key_path.read_bytes(), password=None)
    assert isinstance(private, Ed25519PrivateKey)
    assert SigningIdentity(private).public.fingerprint == expected
    public = serialization.load_ssh_public_key((tmp_path / "id_ed25519.pub").read_bytes())
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert PublicIdentity(raw).fingerprint == expected


def _independent_thumbprint(raw: bytes) -> str:
    # RFC 7638 section 3: required members only, lexicographic order, no whitespace, UTF-8.
    x = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    members = json.dumps({"kty": "OKP", "crv": "Ed25519", "x": x}, sort_keys=True,
                         separators=(",", ":"))
    return base64.urlsafe_b64encode(hashlib.sha256(members.encode()).digest()).decode().rstrip("=")


def test_key_id_is_the_rfc7638_thumbprint() -> None:
    identity = SigningIdentity.generate()
    assert identity.public.key_id == _independent_thumbprint(identity.public.raw)
    assert jwk_thumbprint(identity.public.raw) == identity.public.key_id


def test_key_id_matches_the_rfc8037_example() -> None:
    # RFC 8037 appendix A.3: the JWK thumbprint of the RFC 8032 TEST 1 public key.
    public = PublicIdentity(bytes.fromhex(RFC8032_VECTORS["TEST 1"][1]))
    assert b64url(public.raw) == "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
    assert public.key_id == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def test_saved_key_file_is_0600_even_with_a_permissive_umask(
    tmp_path: Path, permissive_umask: None
) -> None:
    identity = SigningIdentity.generate()
    path = tmp_path / "keys" / "operator.key"
    identity.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert SigningIdentity.load(path).public == identity.public


def test_saving_over_an_existing_key_keeps_it_0600(tmp_path: Path, permissive_umask: None) -> None:
    path = tmp_path / "operator.key"
    path.write_bytes(b"old")
    path.chmod(0o644)
    SigningIdentity.generate().save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("mode", [0o640, 0o644, 0o604, 0o660])
def test_private_key_readable_by_others_is_refused_naming_chmod(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "operator.key"
    SigningIdentity.generate().save(path)
    path.chmod(mode)
    with pytest.raises(KeyFileError, match=f"chmod 600 {path}"):
        SigningIdentity.load(path)


def test_a_leftover_temporary_file_does_not_block_saving(tmp_path: Path) -> None:
    path = tmp_path / "operator.key"
    for pid_suffix in (str(os.getpid()), "0"):
        (tmp_path / f".operator.key.tmp-{pid_suffix}").write_bytes(b"crashed writer")
    identity = SigningIdentity.generate()
    identity.save(path)
    assert SigningIdentity.load(path).public == identity.public


def test_unwritable_key_location_is_a_key_file_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_bytes(b"")
    with pytest.raises(KeyFileError, match="cannot create key file"):
        SigningIdentity.generate().save(blocker / "operator.key")


def test_private_key_file_too_large_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "operator.key"
    SigningIdentity.generate().save(path)
    with path.open("ab") as handle:
        handle.write(b"\n" * MAX_KEY_FILE_SIZE)
    with pytest.raises(KeyFileError, match="larger than any key file"):
        SigningIdentity.load(path)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"garbage",
        os.urandom(512),
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        b"-----BEGIN PRIVATE KEY-----\n" + b"A" * 64 + b"\n-----END PRIVATE KEY-----\n",
        b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
    ],
)
def test_garbage_private_key_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "operator.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError):
        SigningIdentity.load(path)


def test_private_key_of_another_algorithm_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "operator.key"
    path.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="not Ed25519"):
        SigningIdentity.load(path)


def test_missing_key_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="no such key file"):
        SigningIdentity.load(tmp_path / "absent.key")
    with pytest.raises(KeyFileError, match="no such key file"):
        load_public_key_file(tmp_path / "absent.pub")


def test_directory_and_fifo_are_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo, 0o600)
    directory = tmp_path / "dir.key"
    directory.mkdir(mode=0o700)
    for path in (fifo, directory):
        with pytest.raises(KeyFileError):
            SigningIdentity.load(path)
        with pytest.raises(KeyFileError):
            load_public_key_file(path)


def test_public_key_file_round_trips(tmp_path: Path) -> None:
    identity = SigningIdentity.generate()
    path = tmp_path / "operator.pub"
    path.write_bytes(identity.public.to_pem())
    assert load_public_key_file(path) == identity.public
    assert PublicIdentity.from_pem(identity.public.to_pem()) == identity.public


def test_public_key_can_be_read_from_the_private_key_file(tmp_path: Path) -> None:
    identity = SigningIdentity.generate()
    path = tmp_path / "operator.key"
    identity.save(path)
    assert load_public_key_file(path) == identity.public


def test_a_verifier_gets_the_public_key_and_never_a_private_one(tmp_path: Path) -> None:
    identity = SigningIdentity.generate()
    public, private = tmp_path / "audit.pub", tmp_path / "audit.key"
    public.write_bytes(identity.public.to_pem())
    identity.save(private)
    assert load_verifying_key_file(public) == identity.public
    with pytest.raises(PrivateKeyFileError, match="holds a private key"):
        load_verifying_key_file(private)
    (tmp_path / "other.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n")
    with pytest.raises(KeyFileError, match="not a PEM Ed25519 public key"):
        load_verifying_key_file(tmp_path / "other.pem")
    with pytest.raises(KeyFileError, match="no such key file"):
        load_verifying_key_file(tmp_path / "absent.pub")
    # What PublicIdentity.from_pem refuses is named with the file too.
    broken = tmp_path / "broken.pub"
    broken.write_bytes(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    with pytest.raises(KeyFileError) as refused:
        load_verifying_key_file(broken)
    assert str(refused.value) == f"{broken}: not a PEM public key"
    ec_key = tmp_path / "ec.pub"
    ec_key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(KeyFileError) as refused:
        load_verifying_key_file(ec_key)
    assert str(refused.value) == f"{ec_key}: public key is not Ed25519"


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage", b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"],
)
def test_garbage_public_key_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "operator.pub"
    path.write_bytes(content)
    with pytest.raises(KeyFileError):
        load_public_key_file(path)


def test_public_key_of_another_algorithm_is_refused() -> None:
    pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(KeyFileError, match="not Ed25519"):
        PublicIdentity.from_pem(pem)


def test_public_key_file_too_large_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "operator.pub"
    path.write_bytes(SigningIdentity.generate().public.to_pem() + b"\n" * MAX_KEY_FILE_SIZE)
    with pytest.raises(KeyFileError, match="larger than any key file"):
        load_public_key_file(path)


@settings(max_examples=200)
@given(st.binary(max_size=100))
def test_b64url_round_trips(data: bytes) -> None:
    text = b64url(data)
    assert "=" not in text
    assert b64url_decode(text) == data


@pytest.mark.parametrize("text", ["AA==", "A", "AB", "A+/A", "AA AA", "AAA\n", "ÄÄÄÄ", "AAB"])
def test_b64url_decode_refuses_padded_foreign_or_non_canonical_text(text: str) -> None:
    # "AB" and "AAB" carry non-zero unused bits: a second spelling of the same bytes.
    with pytest.raises(PayloadError):
        b64url_decode(text)


def test_b64url_decode_refuses_oversized_text() -> None:
    assert b64url_decode(b64url(b"\x01" * 64), max_size=64) == b"\x01" * 64
    with pytest.raises(PayloadError, match="too large"):
        b64url_decode(b64url(b"\x01" * 65), max_size=64)


@settings(max_examples=300)
@given(st.text(max_size=60))
def test_b64url_decode_of_arbitrary_text_raises_only_payload_error(text: str) -> None:
    try:
        data = b64url_decode(text)
    except PayloadError:
        return
    assert b64url(data) == text
