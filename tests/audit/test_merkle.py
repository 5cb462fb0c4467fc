"""Merkle roots, inclusion and consistency proofs against a plain RFC 6962 computation."""

from __future__ import annotations

import hashlib
from functools import lru_cache

import pytest

from audit.errors import ProofError
from audit.merkle import (
    EMPTY_ROOT,
    MerkleFrontier,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root_of,
    verify_consistency,
    verify_inclusion,
)

MAX_TREE_SIZE = 300


class ReferenceTree:
    """RFC 6962 section 2.1 written out literally over the raw entries, memoised per range."""

    def __init__(self, entries: list[bytes]) -> None:
        self.entries = entries
        self.mth = lru_cache(maxsize=None)(self._mth)

    def _mth(self, start: int, end: int) -> bytes:
        n = end - start
        if n == 0:
            return hashlib.sha256(b"").digest()
        if n == 1:
            return hashlib.sha256(b"\x00" + self.entries[start]).digest()
        k = 1
        while k * 2 < n:
            k *= 2
        left, right = self.mth(start, start + k), self.mth(start + k, end)
        return hashlib.sha256(b"\x01" + left + right).digest()

    def path(self, m: int, start: int, end: int) -> list[bytes]:
        n = end - start
        if n == 1:
            return []
        k = 1
        while k * 2 < n:
            k *= 2
        if m < k:
            return self.path(m, start, start + k) + [self.mth(start + k, end)]
        return self.path(m - k, start + k, end) + [self.mth(start, start + k)]

    def subproof(self, m: int, start: int, end: int, b: bool) -> list[bytes]:
        n = end - start
        if m == n:
            return [] if b else [self.mth(start, end)]
        k = 1
        while k * 2 < n:
            k *= 2
        if m <= k:
            return self.subproof(m, start, start + k, b) + [self.mth(start + k, end)]
        return self.subproof(m - k, start + k, end, False) + [self.mth(start, start + k)]


ENTRIES = [f"entry {index}".encode() for index in range(MAX_TREE_SIZE)]
REFERENCE = ReferenceTree(ENTRIES)
LEAVES = [leaf_hash(entry) for entry in ENTRIES]


def sample_positions(n: int) -> list[int]:
    """Every position for small trees; edges, powers of two and a spread for larger ones."""
    if n <= 40:
        return list(range(n))
    picks = {0, 1, n // 2, n - 2, n - 1}
    picks |= {(1 << bit) for bit in range(n.bit_length()) if (1 << bit) < n}
    picks |= {(1 << bit) - 1 for bit in range(1, n.bit_length()) if (1 << bit) - 1 < n}
    picks |= set(range(0, n, max(1, n // 9)))
    return sorted(picks)


def test_empty_tree_root_is_hash_of_nothing() -> None:
    assert root_of([]) == EMPTY_ROOT == REFERENCE.mth(0, 0)


def test_frontier_root_matches_reference_at_every_size() -> None:
    frontier = MerkleFrontier()
    for n in range(1, MAX_TREE_SIZE + 1):
        frontier.append(LEAVES[n - 1])
        assert frontier.size == n
        assert frontier.root() == REFERENCE.mth(0, n), n


@pytest.mark.parametrize("n", range(1, MAX_TREE_SIZE + 1, 1))
def test_inclusion_proofs_match_reference_and_verify(n: int) -> None:
    leaves = LEAVES[:n]
    root = REFERENCE.mth(0, n)
    for m in sample_positions(n):
        proof = inclusion_proof(leaves, m)
        assert proof == REFERENCE.path(m, 0, n), (m, n)
        verify_inclusion(leaves[m], m, n, proof, root)


@pytest.mark.parametrize("n", range(1, MAX_TREE_SIZE + 1, 1))
def test_consistency_proofs_match_reference_and_verify(n: int) -> None:
    leaves = LEAVES[:n]
    new_root = REFERENCE.mth(0, n)
    for m in [*sample_positions(n), n]:
        proof = consistency_proof(leaves, m)
        expected = [] if m in (0, n) else REFERENCE.subproof(m, 0, n, True)
        assert proof == expected, (m, n)
        verify_consistency(m, n, REFERENCE.mth(0, m), new_root, proof)


@pytest.mark.parametrize("n", [2, 3, 7, 8, 9, 64, 100, 255, 300])
def test_inclusion_proof_for_another_leaf_or_root_is_refused(n: int) -> None:
    leaves = LEAVES[:n]
    root = REFERENCE.mth(0, n)
    for m in sample_positions(n):
        proof = inclusion_proof(leaves, m)
        with pytest.raises(ProofError):
            verify_inclusion(leaves[(m + 1) % n], m, n, proof, root)
        with pytest.raises(ProofError):
            verify_inclusion(leaves[m], m, n, proof, REFERENCE.mth(0, n - 1))
        if proof:
            broken = [*proof[:-1], bytes(32)]
            with pytest.raises(ProofError):
                verify_inclusion(leaves[m], m, n, broken, root)
            with pytest.raises(ProofError):
                verify_inclusion(leaves[m], m, n, proof[:-1], root)
        with pytest.raises(ProofError):
            verify_inclusion(leaves[m], m, n, [*proof, bytes(32)], root)


@pytest.mark.parametrize("n", [2, 3, 7, 8, 9, 64, 100, 255, 300])
def test_consistency_proof_with_a_changed_history_is_refused(n: int) -> None:
    leaves = LEAVES[:n]
    new_root = REFERENCE.mth(0, n)
    for m in sample_positions(n)[1:]:
        proof = consistency_proof(leaves, m)
        forked = ReferenceTree([b"forked", *ENTRIES[1:m]]).mth(0, m)
        with pytest.raises(ProofError):
            verify_consistency(m, n, forked, new_root, proof)
        with pytest.raises(ProofError):
            verify_consistency(m, n, REFERENCE.mth(0, m), REFERENCE.mth(0, n - 1), proof)
        for position in range(len(proof)):
            broken = list(proof)
            broken[position] = hashlib.sha256(broken[position]).digest()
            with pytest.raises(ProofError):
                verify_consistency(m, n, REFERENCE.mth(0, m), new_root, broken)


def test_impossible_proof_requests_are_refused() -> None:
    with pytest.raises(ProofError):
        inclusion_proof(LEAVES[:5], 5)
    with pytest.raises(ProofError):
        consistency_proof(LEAVES[:5], 6)
    with pytest.raises(ProofError):
        verify_consistency(6, 5, EMPTY_ROOT, EMPTY_ROOT, [])
    with pytest.raises(ProofError):
        verify_inclusion(LEAVES[0], 0, 0, [], EMPTY_ROOT)
    with pytest.raises(ProofError):
        verify_consistency(3, 3, REFERENCE.mth(0, 3), REFERENCE.mth(0, 3), [bytes(32)])
