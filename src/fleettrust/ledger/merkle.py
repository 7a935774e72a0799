"""The RFC 6962 / RFC 9162 Merkle tree: hashes, tree heads, proofs and their verification.

What this module does:

* Hashing exactly as RFC 9162 §2.1.1: a leaf hash is ``SHA-256(0x00 || data)``, an interior node
  ``SHA-256(0x01 || left || right)``, the empty tree's hash ``SHA-256("")``. ``MTH`` is defined
  for any number of leaves (the left subtree holds the largest power of two *smaller* than ``n``).
* The *shape* of proofs, independent of where hashes are kept: :func:`inclusion_ranges` (RFC
  9162 §2.1.3.1 ``PATH(m, D[n])``) and :func:`consistency_ranges` (§2.1.4.1 ``PROOF(m, D[n])``)
  return the leaf ranges whose subtree hashes make up a proof, in the RFC's order.
  :func:`range_nodes` splits such a range into complete ("perfect") subtrees ``(level, index)``
  — a node at ``level`` ``L`` and ``index`` ``i`` covers leaves ``[i·2^L, (i+1)·2^L)`` — and
  :func:`fold_range` combines their hashes into the range's ``MTH``. A store that keeps every
  complete subtree hash (``services.ledger``) therefore answers any proof with O(log n) reads.
* :func:`append_nodes`: the complete-subtree hashes that appending leaves creates, from the old
  tree's *frontier* (:func:`frontier_nodes`: the complete subtrees of the old size, at most one
  per level) — O(appended + log n) hashing, no other reads.
* Verification exactly as RFC 9162 §2.1.3.2 (:func:`verify_inclusion`) and §2.1.4.2
  (:func:`verify_consistency`), raising :class:`ProofError` with a precise reason.
* :class:`MemoryTree`: a whole tree in memory (every level in lists) for clients and tests.

What it does not do: no I/O, no database, no signatures (``ledger.sth``), no leaf encoding
(``ledger.entry``). Hashes are raw 32-byte ``bytes``; sizes and indices are 0-based ints.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

HASH_SIZE = 32
LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
EMPTY_ROOT = hashlib.sha256(b"").digest()

Node = tuple[int, int]  # (level, index): leaves [index << level, (index + 1) << level)
Range = tuple[int, int]  # leaves [start, end)


class ProofError(ValueError):
    """A proof does not verify, or is malformed; ``code`` names the reason for machines."""

    def __init__(self, message: str, code: str = "proof_invalid") -> None:
        super().__init__(message)
        self.code = code


def leaf_hash(data: bytes) -> bytes:
    """``MTH({d}) = SHA-256(0x00 || d)``."""
    return hashlib.sha256(LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``."""
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """``MTH`` of a list of leaf hashes, bottom-up in O(n) (equal to the RFC's recursion)."""
    if not hashes:
        return EMPTY_ROOT
    level = list(hashes)
    while len(level) > 1:
        nxt = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])  # an unpaired right node moves up unchanged
        level = nxt
    return level[0]


# --- the shape of proofs ----------------------------------------------------------------------


def inclusion_ranges(index: int, size: int) -> list[Range]:
    """Leaf ranges whose hashes form ``PATH(index, D[size])`` (RFC 9162 §2.1.3.1), bottom first."""
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} is outside a tree of size {size}")
    out: list[Range] = []
    start, end = 0, size
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:
            out.append((start + k, end))
            end = start + k
        else:
            out.append((start, start + k))
            start += k
    out.reverse()
    return out


def consistency_ranges(first: int, second: int) -> list[Range]:
    """Leaf ranges whose hashes form ``PROOF(first, D[second])`` (RFC 9162 §2.1.4.1).

    Empty when ``first == second`` or ``first == 0`` (nothing to prove).
    """
    if not 0 <= first <= second:
        raise ValueError(f"no consistency proof from size {first} to size {second}")
    if first in (0, second):
        return []
    out: list[Range] = []
    start, m, n, complete = 0, first, second, True  # SUBPROOF(m, D[start:start+n], complete)
    while m != n:
        k = _split(n)
        if m <= k:
            out.append((start + k, start + n))
            n = k
        else:
            out.append((start, start + k))
            start += k
            m -= k
            n -= k
            complete = False
    if not complete:
        out.append((start, start + n))
    out.reverse()
    return out


def range_nodes(start: int, end: int) -> list[Node]:
    """Complete subtrees that cover ``[start, end)``, left to right (each as large as aligned).

    For the ranges of an RFC tree (those :func:`inclusion_ranges` and :func:`consistency_ranges`
    return, and ``[0, n)``) the sizes strictly decrease, so :func:`fold_range` gives their MTH.
    """
    if not 0 <= start < end:
        raise ValueError(f"empty or negative leaf range [{start}, {end})")
    out: list[Node] = []
    while start < end:
        level = (end - start).bit_length() - 1
        while start & ((1 << level) - 1):
            level -= 1
        out.append((level, start >> level))
        start += 1 << level
    return out


