"""The embedded default model: what `--model demo` (the default) resolves to."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo"
TINY_CACHE = Path(os.environ.get("BRANCHWISE_CACHE", Path.home() / ".cache" / "branchwise")) / "tiny-random"


def resolve(model: str) -> str:
    """A checkpoint folder or hub id for `model`; 'demo' is the model shipped in the package.

    Until a trained demo model is shipped, 'demo' is a tiny random model built offline on first use.
    """
    if model != "demo":
        return model
    if (ASSET_DIR / "config.json").exists():
        return str(ASSET_DIR)
    if not (TINY_CACHE / "config.json").exists():
        from branchwise.train.tiny import build_tiny_checkpoint

        log.warning("no demo model is shipped yet: building a tiny random model in %s", TINY_CACHE)
        build_tiny_checkpoint(TINY_CACHE)
    return str(TINY_CACHE)


def resolve_draft(model: str, draft_model: str | None) -> str | None:
    """The draft checkpoint of the 'draft' strategy: the configured one, else the demo model's own."""
    if draft_model:
        return draft_model
    if model == "demo" and (ASSET_DIR / "draft" / "config.json").exists():
        return str(ASSET_DIR / "draft")
    return None
