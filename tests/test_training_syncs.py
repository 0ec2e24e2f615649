"""Host syncs of the training step outside the model (issue 14): none per step, a constant per logging interval."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from escn_train.testing.training_syncs import training_step_syncs

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo" / "train.lmdb"
TINY_MODEL = dict(num_layers=1, lmax=1, mmax=1, sphere_channels=8, hidden_channels=8, edge_channels=8,
                  num_sphere_samples=8, max_neighbors=12, distance_resolution=0.1, cutoff=6.0)
NORMALIZER = {"energy_mean": 0.0, "energy_std": 1.0, "force_std": 1.0, "element_references": False}
#: Host reads per logging interval outside the model: Lightning's logging of the step values,
#: the non-finite guard's flags, the throughput atom count and the progress bar's loss.
PER_INTERVAL_BOUND = 12


def _module():
    from escn_train.training.module import PotentialModule

    torch.manual_seed(0)
    return PotentialModule(model=TINY_MODEL, ema={"decay": 0.99}, normalizer=NORMALIZER,
                           scheduler={"name": "cosine", "warmup_steps": 2})


@pytest.mark.skipif(not DEMO.exists(), reason="demo data not generated")
def test_training_step_outside_the_model_makes_no_host_sync_between_logging_intervals(tmp_path):
    from escn_train.data import LmdbDataModule
    from escn_train.training.progress import LossProgressBar
    from escn_train.training.reliability import NonFiniteGuard
    from escn_train.training.throughput import ThroughputMonitor

    def data():  # the demo structures hold fixed atoms: the loss and metric masks are exercised
        return LmdbDataModule(train={"src": str(DEMO), "subset": 48}, batch_size=4, progress=False,
                              stats_cache_dir=str(tmp_path))

    per_interval, reports = {}, {}
    for every in (1, 2):
        def callbacks(every=every):
            return [NonFiniteGuard(5), ThroughputMonitor(), LossProgressBar(refresh_rate=every)]

        syncs = training_step_syncs(_module, data, callbacks, log_every_n_steps=every)
        per_interval[every] = syncs.outside_per_step * every
        reports[every] = f"every {every}: {syncs}"
        origins = "\n".join(syncs.outside_origins)
        for path in ("losses.py", "metrics.py", "ema.py", "module.py", "optim.py"):
            assert path not in origins, str(syncs)
    # the same count per interval whatever its length: nothing per step
    assert per_interval[1] == per_interval[2], "\n".join(reports.values())
    assert per_interval[1] <= PER_INTERVAL_BOUND, "\n".join(reports.values())


def test_nonfinite_guard_on_a_fused_optimizer_makes_no_host_sync_until_read():
    from escn_train.testing import SyncCounter
    from escn_train.training.reliability import NonFiniteGuard

    layer = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)
    strategy = SimpleNamespace(root_device=torch.device("cpu"), precision_plugin=SimpleNamespace(scaler=None))
    trainer = SimpleNamespace(world_size=1, global_rank=0, strategy=strategy, current_epoch=0, global_step=0,
                              is_global_zero=True, log_every_n_steps=50, lr_scheduler_configs=[])
    module = SimpleNamespace(step_skipped=False)
    guard = NonFiniteGuard(3)
    before = layer.weight.detach().clone()
    weights = []
    with SyncCounter() as syncs:
        for step, target in enumerate([1.0, float("nan"), 1.0]):
            trainer.global_step = step
            guard.on_train_batch_start(trainer, module, SimpleNamespace(sid=torch.tensor([step])), step)
            loss = (layer(torch.ones(2, 3)).squeeze(-1) - target).pow(2).mean()
            module.last_train_loss = loss.detach()
            optimizer.zero_grad()
            loss.backward()
            guard.on_before_optimizer_step(trainer, module, optimizer)
            optimizer.step()
            guard.on_train_batch_end(trainer, module, None, None, step)
            weights.append(layer.weight.detach().clone())
    assert syncs.count == 0, syncs.summary()
    after_first = weights[0]
    assert torch.equal(weights[1], after_first)  # the NaN step changed nothing
    assert guard.skipped == 0  # not read yet
    assert not torch.equal(before, after_first)
    guard._read(trainer)
    assert guard.skipped == 1 and guard.consecutive == 0
    assert {int(s["step"]) for s in optimizer.state.values()} == {2}


def test_training_module_turns_the_model_input_checks_off_only_for_checked_data():
    module = _module()
    models = [module.potential.model, module.ema.module.model]
    for model in models:  # the eSCN option (issue 14); set here so the test does not depend on it
        model.check_inputs = True

    def setup(**datamodule):
        module._trainer = SimpleNamespace(datamodule=SimpleNamespace(**datamodule))
        module.setup("fit")
        return [m.check_inputs for m in models]

    checked = dict(check_samples=True, max_num_elements=100, min_distance=0.1)
    assert setup(**checked) == [False, False]
    module.teardown("fit")
    assert [m.check_inputs for m in models] == [True, True]
    assert setup(**{**checked, "check_samples": False}) == [True, True]
    assert setup(**{**checked, "max_num_elements": 101}) == [True, True]  # elements the model cannot embed
    assert setup(**{**checked, "min_distance": None}) == [True, True]  # zero-length edges possible
    module._trainer = SimpleNamespace(datamodule=None)
    module.setup("fit")
    assert [m.check_inputs for m in models] == [True, True]


def test_ddp_skip_mode_scales_gradients_without_reading_back_while_this_rank_has_data():
    """The micro-batch counts are summed across ranks on the device; only a rank without
    data reads the sum (to learn whether the step is empty everywhere)."""
    from escn_train.testing import SyncCounter
    from escn_train.training.module import PotentialModule

    module = PotentialModule(model=TINY_MODEL, normalizer=NORMALIZER)
    params = [p for p in module.potential.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    other_rank = {}  # the other rank's (total, filled), added by the fake all-reduce

    def reduce(tensor, reduce_op):
        assert reduce_op == "sum"
        return tensor + torch.tensor(other_rank["counts"], dtype=tensor.dtype)

    strategy = SimpleNamespace(root_device=torch.device("cpu"), reduce=reduce)
    module._trainer = SimpleNamespace(world_size=2, is_global_zero=True, global_step=0, strategy=strategy)
    module._may_be_empty = True

    def step(mine, other):
        other_rank["counts"] = [float(v) for v in other]
        for p in params:
            p.grad = torch.ones_like(p)
        module._micro_batches = list(mine)
        module.step_skipped = False
        with SyncCounter() as syncs:
            module.on_before_optimizer_step(optimizer)
        return syncs.count

    assert step((2, 2), (2, 1)) == 0  # 4 micro-batches over both ranks, 3 with data
    assert all(torch.allclose(p.grad, torch.full_like(p, 4 / 3)) for p in params) and not module.step_skipped
    assert step((2, 2), (2, 2)) == 0
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in params)
    assert step((1, 0), (1, 1)) == 1  # this rank had none: one read, then the same scale as the other rank
    assert all(torch.allclose(p.grad, torch.full_like(p, 2.0)) for p in params) and not module.step_skipped
    assert step((1, 0), (1, 0)) == 1  # empty on every rank: skipped
    assert module.step_skipped and all(p.grad is None for p in params) and module.empty_steps == 1
