"""Where bundles come from: one module per source variant of the config (`source.kv` -> kv.py).

A source module has `open(bundle, vault, cfg) -> Source`; see base.py for the interface.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from agent.sources.base import Fetched, Source, digest

if TYPE_CHECKING:
    from agent.config import AgentConfig, BundleConfig
    from agent.vault import Vault

__all__ = ["Fetched", "Source", "digest", "open_source"]


def open_source(bundle: BundleConfig, vault: Vault, cfg: AgentConfig) -> Source:
    """The Source for `bundle`: the module named like its config variant builds it."""
    module = importlib.import_module(f"agent.sources.{bundle.source.variant}")
    source: Source = module.open(bundle, vault, cfg)
    return source
