"""Session snapshots: a session's whole memory as a signed, self-describing blob.

Layout (little-endian): magic, format version (u16), header length (u32), body length (u32),
a JSON header (model, model hash, tokens seen, shapes, times, key id, tokenizer state, owner
tag), the body (the state, then the logits if any, by gru_serve.state's codec), then HMAC-SHA256 over
everything before it. The lengths sit in the fixed prefix so that a blob is checked for
truncation and then for its signature before any of it is parsed. A blob is accepted for
max_age_s after its export; the owner tag (a keyed hash of the exporter's principal: the blob
does not reveal it) binds it to its exporter where the server asks. Blobs sealed before the tag
existed have the same version and no tag: accepted, except where the owner is checked.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import time
from dataclasses import dataclass

import numpy as np

from gru_serve.ops.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from gru_serve.ops.settings import Settings, read_secrets
from gru_serve.state import DTYPE, State, StateSpec, logits_from_bytes, to_bytes

MAGIC = b"GRUSNAP\0"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sHII")  # magic, version, header bytes, body bytes
_MAC_BYTES = hashlib.sha256().digest_size
MAX_HEADER_BYTES = 64 * 1024
NO_KEY = (
    "snapshots need a key: start the server with --snapshot-key or --snapshot-key-file "
    "(GRU_SERVE_SNAPSHOT_KEYS)"
)


@dataclass(frozen=True)
class Snapshot:
    model: str
    model_hash: str
    tokens_seen: int
    state: State  # gru_serve.state
    logits: np.ndarray | None  # [vocab] float32; None before any text
    created: float  # when the session was created
    exported: float = 0.0  # when the blob was sealed (set by seal)
    key_id: str = ""  # which key signed it (set by seal)
    tokenizer: object = None  # a tokenizer's own state, for models that have one (none yet)
    owner: str = ""  # the exporter's principal (sealed as a keyed tag; open_ gives back "")


def key_id(key: bytes) -> str:
    """Names a key in a blob without revealing it."""
    return hashlib.sha256(key).hexdigest()[:8]


def load_keys(settings: Settings) -> tuple[bytes, ...]:
    """The keys from the flags/env, then the file's (one per line); the first signs."""
    keys = read_secrets(settings.snapshot_keys, settings.snapshot_key_file, "snapshot_key_file")
    return tuple(dict.fromkeys(k.encode() for k in keys))


def require_keys(keys: tuple[bytes, ...]) -> None:
    if not keys:
        raise FailedPrecondition(NO_KEY)


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _owner_tag(key: bytes, owner: str) -> str:
    """The owner as the blob names it: keyed, so a low-entropy token cannot be guessed from it."""
    return _mac(key, b"owner\0" + owner.encode("utf-8", "surrogatepass")).hex()[:32]


def seal(snap: Snapshot, keys: tuple[bytes, ...], now: float | None = None) -> bytes:
    require_keys(keys)
    body = to_bytes(snap.state) + (b"" if snap.logits is None else to_bytes(snap.logits))
    header = json.dumps(
        {
            "model": snap.model,
            "model_hash": snap.model_hash,
            "tokens_seen": snap.tokens_seen,
            "dtype": "float32-le",
            "state_shape": StateSpec.like(snap.state).to_json(),
            "logits": None if snap.logits is None else int(np.size(snap.logits)),
            "created": snap.created,
            "exported": time.time() if now is None else now,
            "key_id": key_id(keys[0]),
            "tokenizer": snap.tokenizer,
            "owner": _owner_tag(keys[0], snap.owner),
        },
        separators=(",", ":"),
    ).encode()
    data = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header), len(body)) + header + body
    return data + _mac(keys[0], data)


def open_(
    blob: bytes,
    keys: tuple[bytes, ...],
    now: float | None = None,
    max_age_s: float = 0.0,
    owner: str | None = None,
) -> Snapshot:
    """The snapshot in a blob signed with one of `keys`; InvalidArgument saying what is wrong.
    FailedPrecondition when it was exported more than max_age_s before `now` (0: no expiry);
    with `owner` (not None), PermissionDenied unless that principal exported it."""
    require_keys(keys)
    if not blob:
        raise InvalidArgument("snapshot: empty")
    if blob[: len(MAGIC)] != MAGIC[: len(blob)]:
        raise InvalidArgument("snapshot: not a gru-serve snapshot (bad magic)")
    if len(blob) < _PREFIX.size:
        raise InvalidArgument(f"snapshot: truncated: {len(blob)} bytes, shorter than its fixed header")
    _, version, header_len, body_len = _PREFIX.unpack_from(blob)
    if version != FORMAT_VERSION:
        raise InvalidArgument(f"snapshot: format version {version}; this server reads {FORMAT_VERSION}")
    if header_len > MAX_HEADER_BYTES:
        raise InvalidArgument(f"snapshot: header of {header_len} bytes; at most {MAX_HEADER_BYTES}")
    size = _PREFIX.size + header_len + body_len + _MAC_BYTES
    if len(blob) < size:
        raise InvalidArgument(f"snapshot: truncated: {len(blob)} bytes of {size}")
    if len(blob) > size:
        raise InvalidArgument(f"snapshot: {len(blob) - size} bytes after its end (not one whole snapshot)")
    data, mac = blob[:-_MAC_BYTES], blob[-_MAC_BYTES:]
    key = next((k for k in keys if hmac.compare_digest(_mac(k, data), mac)), None)
    if key is None:
        raise InvalidArgument("snapshot: signature matches none of this server's keys")
    # Signed by a key of ours, so written by seal: what follows trusts the header.
    h = json.loads(data[_PREFIX.size : _PREFIX.size + header_len])
    _check_age(h["exported"], time.time() if now is None else now, max_age_s)
    if owner is not None:
        _check_owner(h.get("owner"), _owner_tag(key, owner))
    spec = StateSpec.from_json(h["state_shape"])
    body = memoryview(data)[_PREFIX.size + header_len :]
    if len(body) != spec.nbytes + DTYPE.itemsize * (h["logits"] or 0):
        raise InvalidArgument("snapshot: its body does not match the shapes in its header")
    return Snapshot(
        h["model"],
        h["model_hash"],
        h["tokens_seen"],
        spec.from_bytes(body[: spec.nbytes]),
        None if h["logits"] is None else logits_from_bytes(body[spec.nbytes :], h["logits"]),
        h["created"],
        h["exported"],
        h["key_id"],
        h.get("tokenizer"),
    )


def _check_age(exported: float, now: float, max_age_s: float) -> None:
    age = now - exported
    if max_age_s and age > max_age_s:
        raise FailedPrecondition(
            f"snapshot: expired: exported {age:.0f} s ago; the limit is snapshot_max_age_s="
            f"{max_age_s:g} (export the session again)"
        )


def _check_owner(sealed: str | None, caller: str) -> None:
    if sealed is None:
        raise FailedPrecondition(
            "snapshot: names no owner (sealed by an older gru-serve) and this server binds snapshots "
            "to their exporter (snapshot_bind_owner): export the session again"
        )
    if not hmac.compare_digest(sealed, caller):
        raise PermissionDenied(
            "snapshot: exported by another token; this server binds snapshots to their exporter "
            "(snapshot_bind_owner)"
        )
