"""Caps on the work one validation may do, so hostile input is refused quickly instead of parsed for hours."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LimitExceeded", "Limits"]


@dataclass(frozen=True)
class Limits:
    """Per-bundle caps. Over a cap is a clean refusal naming the file; the defaults are far above real bundles."""

    #: bytes per file (validate_dir reads at most this + 1)
    max_file_bytes: int = 1 << 20
    #: PEM blocks per file (a mesh with 64 roots or intermediates in one file is already unusual)
    max_certs_per_file: int = 64
    #: signature checks while building one chain: Go's maxChainSignatureChecks
    max_signature_checks: int = 100
    #: names plus name constraints in one certificate (Go has no cap; its checks are O(n log n))
    max_names_per_cert: int = 1024


class LimitExceeded(Exception):
    """Raised deep inside a parser when input exceeds a cap; the message says which cap."""
