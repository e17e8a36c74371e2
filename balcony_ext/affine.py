"""The learned affine exit (the tuned lens): the baseline every balcony exit is measured against."""

from __future__ import annotations

import copy

import torch
from torch import nn


class AffineExit(nn.Module):
    """The tuned-lens baseline: h -> norm(h @ A^T + b), A initialised to the identity."""

    def __init__(self, hidden: int, norm: nn.Module):
        super().__init__()
        self.proj = nn.Linear(hidden, hidden)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(hidden))
            self.proj.bias.zero_()
        self.norm = norm

    def forward(self, h):
        return self.norm(self.proj(h))


def new_affine_exits(model, depths) -> dict:
    """{depth: AffineExit} at identity, each with a trainable copy of the final norm."""
    a = model.adapter
    lenses = {k: AffineExit(a.hidden_size, copy.deepcopy(a.final_norm)).to(model.device, model.dtype) for k in depths}
    for lens in lenses.values():
        for p in lens.parameters():
            p.requires_grad_(True)
    return lenses

