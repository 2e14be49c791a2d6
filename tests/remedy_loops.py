"""Tiny models, data and training steps the remedies' tests share."""

from __future__ import annotations

import torch
from torch import nn


def mlp(act: type[nn.Module] = nn.ReLU, width: int = 16) -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, width), act(), nn.Linear(width, 3))


def step(model: nn.Module, opt: torch.optim.Optimizer, batch: tuple) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
    loss.backward()
    opt.step()
    return loss


def forgetful_step(model: nn.Module, opt: torch.optim.Optimizer, batch: tuple) -> torch.Tensor:
    loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
    loss.backward()
    opt.step()
    return loss


def data(n: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)
    ]
