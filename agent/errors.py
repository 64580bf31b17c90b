"""The AgentError tree: every failure a user can hit, as one sentence that says what to fix.

AgentError
 +-- ConfigError          bad or missing configuration; names the key
 +-- VaultError           Vault answered, and the answer is final (exit at once)
 |    +-- AuthError       login refused: role, mount, service account
 |    +-- SecretError     path missing, key missing, permission denied on a path
 +-- VaultUnavailable     unreachable, sealed, timing out: retry with backoff
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
    "PublishError",
    "ReloadError",
    "SecretError",
    "VaultError",
    "VaultUnavailable",
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


class VaultUnavailable(AgentError):
    reason = "vault_unavailable"


class BundleError(AgentError):
    """A bundle the agent refuses. `istiod_loads` marks verdict (b): istiod (or pilot-agent) would load it, but
    workloads or clients would break; `check` names the check (README "What it checks" lists them)."""

    reason = "invalid_bundle"

    def __init__(self, message: str = "", *, check: str = "", istiod_loads: bool = False) -> None:
        super().__init__(message)
        self.check = check
        self.istiod_loads = istiod_loads


class PublishError(AgentError):
    reason = "publish"


class ReloadError(AgentError):
    reason = "reload"
