"""Operator credentials for the admin commands (`ca intermediate --kv`, `setup vault`, `doctor`).

Unlike the agent, which only ever sends the token it obtained by its own login, these commands act for the
operator at a terminal: they read VAULT_ADDR/VAULT_TOKEN (or BAO_ADDR/BAO_TOKEN), VAULT_NAMESPACE, VAULT_CACERT
and VAULT_SKIP_VERIFY deliberately, here and nowhere else. The token is never logged or echoed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from agent.errors import AuthError, ConfigError
from agent.text import shown

if TYPE_CHECKING:
    import hvac

__all__ = ["ENV_HELP", "operator_client"]

#: the sentence every admin command's --help carries
ENV_HELP = (
    "Operator credentials come from VAULT_ADDR and VAULT_TOKEN (or BAO_ADDR and BAO_TOKEN), with VAULT_NAMESPACE,"
    " VAULT_CACERT and VAULT_SKIP_VERIFY (or their BAO_ forms); the token is never logged."
)


def _env(environ: Mapping[str, str], name: str) -> str | None:
    """VAULT_<name>, else BAO_<name>; empty counts as unset."""
    for prefix in ("VAULT_", "BAO_"):
        value = environ.get(prefix + name)
        if value:
            return value
    return None


def operator_client(
    *,
    namespace: str | None = None,
    environ: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    login: bool = False,
) -> hvac.Client:
    """An hvac client with the operator's token from the environment; ConfigError saying what to set.

    With `login` the command logs in itself (Kubernetes auth, `agent.auth.login`): the client starts without a
    token and VAULT_TOKEN is neither needed nor read.
    """
    from agent.config import Duration, VaultConfig
    from agent.hvac_client import make_client

    environ = os.environ if environ is None else environ
    address = _env(environ, "ADDR")
    token = None if login else _env(environ, "TOKEN")
    if not address:
        raise ConfigError("set VAULT_ADDR (or BAO_ADDR) to the address of Vault/OpenBao, e.g. https://vault:8200")
    if not address.startswith(("http://", "https://")):
        raise ConfigError(f"VAULT_ADDR {shown(address)!r} is not an http:// or https:// URL")
    if not token and not login:
        raise ConfigError(
            "set VAULT_TOKEN (or BAO_TOKEN) to an operator token: this command reads and writes Vault's"
            " configuration, which the agent's own login cannot"
        )
    skip = (_env(environ, "SKIP_VERIFY") or "").lower() in {"1", "true", "yes"}
    cfg = VaultConfig(
        address=address,
        ca_cert=_env(environ, "CACERT"),
        namespace=namespace if namespace is not None else _env(environ, "NAMESPACE"),
        skip_verify=skip,
        timeout=Duration(timeout),
    )
    client = make_client(cfg, max_response_bytes=4 << 20)
    client.token = token or ""
    if not login:
        variable = next(f"{p}TOKEN" for p in ("VAULT_", "BAO_") if environ.get(f"{p}TOKEN"))
        client.adapter.session.hooks["response"].append(_blame_a_refused_token(client, variable))
    return client


_LOOKUP_SELF = "/v1/auth/token/lookup-self"


def _blame_a_refused_token(client: hvac.Client, variable: str) -> Callable[..., None]:
    """A response hook: on a 403, ask Vault whether it takes the token at all; AuthError saying so when it does not.

    Vault answers 403 alike for a token it does not know (mistyped, expired, revoked) and for a path the token's
    policy does not cover, so each command would otherwise blame the policy or the mount. lookup-self is allowed to
    every valid token (the default policy; the agent's token keeper asks the same).
    """
    import hvac.exceptions as hx

    operator = client.token

    def hook(response: Any, *_args: Any, **_kwargs: Any) -> None:
        if response.status_code != 403 or response.request.path_url.split("?")[0].endswith(_LOOKUP_SELF):
            return
        if client.token != operator:  # a command acting with a token of its own (doctor's capability probe)
            return
        try:
            client.adapter.get(_LOOKUP_SELF)
        except (hx.Forbidden, hx.Unauthorized):
            raise AuthError(
                f"Vault at {shown(client.url)} does not accept the token in {variable}: it is invalid, expired or"
                f" revoked (it may not even look itself up); set {variable} to a valid operator token"
            ) from None
        except Exception:  # noqa: BLE001 - cannot tell: the first answer's own error is reported
            return

    return hook
