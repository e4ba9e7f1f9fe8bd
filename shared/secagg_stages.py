"""SecAgg+ names of our own, beside Flower's (``secaggplus_constants``): coordinator and device must agree.

Flower's SecAgg+ forwards the encrypted shares with the collect stage, and a device that cannot
decrypt one leaves the round: one device sending its neighbours ciphertexts that do not decrypt
stops every secure round it is in, and the devices it wrote to are the ones that look broken.
Ours confirms the shares first, in a stage of its own between share keys and collect: each device
decrypts what was forwarded to it and says which sources' shares it keeps; a pair masks with each
other only if each kept the other's (``server/secagg/protocol.py``, ``client/secagg.py``).
"""

CONFIRM_SHARES = "confirm_shares"
"""The stage: the coordinator forwards ``Key.SOURCE_LIST`` and ``Key.CIPHERTEXT_LIST``; the device replies
with :data:`ACCEPTED_LIST`."""
ACCEPTED_LIST = "accepted_list"
"""The sources whose ciphertext decrypted, named the pair and held two well-formed shares (node ids)."""
IDENTITY, ENROLMENT, KEYS_SIGNATURE = "identity", "enrolment", "keys-signature"
"""An enrolled device's setup reply adds these to its two public keys (``shared/enrolment.py``): its identity
(32 bytes), its enrolment (96) and its identity's signature over the keys (64). The coordinator forwards them
in share keys after the two keys: ``[pk1, pk2, identity, enrolment, signature]`` per neighbour."""
PROOF_KEYS = (IDENTITY, ENROLMENT, KEYS_SIGNATURE)
CONSISTENCY = "consistency"
"""The stage between collect and unmask when the round has enrolled devices: the coordinator sends each survivor
the lists unmask will use (``Key.ACTIVE_NODE_ID_LIST``, ``Key.DEAD_NODE_ID_LIST``); the device keeps them and,
enrolled, signs its survivor list (``shared/enrolment.story_message``), replying :data:`STORY_SIGNATURE` (empty
if it has no identity). Unmask then carries, per neighbour a device's list calls survived, that neighbour's list
(``story:<id>``) and signature (``story-signature:<id>``)."""
STORY_SIGNATURE = "story-signature"
STORY, STORY_SIGNATURE_OF = "story:", "story-signature:"
MAX_KEY_BYTES = 1024
"""A public key a device announces (a PEM SECP384R1 public key is 215 bytes)."""
MAX_CIPHERTEXT_BYTES = 4096
"""One encrypted pair of shares (Fernet of two shares and two node ids: ~600 bytes)."""
SHARE_MAX_BYTES = 1024
"""A Shamir share of Flower's ``create_shares``: a 4-byte index and whole 16-byte chunks, at most this long
(of a PEM SECP384R1 private key: 4 + 16 * 20 bytes)."""


def is_share(value: object) -> bool:
    """Return whether ``value`` has the form of one Shamir share (its index and chunks; not whether it is true)."""
    return isinstance(value, bytes) and 4 < len(value) <= SHARE_MAX_BYTES and (len(value) - 4) % 16 == 0
