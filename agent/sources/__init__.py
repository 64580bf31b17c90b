"""Where bundles come from: one module per source variant of the config (`source.kv` -> kv.py).

A source module has `open(bundle, client, cfg) -> Source`; see base.py for the interface.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from agent.sources.base import Fetched, Source, digest

if TYPE_CHECKING:
    import hvac

    from agent.config import AgentConfig, BundleConfig

__all__ = ["Fetched", "Source", "digest", "open_source"]


def open_source(bundle: BundleConfig, client: hvac.Client, cfg: AgentConfig) -> Source:
    """The Source for `bundle`: the module named like its config variant builds it."""
    module = importlib.import_module(f"agent.sources.{bundle.source.variant}")
    source: Source = module.open(bundle, client, cfg)
    return source
