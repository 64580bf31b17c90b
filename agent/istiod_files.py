"""Names istiod gives a meaning to in its CA directory beyond the bundle's documented files: never published.

Kept apart from config and publishing so that both can refuse them without importing each other.
"""

from __future__ import annotations

__all__ = ["ISTIOD_SWITCHES"]

#: file name -> why it is never published (istio pilot/pkg/bootstrap/istio_ca.go, certcontroller.go)
ISTIOD_SWITCHES: dict[str, str] = {
    "istio-generated": "istiod (with USE_CACERTS_FOR_SELF_SIGNED_CA=true) would take the directory for its own"
    " self-signed CA's and stop using the plugged-in bundle",
}
