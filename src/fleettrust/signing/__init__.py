"""Signers: the only code that ever holds (or talks to) a private key.

Backends: :class:`~fleettrust.signing.filekeys.FileKeyStore` (PKCS#8 files encrypted with a
passphrase) and :class:`~fleettrust.signing.pkcs11.Pkcs11KeyStore` (a PKCS#11 token, e.g. an HSM
or SoftHSM2). No policy lives here: signers sign what they are handed.
"""

from fleettrust.signing.base import KeyStore, Signer, SignerAlgorithm

__all__ = ["KeyStore", "Signer", "SignerAlgorithm"]
