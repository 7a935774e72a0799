"""Minimal DER *encoders* for the handful of fixed structures fleettrust builds itself.

Why hand-written: these values are produced for every device certificate (the hot path), and
a generic ASN.1 library (pyasn1) costs about as much per value as the ECDSA signature itself.
The structures are tiny and fixed, and the test-suite checks byte-for-byte that the output
equals pyasn1's DER encoding. Decoding is never done here (it goes through pyasn1).
"""

from __future__ import annotations

TAG_INTEGER = 0x02
TAG_OCTET_STRING = 0x04
TAG_OID = 0x06
TAG_UTF8_STRING = 0x0C
TAG_SEQUENCE = 0x30


def length(n: int) -> bytes:
    """DER length octets (short form below 128, minimal long form otherwise)."""
    if n < 0x80:
        return bytes((n,))
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(raw),)) + raw


def tlv(tag: int, content: bytes) -> bytes:
    """One tag-length-value with a single-octet tag."""
    return bytes((tag,)) + length(len(content)) + content


def small_integer(value: int) -> bytes:
    """DER INTEGER for 0 <= value < 128 (all this module ever needs)."""
    if not 0 <= value < 0x80:
        raise ValueError("small_integer only encodes 0..127")
    return bytes((TAG_INTEGER, 1, value))


def oid(dotted: str) -> bytes:
    """DER OBJECT IDENTIFIER for a dotted string (arbitrarily large arcs)."""
    arcs = [int(a) for a in dotted.split(".")]
    if len(arcs) < 2 or min(arcs) < 0 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] >= 40):
        raise ValueError(f"invalid OID {dotted!r}")
    body = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return tlv(TAG_OID, bytes(body))
