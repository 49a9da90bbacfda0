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

    (A source tree without branchwise/assets/demo, e.g. before `branchwise train demo` ran, gets a tiny
    random model built offline instead, so the path still works.)
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


def resolve_draft(model_path: str, draft_model: str | None) -> str | None:
    """The draft checkpoint of the 'draft' strategy: the configured one, else a `draft/` folder beside
    the model's files (the demo model ships one)."""
    if draft_model:
        return resolve(draft_model)
    if (Path(model_path) / "draft" / "config.json").exists():
        return str(Path(model_path) / "draft")
    return None
