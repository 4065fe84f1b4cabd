"""The one check that two things were made by the same frozen encoder.

Every embedding set, fitted ReAlign stats file and MLLM checkpoint records the identity of the encoder that
made (or was trained on) its vectors: ``{"kind", "name", "dim", "id"}`` where ``id`` fingerprints the weights.
Vectors from two encoders live in different spaces, so mixing them is always an error, found here.
"""

from __future__ import annotations

from pathlib import Path

from revision.errors import InputError


def encoder_id(identity: dict | None):
    """The comparable part of an identity (older records without ``id`` compare whole)."""
    return identity.get("id", identity) if isinstance(identity, dict) else identity


def require_same_encoder(
    identity: dict | None, where: str | Path, expected: dict | None, expected_where: str | Path, fix: str
) -> None:
    """``InputError`` naming both places when the two identities differ. A side that records no identity
    (plain .npy / .parquet / .safetensors files) cannot be checked and passes."""
    if identity is None or expected is None or encoder_id(identity) == encoder_id(expected):
        return
    raise InputError(f"{where} comes from encoder {encoder_id(identity)}, but {expected_where} from encoder "
                     f"{encoder_id(expected)}; {fix}")
