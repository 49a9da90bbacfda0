"""`branchwise train eagle3`: an EAGLE-3 drafter for a frozen model, by self-distillation with EAGLE-3's
training-time test.

The model writes its own training text (as for the MTP module and Medusa heads). The drafter learns, at
every position, the model's next-token distribution over the draft vocabulary (the most frequent tokens of
that text) in three passes: the first reads fc of the model's features, each later one reads the
drafter's own previous-pass output at the position before, and attends as it would at inference: to the
first pass's entries up to where drafting started, then to one entry of each later pass. The result is
written in the authors' layout (`eagle3/` beside the model).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from branchwise.models.eagle3 import FOLDER, Eagle3Drafter, default_aux_layers, load_eagle3, save_eagle3
from branchwise.models.loader import decoder_of
from branchwise.train.distill import fit, prepare, soft_cross_entropy

log = logging.getLogger(__name__)

PASSES = 3  # the first from the model's features, then two from the drafter's own outputs
DECAY = 0.8  # weight of pass p: DECAY ** p (later passes matter less: they are reached less often)


def new_drafter(base: torch.nn.Module, draft_ids: list[int]) -> Eagle3Drafter:
    """A drafter that starts near the model's last layer reading its last captured feature: the layer's
    weights on the feature half of q/k/v, fc picking the third feature, the model's head rows."""
    c = base.config
    settings = {
        "layer": {
            k: getattr(c, k)
            for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
        }
        | {
            "rms_norm_eps": c.rms_norm_eps,
            "vocab_size": c.vocab_size,
            "head_dim": c.hidden_size // c.num_attention_heads,
        },
        "draft_vocab_size": len(draft_ids),
        "target_hidden_size": c.hidden_size,
        "norm_before_residual": False,
        "aux_layers": default_aux_layers(c.num_hidden_layers),
    }
    drafter = Eagle3Drafter(base, settings)
    last = decoder_of(base).layers[-1]
    hidden = c.hidden_size
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            w = getattr(drafter.midlayer.self_attn, name).weight
            w.normal_(0, 0.02 / math.sqrt(hidden))
            w[:, hidden:] = getattr(last.self_attn, name).weight
        drafter.midlayer.self_attn.o_proj.load_state_dict(last.self_attn.o_proj.state_dict())
        drafter.midlayer.mlp.load_state_dict(last.mlp.state_dict())
        drafter.midlayer.post_attention_layernorm.load_state_dict(last.post_attention_layernorm.state_dict())
        drafter.fc.weight.normal_(0, 0.02 / math.sqrt(hidden))
        drafter.fc.weight[:, 2 * hidden :] += torch.eye(hidden)
        drafter.norm.load_state_dict(decoder_of(base).norm.state_dict())
        ids = torch.tensor(draft_ids)
        drafter.lm_head.weight.copy_(base.get_output_embeddings().weight[ids])
        drafter.d2t.copy_(ids - torch.arange(len(ids)))
        drafter.target_ids.copy_(ids)
        drafter.t2d.zero_()
        drafter.t2d[ids] = True
    return drafter


def draft_vocabulary(rows: list[list[int]], size: int, vocab: int) -> list[int]:
    """The `size` most frequent tokens of the rows (ascending ids), topped up with the lowest others."""
    common = [t for t, _ in Counter(t for r in rows for t in r).most_common(size)]
    rest = [t for t in range(vocab) if t not in set(common)]
    return sorted(common + rest[: size - len(common)])


def ttt_mask(length: int, p: int, device: torch.device) -> torch.Tensor:
    """(T, p T) which keys pass p's query at position j sees: pass-1 entries up to j - (p - 1) (where
    drafting started), then pass r's entry at j - (p - r) for r = 2 .. p."""
    j = torch.arange(length, device=device)[:, None]
    key = torch.arange(length, device=device)[None]
    blocks = [key <= j - (p - 1)] + [key == j - (p - r) for r in range(2, p + 1)]
    return torch.cat(blocks, dim=1)


