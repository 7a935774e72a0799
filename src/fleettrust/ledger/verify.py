"""Offline verification of what the log serves, with nothing but the log's public key.

What this module does: given JSON documents a client saved (a signed tree head, an entry, an
inclusion proof, an older tree head and a consistency proof, or a full list of entries), it
checks them and raises :class:`LogVerificationError` with a precise, human message and a stable
``code``:

* ``bad_signature`` / ``wrong_log`` — a tree head not signed by this log's key;
* ``tampered_entry`` — an entry's bytes do not hash to the leaf the log committed to, or its
  decoded form differs from its bytes;
* ``bad_inclusion_proof`` — the proof does not lead from the leaf to the tree head's root;
* ``fork`` — two signed tree heads of one size with different roots, or a consistency proof
  that fails between two signed tree heads (the log showed two different histories);
* ``mismatch`` — documents that do not belong together (sizes, indices);
* ``malformed`` — unreadable input.

What it does not do: no network, no files (the CLI reads them), no trust in anything the
server says beyond what the signature and the hashes prove.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from fleettrust.ledger import entry as entries
from fleettrust.ledger import merkle
from fleettrust.ledger.sth import (
    ConsistencyProof,
    InclusionProof,
    SignedTreeHead,
    TreeHeadError,
    verify_sth,
)


class LogVerificationError(Exception):
    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True)
class VerifiedEntry:
    leaf_index: int
    leaf_hash: bytes
    entry: dict[str, Any]


def check_sth(sth: SignedTreeHead, key: ec.EllipticCurvePublicKey, what: str = "STH") -> None:
    try:
        verify_sth(sth, key, what)
    except TreeHeadError as exc:
        code = exc.code if exc.code in ("bad_signature", "wrong_log") else "malformed"
        raise LogVerificationError(str(exc), code) from exc


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return _first_difference(x, y, f"{path}[{i}]")
    return path or "(top level)"


def load_entry(obj: Any) -> tuple[int | None, bytes, bytes | None]:
    """(leaf_index, leaf bytes, claimed leaf hash) of an entry document; checks that its decoded
    ``entry`` (if present) is exactly what its bytes say."""
    if not isinstance(obj, Mapping):
        raise LogVerificationError("entry is not a JSON object", "malformed")
    try:
        data = base64.b64decode(str(obj.get("leaf_data")), validate=True)
        claimed = (base64.b64decode(str(obj["leaf_hash"]), validate=True)
                   if obj.get("leaf_hash") is not None else None)
    except (binascii.Error, ValueError) as exc:
        raise LogVerificationError("entry leaf_data / leaf_hash is not base64", "malformed") \
            from exc
    index = obj.get("leaf_index")
    if index is not None and (not isinstance(index, int) or index < 0):
        raise LogVerificationError("entry leaf_index must be a non-negative integer", "malformed")
    if "entry" in obj:
        try:
            decoded = entries.decode_entry(data)
        except entries.EntryError as exc:
            raise LogVerificationError(f"tampered log entry: leaf_data is not a valid entry "
                                       f"({exc})", "tampered_entry") from exc
        if decoded != obj["entry"]:
            raise LogVerificationError(
                f"tampered log entry (leaf {index}): the decoded 'entry' differs from its "
                f"leaf_data at {_first_difference(decoded, obj['entry'])}", "tampered_entry")
    return index, data, claimed


def verify_inclusion(sth: SignedTreeHead, proof: InclusionProof, entry_doc: Any,
                     key: ec.EllipticCurvePublicKey) -> VerifiedEntry:
    """The entry is leaf ``proof.leaf_index`` of the tree ``sth`` signs."""
    check_sth(sth, key)
    index, data, claimed = load_entry(entry_doc)
    if index is not None and index != proof.leaf_index:
        raise LogVerificationError(
            f"the inclusion proof is for leaf {proof.leaf_index}, the entry is leaf {index}",
            "mismatch")
    if proof.tree_size != sth.tree_size:
        raise LogVerificationError(
            f"the inclusion proof is against tree size {proof.tree_size}, the STH is of size "
            f"{sth.tree_size}", "mismatch")
    computed = merkle.leaf_hash(data)
    for what, committed in (("the inclusion proof", proof.leaf_hash), ("the entry", claimed)):
        if committed is not None and committed != computed:
            raise LogVerificationError(
                f"tampered log entry: leaf {proof.leaf_index}'s data hashes to "
                f"{computed.hex()}, but {what} names leaf hash {committed.hex()}",
                "tampered_entry")
    try:
        merkle.verify_inclusion(proof.leaf_index, proof.tree_size, computed, proof.audit_path,
                                sth.root_hash)
    except merkle.ProofError as exc:
        raise LogVerificationError(
            f"bad inclusion proof: leaf {proof.leaf_index} is not proven to be in the tree of "
            f"size {sth.tree_size} signed by this log ({exc})", "bad_inclusion_proof") from exc
    try:
        decoded = entries.decode_entry(data)
    except entries.EntryError as exc:  # hashed and included, yet not one of our entries
        raise LogVerificationError(f"leaf {proof.leaf_index} is not a fleettrust entry: {exc}",
                                   "malformed") from exc
    return VerifiedEntry(proof.leaf_index, computed, decoded)


def verify_consistency(old: SignedTreeHead, new: SignedTreeHead, proof: ConsistencyProof | None,
                       key: ec.EllipticCurvePublicKey) -> None:
    """The tree ``new`` signs extends the one ``old`` signs (or they are the same tree)."""
    check_sth(old, key, "old STH")
    check_sth(new, key, "STH")
    if old.tree_size > new.tree_size:
        raise LogVerificationError(
            f"the old STH (size {old.tree_size}) is larger than the STH (size {new.tree_size}); "
            "pass the older tree head as the old one", "mismatch")
    if old.tree_size == new.tree_size:
        if old.root_hash != new.root_hash:
            raise LogVerificationError(
                f"forked tree head: two signed tree heads of size {new.tree_size} have "
                f"different roots ({old.root_hash.hex()} and {new.root_hash.hex()}); the log "
                "has shown two different histories", "fork")
        return
    if proof is None:
        raise LogVerificationError(
            f"a consistency proof from size {old.tree_size} to {new.tree_size} is needed",
            "mismatch")
    if (proof.first, proof.second) != (old.tree_size, new.tree_size):
        raise LogVerificationError(
            f"the consistency proof is for sizes {proof.first} -> {proof.second}, the tree "
            f"heads are {old.tree_size} -> {new.tree_size}", "mismatch")
    try:
        merkle.verify_consistency(old.tree_size, new.tree_size, old.root_hash, new.root_hash,
                                  proof.path)
    except merkle.ProofError as exc:
        raise LogVerificationError(
            f"forked tree head: the tree of size {new.tree_size} is not proven to extend the "
            f"tree of size {old.tree_size} ({exc})", "fork") from exc


def verify_entries(sth: SignedTreeHead, docs: Sequence[Any],
                   key: ec.EllipticCurvePublicKey) -> list[VerifiedEntry]:
    """Every entry ``0..tree_size-1``, in order, rebuilds the root the STH signs."""
    check_sth(sth, key)
    out: list[VerifiedEntry] = []
    tree = merkle.MemoryTree()
    for pos, doc in enumerate(docs[: sth.tree_size]):
        index, data, claimed = load_entry(doc)
        if index is not None and index != pos:
            raise LogVerificationError(f"entry {pos} of the list says leaf_index {index}; "
                                       "entries must start at 0 without holes", "mismatch")
        h = merkle.leaf_hash(data)
        if claimed is not None and claimed != h:
            raise LogVerificationError(
                f"tampered log entry: leaf {pos}'s data hashes to {h.hex()}, the entry names "
                f"leaf hash {claimed.hex()}", "tampered_entry")
        tree.extend([h])
        out.append(VerifiedEntry(pos, h, {}))
    if tree.size < sth.tree_size:
        raise LogVerificationError(f"only {tree.size} entries for a tree of size "
                                   f"{sth.tree_size}", "mismatch")
    if tree.root() != sth.root_hash:
        raise LogVerificationError(
            f"tampered log: the {sth.tree_size} entries give root {tree.root().hex()}, the STH "
            f"signs {sth.root_hash.hex()}", "tampered_entry")
    return out
