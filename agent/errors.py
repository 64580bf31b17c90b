"""The AgentError tree: every failure a user can hit, as one sentence that says what to fix.

AgentError
 +-- ConfigError          bad or missing configuration; names the key
 +-- VaultError           Vault answered, and the answer is final (exit at once)
 |    +-- AuthError       login refused: role, mount, service account
 |    +-- SecretError     path missing, key missing, not what a bundle needs
 |         +-- PermissionDenied   403 on a path (or a token Vault no longer accepts)
 |         +-- ResponseTooLarge   an answer over limits.max_secret_size (never read further)
 |         +-- WriteConflict      KV v2 check-and-set refused a write: someone else wrote the path meanwhile
 +-- Unavailable          a server the agent needs is not answering well now: retry with backoff, in both modes
 |    +-- VaultUnavailable     Vault unreachable, sealed, redirecting elsewhere, timing out, not a Vault answer
 |    |    +-- StaleRead       a version older than the live one (a lagging node): keep the live bundle, retry
 |    +-- KubeUnavailable      the Kubernetes API unreachable, timing out, 5xx or 429
 |    +-- CredentialUnavailable  the service-account token file cannot be read now (after the first publish only:
 |                               kubelet may be rewriting it; the Vault token in hand stays in use)
 +-- BundleError          CA material that istiod would reject; names the file and check
 +-- PublishError         the output directory could not be written
 +-- ReloadError          a reload action failed
"""

from __future__ import annotations

__all__ = [
    "AgentError",
    "AuthError",
    "BundleError",
    "ConfigError",
    "CredentialUnavailable",
    "KubeUnavailable",
    "PermissionDenied",
    "PublishError",
    "ReloadError",
    "ResponseTooLarge",
    "SecretError",
    "StaleRead",
    "Unavailable",
    "VaultError",
    "VaultUnavailable",
    "WriteConflict",
]


class AgentError(Exception):
    """Base of every error the agent reports to a user; str() is the one-line message."""

    #: short snake_case label used as the `reason` of istio_vault_agent_errors_total
    reason = "error"


class ConfigError(AgentError):
    reason = "config"


class VaultError(AgentError):
    reason = "vault"


class AuthError(VaultError):
    reason = "auth"


class SecretError(VaultError):
    reason = "secret"


class PermissionDenied(SecretError):
    """403: the policy does not allow the call, or the token was revoked or expired (log in again, then retry)."""


class ResponseTooLarge(SecretError):
    reason = "too_large"


class WriteConflict(SecretError):
    """KV v2 check-and-set refused a write (`ca intermediate --kv`): the path changed after it was read."""

    reason = "write_conflict"


class Unavailable(AgentError):
    """Retryable: the worker backs off and tries again (until init.timeout before the first publish)."""

    reason = "unavailable"


class VaultUnavailable(Unavailable):
    reason = "vault_unavailable"


class KubeUnavailable(Unavailable):
    reason = "kube_unavailable"


class CredentialUnavailable(Unavailable):
    reason = "credential_unavailable"


class StaleRead(VaultUnavailable):
    reason = "stale_read"


class BundleError(AgentError):
    """A bundle the agent refuses. `istiod_loads` marks verdict (b): istiod (or pilot-agent) would load it, but
    workloads or clients would break; `check` names the check (docs/checks.md lists them)."""

    reason = "invalid_bundle"

    def __init__(self, message: str = "", *, check: str = "", istiod_loads: bool = False) -> None:
        super().__init__(message)
        self.check = check
        self.istiod_loads = istiod_loads


class PublishError(AgentError):
    reason = "publish"


class ReloadError(AgentError):
    reason = "reload"
