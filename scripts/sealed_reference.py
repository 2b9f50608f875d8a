#!/usr/bin/env python3
"""Known-answer values for crypto/src/sealed.rs, computed with Python's
`cryptography` (X25519, HKDF-SHA256, AES-256-GCM): an implementation
independent of the Rust crates. Writes scripts/sealed_reference.json."""
import json
import pathlib

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

RAW = (Encoding.Raw, PublicFormat.Raw)
recipient = X25519PrivateKey.from_private_bytes(bytes([7] * 32))
ephemeral = X25519PrivateKey.from_private_bytes(bytes([9] * 32))
recipient_pub = recipient.public_key().public_bytes(*RAW)
ephemeral_pub = ephemeral.public_key().public_bytes(*RAW)
context = b"job-1/triage/42/site-0/cloud-0"
shared = ephemeral.exchange(recipient.public_key())
okm = HKDF(
    algorithm=hashes.SHA256(),
    length=64,
    salt=None,
    info=b"confide-forward-v1" + ephemeral_pub + recipient_pub + context,
).derive(shared)
nonce = bytes(12)
request = AESGCM(okm[:32]).encrypt(nonce, b"rows", context)
# An answer: its random nonce (here fixed at 05…05), then the ciphertext.
answer_nonce = bytes([5] * 12)
answer = answer_nonce + AESGCM(okm[32:]).encrypt(answer_nonce, b"probs", context)
out = {
    "recipient_public": recipient_pub.hex(),
    "ephemeral_public": ephemeral_pub.hex(),
    "request_ciphertext": request.hex(),
    "answer_ciphertext": answer.hex(),
}
path = pathlib.Path(__file__).with_name("sealed_reference.json")
path.write_text(json.dumps(out, indent=2) + "\n")
print(json.dumps(out, indent=2))
