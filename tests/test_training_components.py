"""Normalisers, EMA, parameter groups, LR schedules, RNG state and config checks."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from escn_train.training.config_checks import ConfigError, check_config
from escn_train.training.ema import ExponentialMovingAverage
from escn_train.training.module import PotentialModule, capture_rng_states, normalizers_from_statistics, restore_rng_states
from escn_train.training.optim import OptimConfigError, build_optimizer, build_scheduler, parameter_groups

TINY = dict(
    max_neighbors=8, cutoff=4.0, max_num_elements=20, num_layers=1, lmax=1, mmax=1, sphere_channels=4,
    hidden_channels=8, edge_channels=4, num_sphere_samples=8, distance_resolution=0.2,
)


def test_normalizer_round_trip_and_buffers():
    module = PotentialModule(
        model=TINY,
        normalizer={"energy_mean": 1.5, "energy_std": 2.0, "force_std": 0.5, "element_references": [0.0, -1.0, 0.0, 0.0, 0.0, 0.0, -3.0]},
        ema={"decay": 0.9},
    )
    pot = module.potential
    z = torch.tensor([1, 6, 6, 1])
    batch = torch.tensor([0, 0, 1, 1])
    energy = torch.tensor([-10.0, 4.0])
    forces = torch.randn(4, 3)
    e_n, f_n = pot.normalize_targets(energy, forces, z, batch)
    # by hand: structure 0 reference -1 - 3 = -4 -> (-10 + 4 - 1.5) / 2
    assert e_n[0].item() == pytest.approx((-10 + 4 - 1.5) / 2)
    torch.testing.assert_close(f_n, forces / 0.5)
    e_back, f_back = pot.to_physical(e_n, f_n, z, batch)
    torch.testing.assert_close(e_back, energy)
    torch.testing.assert_close(f_back, forces)
    # the EMA copy carries the same normalisers, and they are in the state dict
    assert float(module.ema.module.energy_std) == 2.0
    state = module.state_dict()
    assert float(state["potential.energy_mean"]) == 1.5 and float(state["ema.module.force_std"]) == 0.5


def test_normalizers_from_statistics():
    stats = {
        "energy_mean": 3.0, "energy_std": 2.0, "force_rms": 0.7, "force_rms_free": 0.9,
        "referenced_energy_mean": 0.1, "referenced_energy_std": 0.5, "element_references": [0.0, -1.0],
    }
    plain = normalizers_from_statistics(stats, {"element_references": False})
    assert (plain["energy_mean"], plain["energy_std"], plain["force_std"], plain["element_references"]) == (3.0, 2.0, 0.7, None)
    refs = normalizers_from_statistics(stats, {"element_references": True, "force_std_free_atoms": True, "energy_std": 4.0})
    assert (refs["energy_mean"], refs["energy_std"], refs["force_std"]) == (0.1, 4.0, 0.9)
    assert refs["element_references"] == [0.0, -1.0]


def test_ema_update_math():
    model = nn.Linear(2, 1)
    model.register_buffer("scale", torch.tensor(1.0))
    with torch.no_grad():
        model.weight.fill_(0.0)
        model.bias.fill_(0.0)
    ema = ExponentialMovingAverage(model, decay=0.9, warmup=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.scale.fill_(5.0)
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, torch.full((1, 2), 0.1))  # 0.9·0 + 0.1·1
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, torch.full((1, 2), 0.19))  # 0.9·0.1 + 0.1·1
    assert float(ema.module.scale) == 5.0  # buffers are copied, not averaged
    assert int(ema.num_updates) == 2
    assert not any(p.requires_grad for p in ema.module.parameters())
    warm = ExponentialMovingAverage(model, decay=0.999, warmup=True)
    assert warm.current_decay() == pytest.approx(1 / 10)
    warm.num_updates.fill_(90)
    assert warm.current_decay() == pytest.approx(91 / 100)


def test_parameter_groups_exclude_biases_embeddings_and_frozen():
    module = PotentialModule(model=TINY, normalizer={"energy_mean": 0, "energy_std": 1, "force_std": 1})
    groups = parameter_groups(module.potential, weight_decay=0.01)
    names = {id(p): n for n, p in module.potential.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.01 and groups[1]["weight_decay"] == 0.0
    assert all(n.endswith("weight") for n in decay)
    assert "model.sphere_embedding.weight" in no_decay
    assert any("source_embedding" in n for n in no_decay)
    assert all(n.endswith("bias") or "embedding" in n for n in no_decay)
    frozen = {"model.sphere_points", "model.sphharm_weights"}
    assert not frozen & (decay | no_decay)
    trainable = {n for n, p in module.potential.named_parameters() if p.requires_grad}
    assert decay | no_decay == trainable
    optimizer = build_optimizer(module.potential, {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01, "amsgrad": True})
    assert optimizer.defaults["amsgrad"] is True


def _lrs(config, total, steps):
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = build_scheduler(optimizer, config, total)["scheduler"]
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_warmup_step_schedule_matches_published_recipe():
    lrs = _lrs({"name": "step", "warmup_steps": 100, "warmup_factor": 0.2, "milestones": [150, 200], "gamma": 0.3}, 300, 260)
    assert lrs[0] == pytest.approx(0.2)
    assert lrs[50] == pytest.approx(0.2 + 0.8 * 0.5)
    assert lrs[100] == pytest.approx(1.0) and lrs[149] == pytest.approx(1.0)
    assert lrs[150] == pytest.approx(0.3) and lrs[199] == pytest.approx(0.3)
    assert lrs[200] == pytest.approx(0.09)


def test_cosine_schedule_and_fractional_milestones():
    lrs = _lrs({"name": "cosine", "warmup_steps": 10, "warmup_factor": 0.0, "min_lr_ratio": 0.1}, 110, 111)
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[110] == pytest.approx(0.1)
    frac = _lrs({"name": "step", "warmup_steps": 0, "milestones": [0.5], "gamma": 0.1}, 100, 60)
    assert frac[49] == pytest.approx(1.0) and frac[50] == pytest.approx(0.1)


def test_plateau_scheduler_config():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    config = build_scheduler(optimizer, {"name": "plateau", "patience": 0, "factor": 0.5}, 10)
    assert config["monitor"] == "val/forces_mae" and config["interval"] == "epoch"
    scheduler = config["scheduler"]
    scheduler.step(1.0)
    scheduler.step(2.0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)


def test_scheduler_and_optimizer_errors_name_keys():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(OptimConfigError, match=r"scheduler\.name"):
        build_scheduler(optimizer, {"name": "linear"}, 10)
    with pytest.raises(OptimConfigError, match=r"scheduler: keys \['gamma'\]"):
        build_scheduler(optimizer, {"name": "cosine", "gamma": 0.1}, 10)
    with pytest.raises(OptimConfigError, match=r"optimizer\.name"):
        build_optimizer(nn.Linear(1, 1), {"name": "sgd"})


def test_rng_state_round_trip():
    states = capture_rng_states()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng_states(states)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


@pytest.mark.parametrize(
    "override, key",
    [
        ({"model": {**TINY, "mmax": 3}}, "model.mmax"),
        ({"model": {**TINY, "lmax": 0}}, "model.lmax"),
        ({"model": {**TINY, "widht": 3}}, "model: unknown"),
        ({"loss": {"forces": {"type": "l3"}}}, "loss.forces.type"),
        ({"scheduler": {"name": "poly"}}, "scheduler.name"),
        ({"resume": "yes"}, "resume"),
        ({"trainer": {"accelerator": "cpu", "precision": "16-mixed"}}, "trainer.precision"),
    ],
)
def test_check_config_names_key(override, key):
    cfg = {"model": TINY, "data": {"train": "a", "val": "b"}, "optimizer": {"name": "adamw", "lr": 1e-3}}
    cfg.update(override)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_config(cfg)


def test_energy_scale_keeps_physical_units():
    module = PotentialModule(
        model=TINY, normalizer={"energy_mean": 1.0, "energy_std": 2.0, "force_std": 1.0, "energy_scale": 1000.0}
    )
    assert float(module.potential.energy_std) == pytest.approx(2000.0)
    values = module.normalizer_values()
    assert values["energy_std"] == pytest.approx(2.0) and values["energy_scale"] == 1000.0
    z, batch = torch.tensor([1, 1]), torch.tensor([0, 0])
    e_n, _ = module.potential.normalize_targets(torch.tensor([5.0]), torch.zeros(2, 3), z, batch)
    assert e_n.item() == pytest.approx((5.0 - 1.0) / 2000.0)  # the network's unit
    assert (e_n * module.energy_scale).item() == pytest.approx(2.0)  # the loss's unit: data std
