"""The Merkle tree against RFC 9162's definitions and published known-answer vectors.

* An independent, deliberately naive implementation of RFC 9162 §2.1.1 (MTH), §2.1.3.1
  (PATH) and §2.1.4.1 (PROOF/SUBPROOF) — plain recursion over lists, written from the RFC text —
  is compared with ``fleettrust.ledger.merkle`` for every tree size 1..64 (every leaf, every
  pair of sizes) and for random pairs up to 1,000 leaves.
* Known answers copied from transparency-dev/merkle (Apache-2.0):
  ``rfc6962/rfc6962_test.go`` (hasher vectors) and ``proof/verify_test.go`` (the RFC 6962
  reference tree of 8 leaves: roots, inclusion and consistency proofs; originally from
  certificate-transparency's ``merkle_tree_test.cc``). Their leaf numbers are 1-based there.
* Verification (RFC 9162 §2.1.3.2 and §2.1.4.2) must refuse every corruption the Go tests
  probe: wrong index/size/root/leaf, trailing or preceding garbage, flipped bits, truncated or
  extended paths.
"""

from __future__ import annotations

import hashlib
import random

import pytest

from fleettrust.ledger import merkle
from fleettrust.ledger.merkle import (
    MemoryTree,
    ProofError,
    leaf_hash,
    node_hash,
    verify_consistency,
    verify_inclusion,
)

# --- naive RFC 9162 reference -------------------------------------------------------------------


def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def naive_mth(d: list[bytes]) -> bytes:
    if not d:
        return hashlib.sha256(b"").digest()
    if len(d) == 1:
        return hashlib.sha256(b"\x00" + d[0]).digest()
    k = _k(len(d))
    return hashlib.sha256(b"\x01" + naive_mth(d[:k]) + naive_mth(d[k:])).digest()


def naive_path(m: int, d: list[bytes]) -> list[bytes]:
    if len(d) == 1:
        return []
    k = _k(len(d))
    if m < k:
        return [*naive_path(m, d[:k]), naive_mth(d[k:])]
    return [*naive_path(m - k, d[k:]), naive_mth(d[:k])]


def naive_subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [naive_mth(d)]
    k = _k(n)
    if m <= k:
        return [*naive_subproof(m, d[:k], b), naive_mth(d[k:])]
    return [*naive_subproof(m - k, d[k:], False), naive_mth(d[:k])]


def naive_proof(m: int, d: list[bytes]) -> list[bytes]:
    return naive_subproof(m, d, True)


def _data(n: int) -> list[bytes]:
    return [b"leaf-%d" % i for i in range(n)]


# --- exhaustive and random comparison ------------------------------------------------------------


def test_every_size_up_to_64_matches_the_rfc_definitions() -> None:
    data = _data(64)
    tree = MemoryTree.from_leaf_hashes(leaf_hash(x) for x in data)
    for n in range(1, 65):
        d = data[:n]
        root = naive_mth(d)
        assert tree.root(n) == root
        assert merkle.root_from_leaf_hashes([leaf_hash(x) for x in d]) == root
        for m in range(n):
            path = tree.inclusion_proof(m, n)
            assert path == naive_path(m, d), (m, n)
            verify_inclusion(m, n, leaf_hash(d[m]), path, root)
        for m in range(1, n + 1):
            proof = tree.consistency_proof(m, n)
            assert proof == naive_proof(m, d), (m, n)
            verify_consistency(m, n, tree.root(m), root, proof)


def test_random_pairs_up_to_1000_leaves() -> None:
    rnd = random.Random(9162)
    data = _data(1000)
    tree = MemoryTree.from_leaf_hashes(leaf_hash(x) for x in data)
    for _ in range(150):
        n = rnd.randint(1, 1000)
        m = rnd.randint(1, n)
        i = rnd.randrange(n)
        d = data[:n]
        root = naive_mth(d)
        assert tree.root(n) == root
        path = tree.inclusion_proof(i, n)
        assert path == naive_path(i, d)
        verify_inclusion(i, n, leaf_hash(d[i]), path, root)
        proof = tree.consistency_proof(m, n)
        assert proof == naive_proof(m, d)
        verify_consistency(m, n, naive_mth(data[:m]), root, proof)


def test_incremental_appends_equal_a_tree_built_at_once() -> None:
    rnd = random.Random(6962)
    data = _data(777)
    hashes = [leaf_hash(x) for x in data]
    whole = MemoryTree.from_leaf_hashes(hashes)
    grown = MemoryTree()
    pos = 0
    while pos < len(hashes):
        step = rnd.choice([1, 2, 3, 7, 64, 100])
        grown.extend(hashes[pos:pos + step])
        pos += step
        assert grown.root() == whole.root(grown.size)
    assert grown.levels == whole.levels