def ttt_forward(drafter: Eagle3Drafter, emb: torch.Tensor, first: torch.Tensor, positions) -> list:
    """The drafter's output in each of PASSES passes: the first reads `first` (features of the position
    before), each later one the previous pass's output at the position before; attention as `ttt_mask`."""
    layer, attn = drafter.midlayer, drafter.midlayer.self_attn
    B, T, _ = emb.shape
    heads, kv_heads, d = attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim
    cos, sin = drafter.rotary(emb, positions)
    keys, values, outs, hidden = [], [], [], first
    for p in range(1, PASSES + 1):
        h = drafter.fc(hidden) if hidden.shape[-1] != emb.shape[-1] else hidden
        if drafter.norm_before_residual:
            h = residual = layer.hidden_norm(h)
        else:
            residual, h = h, layer.hidden_norm(h)
        x = torch.cat([layer.input_layernorm(emb), h], dim=-1)
        q = attn.q_proj(x).view(B, T, heads, d).transpose(1, 2)
        k = attn.k_proj(x).view(B, T, kv_heads, d).transpose(1, 2)
        v = attn.v_proj(x).view(B, T, kv_heads, d).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        keys.append(k)
        values.append(v)
        o = F.scaled_dot_product_attention(
            q,
            torch.cat(keys, 2),
            torch.cat(values, 2),
            attn_mask=ttt_mask(T, p, emb.device),
            enable_gqa=heads != kv_heads,
        )
        residual = residual + attn.o_proj(o.transpose(1, 2).reshape(B, T, heads * d))
        out = residual + layer.mlp(layer.post_attention_layernorm(residual))
        outs.append(out)
        hidden = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], 1)
    return outs


def eagle3_loss(base, drafter: Eagle3Drafter, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy of every pass against the model's next-token distribution over the draft
    vocabulary (renormalised), passes weighted DECAY ** p."""
    with torch.no_grad():
        out = base(input_ids=ids, output_hidden_states=True, use_cache=False)
        # hidden_states[i] enters layer i: the residual stream EAGLE-3 reads
        feats = torch.cat([out.hidden_states[i] for i in drafter.aux_layers], dim=-1)
        draft_ids = torch.arange(drafter.d2t.shape[0], device=ids.device) + drafter.d2t
        teacher = F.softmax(out.logits.float(), dim=-1)[..., draft_ids]
        teacher = teacher / teacher.sum(-1, keepdim=True).clamp(min=1e-9)
        emb = decoder_of(base).embed_tokens(ids)
    positions = torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids)
    # entry j reads token j and what precedes it (features of position j - 1); it predicts token j + 1
    first = torch.cat([torch.zeros_like(feats[:, :1]), feats[:, :-1]], 1)
    loss = 0.0
    for p, x in enumerate(ttt_forward(drafter, emb, first, positions)):
        loss = loss + DECAY**p * soft_cross_entropy(drafter.draft_logits(x), teacher, valid)
    return loss


def train_eagle3(
    model_path: str,
    out: Path | None = None,
    minutes: float = 10.0,
    device: str = "auto",
    seed: int = 0,
    num_prompts: int = 2000,
    max_tokens: int = 160,
    data: str | None = None,
    batch_size: int = 16,
    lr: float = 1e-3,
    draft_vocab_size: int | None = None,
    init: str | None = None,
) -> dict:
    """Train an EAGLE-3 drafter for the model at `model_path` within `minutes`; writes `out` (default:
    eagle3/ beside the model) with a JSON record of the run. `init`: a drafter folder to continue from
    (its draft vocabulary is kept)."""
    out = out or Path(model_path) / FOLDER
    run = prepare(model_path, data, num_prompts, seed + 11, max_tokens, device, seed)
    vocab = run.base.config.vocab_size
    if init:
        drafter = load_eagle3(run.base, init).float().requires_grad_(True).train()
        draft_ids = drafter.target_ids.tolist()
    else:
        draft_ids = draft_vocabulary(run.rows, min(draft_vocab_size or vocab, vocab), vocab)
        drafter = new_drafter(run.base, draft_ids).to(run.device).train()
    history = fit(
        drafter,
        lambda ids, valid: eagle3_loss(run.base, drafter, ids, valid),
        run.rows,
        run.base.config.pad_token_id or 0,
        run.seconds_left(minutes),
        batch_size,
        lr,
        seed,
        "eagle3 drafter",
    )
    save_eagle3(drafter.eval(), out)
    info = run.record(model_path, seed, minutes, history, batch_size)
    info |= {
        "draft_vocab_size": len(draft_ids),
        "drafter_params": sum(p.numel() for p in drafter.parameters()),
    }
    (out / "training.json").write_text(json.dumps(info, indent=2))
    return info
