"""The embedded demo model: its training pipeline, the Multiverse attention rule, the shipped weights."""

from __future__ import annotations

import random

import torch

from branchwise.train import demo
from branchwise.train.demo_data import Encoder


def test_training_reduces_the_loss_in_a_few_steps(tmp_path):
    tokenizer = demo.build_tokenizer(seed=1, samples=200)
    tokenizer.save_pretrained(tmp_path)
    data = demo.make_dataset(str(tmp_path), 300, seed=1, workers=1)
    shape = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = demo.new_model(shape, tokenizer, seed=1)
    history = demo.train(model, data, 120, torch.device("cpu"), 8, 3e-3, "test", max_steps=40)
    assert len(history) == 40
    assert sum(history[-5:]) / 5 < 0.9 * sum(history[:5]) / 5


def test_multiverse_paths_are_isolated_and_share_start_positions(tmp_path):
    """Tokens of one <Path> see no other path, all paths start at one position, the conclusion sees all."""
    tokenizer = demo.build_tokenizer(seed=2, samples=100)
    ex = Encoder(tokenizer).arithmetic(random.Random(3), parallel=True)
    path, after, pos = torch.tensor(ex.path), torch.tensor(ex.after), torch.tensor(ex.pos)
    mask = demo.visibility(torch.zeros(1, len(ex.ids), dtype=torch.int32), path[None], after[None])[0, 0]
    paths = sorted(set(ex.path) - {0})
    assert len(paths) >= 2
    starts = [int(pos[path == k].min()) for k in paths]
    assert len(set(starts)) == 1
    for k in paths:
        rows = (path == k).nonzero()[:, 0]
        others = ((path != k) & (path != 0)).nonzero()[:, 0]
        assert not mask[rows][:, others].any()
    conclusion = (after == 1).nonzero()[:, 0]
    assert mask[conclusion][:, (path != 0).nonzero()[:, 0]].all()
    # loss is not taken on the forced `<Path>k:` openers: their predecessor is not their context
    tags = set(tokenizer.convert_tokens_to_ids(["<Path>", "<Conclusion>"]))
    assert all(ex.loss[i] == 0 for i, t in enumerate(ex.ids) if t in tags)