def test_range_nodes_cover_ranges_with_aligned_complete_subtrees() -> None:
    for start, end in [(0, 1), (0, 6), (4, 7), (8, 13), (0, 1000)]:
        covered = []
        for level, idx in merkle.range_nodes(start, end):
            lo = idx << level
            covered.extend(range(lo, lo + (1 << level)))
        assert covered == list(range(start, end))


# --- known answers -------------------------------------------------------------------------------

# transparency-dev/merkle rfc6962/rfc6962_test.go
HASHER_VECTORS = [
    ("empty root", hashlib.sha256(b"").digest(),
     "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
    ("empty leaf", leaf_hash(b""),
     "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
    ("leaf L123456", leaf_hash(b"L123456"),
     "395aa064aa4c29f7010acfe3f25db9485bbd4b91897b6ad7ad547639252b4d56"),
    ("node N123 N456", node_hash(b"N123", b"N456"),
     "aa217fe888e47007fa15edab33c2b492a722cb106c64667fc2b044444de66bbb"),
]

# transparency-dev/merkle proof/verify_test.go (leaves, roots, inclusionProofs,
# consistencyProofs); leaf numbers there are 1-based, sizes are leaf counts.
CT_LEAVES = [bytes.fromhex(h) for h in (
    "", "00", "10", "2021", "3031", "40414243", "5051525354555657",
    "606162636465666768696a6b6c6d6e6f")]
CT_ROOTS = [bytes.fromhex(h) for h in (
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328")]
CT_INCLUSION = [  # (leaf number 1-based, tree size, path)
    (1, 1, []),
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (3, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (2, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]
CT_CONSISTENCY = [  # (size1, size2, proof)
    (1, 1, []),
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
    (6, 7, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
]
SOME_HASH = bytes.fromhex("abacaba000000000000000000000000000000000000000000060061e00123456")
EMPTY = bytes.fromhex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")


@pytest.mark.parametrize(("name", "got", "want"), HASHER_VECTORS,
                         ids=[v[0] for v in HASHER_VECTORS])
def test_hasher_known_answers(name: str, got: bytes, want: str) -> None:
    assert got.hex() == want
    assert merkle.EMPTY_ROOT.hex() == HASHER_VECTORS[0][2]


def _ct_tree() -> MemoryTree:
    return MemoryTree.from_leaf_hashes(leaf_hash(x) for x in CT_LEAVES)


def test_reference_tree_roots() -> None:
    tree = _ct_tree()
    assert tree.root(0) == EMPTY
    for n in range(1, 9):
        assert tree.root(n) == CT_ROOTS[n - 1]
        assert naive_mth(CT_LEAVES[:n]) == CT_ROOTS[n - 1]


@pytest.mark.parametrize(("leaf", "size", "path"), CT_INCLUSION)
def test_reference_inclusion_proofs(leaf: int, size: int, path: list[str]) -> None:
    want = [bytes.fromhex(h) for h in path]
    assert _ct_tree().inclusion_proof(leaf - 1, size) == want
    verify_inclusion(leaf - 1, size, leaf_hash(CT_LEAVES[leaf - 1]), want, CT_ROOTS[size - 1])


@pytest.mark.parametrize(("size1", "size2", "proof"), CT_CONSISTENCY)
def test_reference_consistency_proofs(size1: int, size2: int, proof: list[str]) -> None:
    want = [bytes.fromhex(h) for h in proof]
    assert _ct_tree().consistency_proof(size1, size2) == want
    verify_consistency(size1, size2, CT_ROOTS[size1 - 1], CT_ROOTS[size2 - 1], want)


# --- verification refuses corruptions (the probes of verify_test.go) -----------------------------


def _inclusion_probes(i: int, n: int, path: list[bytes], root: bytes,
                      leaf: bytes) -> list[tuple[str, int, int, bytes, list[bytes], bytes]]:
    probes = [
        ("index - 1", i - 1, n, leaf, path, root),
        ("index + 1", i + 1, n, leaf, path, root),
        ("index ^ 2", i ^ 2, n, leaf, path, root),
        ("size * 2", i, n * 2, leaf, path, root),
        ("size / 2", i, n // 2, leaf, path, root),
        ("wrong leaf", i, n, leaf_hash(b"WrongLeaf"), path, root),
        ("empty root", i, n, leaf, path, EMPTY),
        ("random root", i, n, leaf, path, SOME_HASH),
        ("trailing root", i, n, leaf, [*path, root], root),
        ("preceding root", i, n, leaf, [root, *path], root),
    ]
    for j in range(len(path)):
        bad = list(path)
        bad[j] = bytes([bad[j][0] ^ 8]) + bad[j][1:]
        probes.append((f"flip proof[{j}]", i, n, leaf, bad, root))
    if path:
        probes.append(("removed component", i, n, leaf, path[:-1], root))
    if len(path) > 1:
        probes.append(("inserted component", i, n, leaf, [path[0], SOME_HASH, *path[1:]], root))
    return probes


@pytest.mark.parametrize(("leaf", "size", "path"), CT_INCLUSION[1:])
def test_inclusion_verification_refuses_corruptions(leaf: int, size: int,
                                                    path: list[str]) -> None:
    good = [bytes.fromhex(h) for h in path]
    lh = leaf_hash(CT_LEAVES[leaf - 1])
    for desc, i, n, lf, p, root in _inclusion_probes(leaf - 1, size, good, CT_ROOTS[size - 1],
                                                     lh):
        try:
            verify_inclusion(i, n, lf, p, root)
        except ProofError:
            continue
        pytest.fail(f"accepted corrupted inclusion proof: {desc}")


def test_inclusion_edge_cases() -> None:
    h = leaf_hash(b"data")
    verify_inclusion(0, 1, h, [], h)  # a one-leaf tree: the root is the leaf hash
    for i, n in [(0, 0), (1, 0), (2, 1), (1, 1)]:
        with pytest.raises(ProofError, match="not inside a tree"):
            verify_inclusion(i, n, SOME_HASH, [], EMPTY)
    with pytest.raises(ProofError, match="32-byte"):
        verify_inclusion(0, 1, b"", [], h)
    with pytest.raises(ProofError, match="too short"):
        verify_inclusion(0, 8, leaf_hash(CT_LEAVES[0]), [], CT_ROOTS[7])
    with pytest.raises(ProofError, match="too long"):
        verify_inclusion(0, 1, h, [h], h)


@pytest.mark.parametrize(("size1", "size2", "proof"), [c for c in CT_CONSISTENCY if c[2]])
def test_consistency_verification_refuses_corruptions(size1: int, size2: int,
                                                      proof: list[str]) -> None:
    good = [bytes.fromhex(h) for h in proof]
    r1, r2 = CT_ROOTS[size1 - 1], CT_ROOTS[size2 - 1]
    probes = [
        ("size1 - 1", size1 - 1, size2, r1, r2, good),
        ("size1 + 1", size1 + 1, size2, r1, r2, good),
        ("size1 ^ 2", size1 ^ 2, size2, r1, r2, good),
        ("size2 * 2", size1, size2 * 2, r1, r2, good),
        ("size2 / 2", size1, size2 // 2, r1, r2, good),
        ("wrong root1", size1, size2, SOME_HASH, r2, good),
        ("wrong root2", size1, size2, r1, SOME_HASH, good),
        ("swapped roots", size1, size2, r2, r1, good),
        ("empty proof", size1, size2, r1, r2, []),
        ("trailing root1", size1, size2, r1, r2, [*good, r1]),
        ("trailing root2", size1, size2, r1, r2, [*good, r2]),
        ("preceding root1", size1, size2, r1, r2, [r1, *good]),
        ("preceding root2", size1, size2, r1, r2, [r2, *good]),
        ("preceding proof[0]", size1, size2, r1, r2, [good[0], *good]),
        ("truncated", size1, size2, r1, r2, good[:-1]),
    ]
    for j in range(len(good)):
        bad = list(good)
        bad[j] = bytes([bad[j][0] ^ 16]) + bad[j][1:]
        probes.append((f"flip proof[{j}]", size1, size2, r1, r2, bad))
    for desc, m, n, a, b, p in probes:
        try:
            verify_consistency(m, n, a, b, p)
        except ProofError:
            continue
        pytest.fail(f"accepted corrupted consistency proof: {desc}")


def test_consistency_edge_cases() -> None:
    r1 = leaf_hash(b"don't care 1")
    r2 = leaf_hash(b"don't care 2")
    verify_consistency(0, 0, r1, r1, [])
    verify_consistency(0, 1, r1, r2, [])  # the empty tree is a prefix of every tree
    verify_consistency(1, 1, r2, r2, [])
    with pytest.raises(ProofError, match="different roots for the same tree size") as exc:
        verify_consistency(1, 1, r1, r2, [])
    assert exc.value.code == "fork"
    with pytest.raises(ProofError, match="backwards"):
        verify_consistency(2, 1, r1, r2, [])
    with pytest.raises(ProofError, match="empty consistency proof"):
        verify_consistency(1, 2, r1, r2, [])
    with pytest.raises(ProofError, match="must be empty"):
        verify_consistency(1, 1, EMPTY, EMPTY, [EMPTY])
    with pytest.raises(ProofError, match="must be empty"):
        verify_consistency(0, 1, EMPTY, EMPTY, [EMPTY])
