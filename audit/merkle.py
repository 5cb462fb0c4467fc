"""RFC 6962 / RFC 9162 Merkle tree hashing, an incremental frontier, and inclusion and
consistency proofs with their verification algorithms.

Leaf hash = SHA-256(0x00 || leaf bytes); interior node = SHA-256(0x01 || left || right); the
empty tree's root is SHA-256 of nothing. Proof generation works from a list of leaf hashes
(what the store keeps); verification follows RFC 9162 sections 2.1.3.2 and 2.1.4.2 step by step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from audit.errors import ProofError

HASH_SIZE = 32
LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    """The RFC 6962 hash of one leaf."""
    return hashlib.sha256(LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """The RFC 6962 hash of an interior node."""
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


class MerkleFrontier:
    """The roots of the perfect subtrees covering a log's leaves: O(log n) append and root."""

    __slots__ = ("_size", "_subtrees")

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        self._size = 0
        self._subtrees: list[bytes] = []
        for leaf in leaf_hashes:
            self.append(leaf)

    @property
    def size(self) -> int:
        """How many leaves the tree holds."""
        return self._size

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash at the right edge of the tree."""
        merged = leaf
        remaining = self._size
        # Each trailing 1 bit of the old size is a full subtree the new leaf completes.
        while remaining & 1:
            merged = node_hash(self._subtrees.pop(), merged)
            remaining >>= 1
        self._subtrees.append(merged)
        self._size += 1

    def root(self) -> bytes:
        """The Merkle tree hash of all leaves so far."""
        if not self._subtrees:
            return EMPTY_ROOT
        root = self._subtrees[-1]
        for subtree in reversed(self._subtrees[:-1]):
            root = node_hash(subtree, root)
        return root

    def copy(self) -> MerkleFrontier:
        """An independent frontier with the same leaves."""
        clone = MerkleFrontier()
        clone._size = self._size
        clone._subtrees = list(self._subtrees)
        return clone


def root_of(leaf_hashes: Sequence[bytes]) -> bytes:
    """The Merkle tree hash over ``leaf_hashes``."""
    return MerkleFrontier(leaf_hashes).root()


def inclusion_proof(leaf_hashes: Sequence[bytes], index: int) -> list[bytes]:
    """RFC 9162 PATH(index, D[n]) for the tree over all of ``leaf_hashes``."""
    size = len(leaf_hashes)
    if not 0 <= index < size:
        raise ProofError(f"no leaf {index} in a tree of size {size}")
    return _path(leaf_hashes, index, 0, size)


def consistency_proof(leaf_hashes: Sequence[bytes], old_size: int) -> list[bytes]:
    """RFC 9162 PROOF(old_size, D[n]) from the tree of ``old_size`` leaves to all of them."""
    size = len(leaf_hashes)
    if not 0 <= old_size <= size:
        raise ProofError(f"cannot prove size {old_size} consistent with size {size}")
    if old_size in (0, size):
        return []
    return _subproof(leaf_hashes, old_size, 0, size, True)


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Raise ProofError unless ``proof`` shows leaf hash ``leaf`` at ``index`` under ``root``."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is outside a tree of size {size}")
    _check_hashes(proof)
    fn, sn = index, size - 1
    result = leaf
    for sibling in proof:
        if sn == 0:
            raise ProofError("inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            result = node_hash(sibling, result)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            result = node_hash(result, sibling)
        fn >>= 1
        sn >>= 1
    if sn != 0 or result != root:
        raise ProofError("inclusion proof does not lead to the root")


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Raise ProofError unless ``proof`` shows the tree ``old_root`` is a prefix of ``new_root``."""
    if not 0 <= old_size <= new_size:
        raise ProofError(f"a tree of size {new_size} cannot extend one of size {old_size}")
    _check_hashes(proof)
    if old_size == new_size:
        if proof or old_root != new_root:
            raise ProofError("equal sizes need an empty proof and equal roots")
        return
    if old_size == 0:
        if proof:
            raise ProofError("consistency with the empty tree needs an empty proof")
        return
    if not proof:
        raise ProofError("consistency proof is empty")
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    first_result = second_result = path[0]
    for node in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            first_result = node_hash(node, first_result)
            second_result = node_hash(node, second_result)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            second_result = node_hash(second_result, node)
        fn >>= 1
        sn >>= 1
    if sn != 0 or first_result != old_root or second_result != new_root:
        raise ProofError("consistency proof does not match the two roots")


def _largest_power_of_two_below(n: int) -> int:
    return 1 << ((n - 1).bit_length() - 1)


def _subtree_root(leaf_hashes: Sequence[bytes], start: int, end: int) -> bytes:
    frontier = MerkleFrontier()
    for position in range(start, end):
        frontier.append(leaf_hashes[position])
    return frontier.root()


def _path(leaf_hashes: Sequence[bytes], index: int, start: int, end: int) -> list[bytes]:
    if end - start == 1:
        return []
    split = start + _largest_power_of_two_below(end - start)
    if index < split:
        return _path(leaf_hashes, index, start, split) + [_subtree_root(leaf_hashes, split, end)]
    return _path(leaf_hashes, index, split, end) + [_subtree_root(leaf_hashes, start, split)]


def _subproof(
    leaf_hashes: Sequence[bytes], old_size: int, start: int, end: int, complete: bool
) -> list[bytes]:
    if start + old_size == end:
        return [] if complete else [_subtree_root(leaf_hashes, start, end)]
    half = _largest_power_of_two_below(end - start)
    split = start + half
    if old_size <= half:
        return _subproof(leaf_hashes, old_size, start, split, complete) + [
            _subtree_root(leaf_hashes, split, end)
        ]
    return _subproof(leaf_hashes, old_size - half, split, end, False) + [
        _subtree_root(leaf_hashes, start, split)
    ]


def _check_hashes(proof: Sequence[bytes]) -> None:
    for node in proof:
        if len(node) != HASH_SIZE:
            raise ProofError(f"proof hashes are {HASH_SIZE} bytes")
