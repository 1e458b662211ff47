"""The weights' moving average: warm-up of the decay, the update rule, state round trip."""

from __future__ import annotations

import pytest
import torch

from dtk.ema import EMA
from dtk.runtime.errors import DtkError


def _model(value: float) -> torch.nn.Module:
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(value)
    return model


def test_decay_warms_up_then_caps():
    ema = EMA(_model(0.0), decay=0.99)
    decays = []
    for _ in range(1000):
        decays.append(ema.current_decay())
        ema.num_updates += 1
    assert decays[:3] == pytest.approx([0.1, 2 / 11, 3 / 12])  # (1 + n) / (10 + n)
    assert decays[-1] == 0.99 and max(decays) == 0.99


def test_update_rule_pinned():
    model = _model(0.0)
    ema = EMA(model, decay=0.999)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # d = 0.1: 0.1 * 0 + 0.9 * 1
    ema.update(model)  # d = 2/11: 2/11 * 0.9 + 9/11 * 1
    assert ema.shadow["weight"].item() == pytest.approx(2 / 11 * 0.9 + 9 / 11, rel=1e-6)
    state = ema.state_dict()
    other = EMA(_model(5.0))
    other.load_state_dict(state, ema.num_updates)
    assert torch.equal(other.shadow["weight"], ema.shadow["weight"]) and other.num_updates == 2


def test_bad_decay():
    with pytest.raises(DtkError, match=r"EMA decay must be in \[0, 1\)"):
        EMA(_model(0.0), decay=1.0)
