"""Where bundles come from: one module per source variant of the config (`source.kv` -> kv.py).

A source module has `open(bundle, vault, cfg) -> Source`; OPENERS maps each variant to it. See base.py for the
interface.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from agent.sources import kv, pki, pki_intermediate
from agent.sources.base import Fetched, Source, digest

if TYPE_CHECKING:
    from agent.config import AgentConfig, BundleConfig
    from agent.vault import Vault

__all__ = ["OPENERS", "Fetched", "Source", "digest", "open_source"]

#: source variant (its key in the config) -> what opens a bundle's Source of that variant
OPENERS: Mapping[str, Callable[[BundleConfig, Vault, AgentConfig], Source]] = {
    "kv": kv.open,
    "pki_intermediate": pki_intermediate.open,
    "pki": pki.open,
}


def open_source(bundle: BundleConfig, vault: Vault, cfg: AgentConfig) -> Source:
    """The Source for `bundle`, opened by its variant's module."""
    return OPENERS[bundle.source.variant](bundle, vault, cfg)
