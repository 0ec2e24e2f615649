"""Loss functions against hand-computed values; metrics against numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from escn_train.training.losses import EnergyForceLoss, LossConfigError, energy_loss, force_loss
from escn_train.training.metrics import EnergyForceMetrics, efwt_per_structure


def test_energy_losses_by_hand():
    pred = torch.tensor([1.0, 2.0, 4.0])
    true = torch.tensor([0.0, 2.0, 1.0])
    assert energy_loss(pred, true, "mae").item() == pytest.approx((1 + 0 + 3) / 3)
    assert energy_loss(pred, true, "mse").item() == pytest.approx((1 + 0 + 9) / 3)
    # huber, delta 1: 0.5·1² for |e|=1, 0 for 0, 1·(3 - 0.5) for |e|=3
    assert energy_loss(pred, true, "huber", delta=1.0).item() == pytest.approx((0.5 + 0 + 2.5) / 3)


def test_force_losses_by_hand_and_mask():
    pred = torch.tensor([[3.0, 4.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 2.0]])
    true = torch.zeros(3, 3)
    # l2mae: mean of per-atom error norms 5, sqrt(3), 2
    assert force_loss(pred, true, "l2mae").item() == pytest.approx((5 + math.sqrt(3) + 2) / 3)
    assert force_loss(pred, true, "mae").item() == pytest.approx((7 + 3 + 2) / 9)
    assert force_loss(pred, true, "mse").item() == pytest.approx((25 + 3 + 4) / 9)
    mask = torch.tensor([True, False, True])
    assert force_loss(pred, true, "l2mae", mask).item() == pytest.approx((5 + 2) / 2)
    empty = force_loss(pred.requires_grad_(), true, "l2mae", torch.zeros(3, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad


def test_combined_loss_coefficients_and_free_atoms():
    loss = EnergyForceLoss({"energy": {"type": "mse", "coefficient": 2.0}, "forces": {"type": "mae", "coefficient": 10.0}})
    fixed = torch.tensor([0, 1])
    mask = loss.force_mask(fixed)
    out = loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([[1.0, 0, 0], [9.0, 9, 9]]), torch.zeros(2, 3), mask)
    assert out["energy_loss"].item() == pytest.approx(1.0)
    assert out["forces_loss"].item() == pytest.approx(1 / 3)  # the fixed atom is ignored
    assert out["loss"].item() == pytest.approx(2.0 + 10.0 / 3)
    assert EnergyForceLoss({"forces_on_free_atoms": False}).force_mask(fixed) is None


@pytest.mark.parametrize(
    "config, key",
    [
        ({"forces": {"type": "l3"}}, "loss.forces.type"),
        ({"energy": {"type": "rmse"}}, "loss.energy.type"),
        ({"energy": {"coefficient": -1}}, "loss.energy.coefficient"),
        ({"forces": {"typo": 1}}, "loss.forces"),
        ({"energy": {"coefficient": 0}, "forces": {"coefficient": 0}}, "loss"),
    ],
)
def test_invalid_loss_config_names_key(config, key):
    with pytest.raises(LossConfigError, match=key.replace(".", r"\.")):
        EnergyForceLoss(config)


def test_metrics_against_numpy():
    rng = np.random.default_rng(0)
    natoms = [3, 4, 2]
    batch = np.repeat(np.arange(3), natoms)
    n = batch.size
    f_true = rng.normal(size=(n, 3))
    f_pred = f_true + rng.normal(scale=0.02, size=(n, 3))
    f_pred[0] += 1.0  # structure 0 fails the force threshold
    e_true = rng.normal(size=3)
    e_pred = e_true + np.array([0.001, 0.05, 0.01])  # structure 1 fails the energy threshold
    fixed = np.zeros(n, dtype=int)
    fixed[[1, 5]] = 1
    free = fixed == 0

    metrics = EnergyForceMetrics()
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    # two updates (split batch) must equal one pass
    metrics.update(t(e_pred[:2]), t(e_true[:2]), t(f_pred[:7]), t(f_true[:7]), torch.tensor(batch[:7]), torch.tensor(free[:7]))
    metrics.update(t(e_pred[2:]), t(e_true[2:]), t(f_pred[7:]), t(f_true[7:]), torch.tensor(batch[7:] - 2), torch.tensor(free[7:]))
    values = {name: float(m.compute()) for name, m in metrics.members().items()}

    fp, ft = f_pred[free], f_true[free]
    cos = (fp * ft).sum(1) / (np.linalg.norm(fp, axis=1) * np.linalg.norm(ft, axis=1))
    expected = {
        "energy_mae": np.abs(e_pred - e_true).mean(),
        "forces_mae": np.abs(fp - ft).mean(),
        "forces_cosine": cos.mean(),
        "forces_magnitude_error": np.abs(np.linalg.norm(fp, axis=1) - np.linalg.norm(ft, axis=1)).mean(),
        "forces_mae_zero_baseline": np.abs(ft).mean(),
    }
    max_err = [np.abs(f_pred - f_true)[(batch == s) & free].max() for s in range(3)]
    ok = [(abs(e_pred[s] - e_true[s]) < 0.02) and (max_err[s] < 0.03) for s in range(3)]
    expected["efwt"] = np.mean(ok)
    for name, value in expected.items():
        assert values[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert ok == [False, False, bool(max_err[2] < 0.03)]


def test_efwt_ignores_fixed_atoms():
    e = torch.zeros(1)
    f_true = torch.zeros(2, 3)
    f_pred = torch.tensor([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0]])
    batch = torch.zeros(2, dtype=torch.long)
    assert not efwt_per_structure(e, e, f_pred, f_true, batch).item()
    assert efwt_per_structure(e, e, f_pred, f_true, batch, torch.tensor([True, False])).item()