def fold_range(hashes: Sequence[bytes]) -> bytes:
    """MTH of a range from its :func:`range_nodes` hashes: ``node(b1, node(b2, … b_r))``."""
    acc = hashes[-1]
    for h in reversed(hashes[:-1]):
        acc = node_hash(h, acc)
    return acc


def frontier_nodes(size: int) -> list[Node]:
    """The complete subtrees of a tree of ``size`` leaves, largest first (one per set bit)."""
    return range_nodes(0, size) if size else []


def append_nodes(size: int, frontier: Mapping[Node, bytes],
                 new_leaf_hashes: Sequence[bytes]) -> list[tuple[int, int, bytes]]:
    """Every complete subtree ``(level, index, hash)`` that appending ``new_leaf_hashes`` to a
    tree of ``size`` leaves creates, level 0 (the new leaves) first.

    ``frontier`` must hold the hashes of :func:`frontier_nodes` ``(size)``.
    """
    out: list[tuple[int, int, bytes]] = []
    first, cur, level = size, list(new_leaf_hashes), 0
    while cur:
        out.extend((level, first + j, h) for j, h in enumerate(cur))
        if first & 1:  # the left sibling of our first node is complete already: the frontier's
            try:
                cur.insert(0, frontier[(level, first - 1)])
            except KeyError:
                raise ValueError(f"frontier node ({level}, {first - 1}) missing") from None
            first -= 1
        cur = [node_hash(cur[j], cur[j + 1]) for j in range(0, len(cur) - 1, 2)]
        first >>= 1
        level += 1
    return out


def compute_hashes(ranges: Iterable[Range], node: Callable[[Node], bytes]) -> list[bytes]:
    """The MTH of each range, from complete-subtree hashes (``node``: e.g. ``dict.__getitem__``)."""
    return [fold_range([node(n) for n in range_nodes(s, e)]) for s, e in ranges]


def nodes_needed(ranges: Iterable[Range]) -> set[Node]:
    """Every complete subtree that :func:`compute_hashes` will read for ``ranges``."""
    return {n for s, e in ranges for n in range_nodes(s, e)}


# --- verification (RFC 9162 §2.1.3.2 and §2.1.4.2) --------------------------------------------


def _check_hash(value: bytes, what: str) -> None:
    if not isinstance(value, bytes | bytearray) or len(value) != HASH_SIZE:
        raise ProofError(f"{what} is not a {HASH_SIZE}-byte SHA-256 hash", "malformed_hash")


def root_from_inclusion_proof(leaf_index: int, tree_size: int, leaf: bytes,
                              path: Sequence[bytes]) -> bytes:
    """Steps 1–4 of RFC 9162 §2.1.3.2: the root that ``path`` leads to from ``leaf``."""
    if tree_size < 1 or not 0 <= leaf_index < tree_size:
        raise ProofError(f"leaf index {leaf_index} is not inside a tree of size {tree_size}",
                         "index_out_of_range")
    _check_hash(leaf, "the leaf hash")
    for i, p in enumerate(path):
        _check_hash(p, f"inclusion path element {i}")
    fn, sn = leaf_index, tree_size - 1
    r = bytes(leaf)
    for p in path:
        if sn == 0:
            raise ProofError(
                f"inclusion path is too long: {len(path)} hashes for leaf {leaf_index} of a "
                f"tree of size {tree_size}", "path_too_long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError(
            f"inclusion path is too short: {len(path)} hashes for leaf {leaf_index} of a tree "
            f"of size {tree_size}", "path_too_short")
    return r


def verify_inclusion(leaf_index: int, tree_size: int, leaf: bytes, path: Sequence[bytes],
                     root: bytes) -> None:
    """RFC 9162 §2.1.3.2; raises :class:`ProofError` unless ``leaf`` is at ``leaf_index``."""
    _check_hash(root, "the root hash")
    got = root_from_inclusion_proof(leaf_index, tree_size, leaf, path)
    if not hmac.compare_digest(got, root):
        raise ProofError(
            f"inclusion proof for leaf {leaf_index} leads to root {got.hex()}, not to the tree "
            f"head's root {bytes(root).hex()} (size {tree_size})", "root_mismatch")


