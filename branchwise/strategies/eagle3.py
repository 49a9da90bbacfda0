"""EAGLE-3 speculative decoding: a one-layer drafter over the target's features from three of its layers.

The target forward keeps, in a fixed buffer, the residual stream entering three of its layers
(`ctx.capture_hidden`); the drafter's first entry at each step reads fc of those, later depths its own
output. Everything else is the MTP strategy's: entries in a one-layer K/V pool on the target's block
tables (valid across prefix-cache hits of its own), the chain-drafting loop, the chain rule, constraints
and adaptive K. Draft tokens come from the drafter's draft vocabulary, mapped to target ids (`d2t`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from branchwise.engine.plan import ForwardOutput
from branchwise.models.eagle3 import find_eagle3, load_eagle3
from branchwise.strategies.base import Resources
from branchwise.strategies.mtp import MTPStrategy

if TYPE_CHECKING:
    from branchwise.engine.context import StrategyContext


class Eagle3Strategy(MTPStrategy):
    name = "eagle3"
    needs = (
        "strategy 'eagle3' needs an EAGLE-3 drafter: --eagle-model FOLDER (the authors' or the speculators "
        "layout) or an eagle3/ folder beside the model (`branchwise train eagle3`)"
    )

    @classmethod
    def resources(cls, config, model_path, model, dtype, device) -> Resources | None:
        found = find_eagle3(model_path, config.eagle_model)
        if found is None:
            return None
        drafter = load_eagle3(model, found)
        return Resources(drafter, drafter.kv_shape, found)

    def __init__(self, ctx: StrategyContext, resources: Resources | None = None) -> None:
        super().__init__(ctx, resources)
        self.feature_width = self.module.fc.weight.shape[1]
        ctx.capture_hidden(self.module.aux_layers)

    def features(self, out: ForwardOutput) -> torch.Tensor:
        return out.aux_hidden
