"""The adapter's optimizer choice: AdamW (the authors') or Adafactor (next to no state), both training the
parameters they are given, and an unknown name refused with the names that exist."""
import pytest
import torch

from comfyui_dreamcache.dreamcache_core.training.train import build_parser
from comfyui_dreamcache.dreamcache_core.training.training_loop import OPTIMIZERS, TrainConfig, make_optimizer


def state_numbers(optimizer) -> int:
    return sum(t.numel() for state in optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_lowers_a_quadratic(name):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(32, 32))
    target = torch.randn(32, 32)
    optimizer = make_optimizer([weight], TrainConfig(output_dir="unused", lr=1e-2, weight_decay=0.0, optimizer=name))
    first = None
    for _ in range(50):
        loss = (weight - target).pow(2).mean()
        first = float(loss.detach()) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float((weight - target).pow(2).mean()) < 0.9 * first


def test_adafactor_keeps_far_less_state_than_adamw():
    sizes = {}
    for name in OPTIMIZERS:
        weight = torch.nn.Parameter(torch.ones(64, 64))
        optimizer = make_optimizer([weight], TrainConfig(output_dir="unused", optimizer=name))
        weight.sum().backward()
        optimizer.step()
        sizes[name] = state_numbers(optimizer)
    assert sizes["adamw"] == 2 * 64 * 64  # two moments per parameter
    assert sizes["adafactor"] <= 2 * 64 + 1  # a row and a column vector


def test_an_unknown_optimizer_is_refused_by_name():
    with pytest.raises(ValueError, match="adamw, adafactor"):
        make_optimizer([torch.nn.Parameter(torch.ones(2))], TrainConfig(output_dir="unused", optimizer="sgd"))
    assert build_parser().parse_args(["--data", "x", "--optimizer", "adafactor"]).optimizer == "adafactor"