def verify_consistency(first: int, second: int, first_hash: bytes, second_hash: bytes,
                       path: Sequence[bytes]) -> None:
    """RFC 9162 §2.1.4.2; raises :class:`ProofError` unless the tree of size ``second`` (root
    ``second_hash``) extends the tree of size ``first`` (root ``first_hash``).

    The RFC's algorithm covers ``0 < first < second``; the edge cases follow §2.1.4: equal sizes
    need equal roots and an empty proof, the empty tree is a prefix of every tree.
    """
    _check_hash(first_hash, "the first root hash")
    _check_hash(second_hash, "the second root hash")
    for i, p in enumerate(path):
        _check_hash(p, f"consistency path element {i}")
    if first < 0 or second < first:
        raise ProofError(f"tree size went backwards: {first} -> {second}", "size_backwards")
    if first == second:
        if path:
            raise ProofError("a consistency proof between equal sizes must be empty",
                             "path_too_long")
        if not hmac.compare_digest(bytes(first_hash), bytes(second_hash)):
            raise ProofError(
                f"two different roots for the same tree size {first}: {bytes(first_hash).hex()}"
                f" and {bytes(second_hash).hex()}", "fork")
        return
    if first == 0:
        if path:
            raise ProofError("a consistency proof from the empty tree must be empty",
                             "path_too_long")
        return
    # 1. an empty path fails
    if not path:
        raise ProofError(f"empty consistency proof from size {first} to {second}",
                         "path_too_short")
    proof = list(path)
    # 2. first an exact power of two: prepend first_hash
    if first & (first - 1) == 0:
        proof.insert(0, bytes(first_hash))
    # 3.
    fn, sn = first - 1, second - 1
    # 4.
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # 5.
    fr = sr = proof[0]
    # 6.
    for c in proof[1:]:
        if sn == 0:
            raise ProofError(
                f"consistency proof is too long for sizes {first} -> {second}", "path_too_long")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    # 7.
    if sn != 0:
        raise ProofError(
            f"consistency proof is too short for sizes {first} -> {second}", "path_too_short")
    if not hmac.compare_digest(fr, bytes(first_hash)):
        raise ProofError(
            f"consistency proof does not reproduce the root of size {first}: it gives "
            f"{fr.hex()}, the first tree head says {bytes(first_hash).hex()}", "first_mismatch")
    if not hmac.compare_digest(sr, bytes(second_hash)):
        raise ProofError(
            f"consistency proof does not reproduce the root of size {second}: it gives "
            f"{sr.hex()}, the second tree head says {bytes(second_hash).hex()}",
            "second_mismatch")


# --- an in-memory tree ------------------------------------------------------------------------


@dataclass
class MemoryTree:
    """Every complete subtree hash in lists (``levels[L][i]``); append-only.

    Answers roots and proofs for any size up to :attr:`size` with the same range logic a
    database-backed store uses, so it doubles as that store's reference in tests.
    """

    levels: list[list[bytes]] = field(default_factory=lambda: [[]])

    @classmethod
    def from_leaf_hashes(cls, hashes: Iterable[bytes]) -> MemoryTree:
        tree = cls()
        tree.extend(hashes)
        return tree

    @property
    def size(self) -> int:
        return len(self.levels[0])

    def node(self, key: Node) -> bytes:
        return self.levels[key[0]][key[1]]

    def extend(self, new_leaf_hashes: Iterable[bytes]) -> None:
        hashes = list(new_leaf_hashes)
        frontier = {n: self.node(n) for n in frontier_nodes(self.size)}
        for level, index, h in append_nodes(self.size, frontier, hashes):
            while len(self.levels) <= level:
                self.levels.append([])
            row = self.levels[level]
            if index != len(row):  # pragma: no cover - append_nodes guarantees order
                raise AssertionError("non-contiguous append")
            row.append(h)

    def append(self, data: bytes) -> int:
        """Append one leaf's data; returns its index."""
        self.extend([leaf_hash(data)])
        return self.size - 1

    def root(self, size: int | None = None) -> bytes:
        size = self.size if size is None else size
        if not 0 <= size <= self.size:
            raise ValueError(f"no tree of size {size} (tree has {self.size} leaves)")
        if size == 0:
            return EMPTY_ROOT
        return fold_range([self.node(n) for n in range_nodes(0, size)])

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        size = self.size if size is None else size
        if size > self.size:
            raise ValueError(f"no tree of size {size} (tree has {self.size} leaves)")
        ranges = inclusion_ranges(index, size)
        return compute_hashes(ranges, self.node)

    def consistency_proof(self, first: int, second: int | None = None) -> list[bytes]:
        second = self.size if second is None else second
        if second > self.size:
            raise ValueError(f"no tree of size {second} (tree has {self.size} leaves)")
        return compute_hashes(consistency_ranges(first, second), self.node)

