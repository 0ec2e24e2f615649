"""End-to-end `train.py` runs in subprocesses on small demo subsets with a tiny model.

Covers: a fit+test run writing metrics.json and checkpoints (weights_only-loadable), resume
from ckpt_path continuing step count, optimizer and EMA state, init_from starting a fresh
run, invalid values failing with the key, `--cfg job`, a 2-combination multirun summary,
wandb offline without a key, and a 2-process CPU DDP run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STEPS = 3  # training batches per epoch in these runs


def tiny_overrides(stats_dir: Path) -> list[str]:
    return [
        "data.train.subset=48",
        "data.val.subset=16",
        "data.test.subset=16",
        "data.batch_size=8",
        "data.eval_batch_size=16",
        f"data.stats_cache_dir={stats_dir}",
        "data.progress=false",
        "model.num_layers=1",
        "model.lmax=1",
        "model.mmax=1",
        "model.sphere_channels=8",
        "model.hidden_channels=8",
        "model.edge_channels=8",
        "model.num_sphere_samples=8",
        "model.max_neighbors=12",
        "model.distance_resolution=0.1",
        "trainer.max_epochs=1",
        f"trainer.limit_train_batches={STEPS}",
        "trainer.log_every_n_steps=1",
        "trainer.enable_model_summary=false",
        "scheduler.warmup_steps=2",
    ]


def run_train(args: list[str], tmp: Path, env: dict[str, str] | None = None, check: bool = True, timeout: int = 300):
    full_env = {**os.environ, "ESCN_DATA_DIR": str(REPO / "data"), "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stats")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, stats_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("run") / "first"
    run_train([*tiny_overrides(stats_dir), f"hydra.run.dir={run_dir}"], run_dir)
    return run_dir


@pytest.mark.slow
def test_fit_writes_metrics_checkpoints_and_plots(first_run: Path):
    metrics = json.loads((first_run / "metrics.json").read_text())
    for key in ("test/forces_mae", "test/energy_mae", "test/forces_mae_zero_baseline", "test/efwt",
                "test/forces_cosine", "val/forces_mae", "wall_time_s"):
        assert key in metrics, key
    assert metrics["global_step"] == STEPS
    last = first_run / "checkpoints" / "last.ckpt"
    best = list((first_run / "checkpoints").glob("best-*.ckpt"))
    assert last.is_file() and len(best) == 1
    ckpt = load(last)  # weights_only=True must work
    assert ckpt["global_step"] == STEPS
    assert isinstance(ckpt["hyper_parameters"]["model"], dict)
    assert ckpt["config"]["model"]["sphere_channels"] == 8
    assert {"energy_mean", "energy_std", "force_std", "element_references"} <= set(ckpt["normalizers"])
    assert int(ckpt["state_dict"]["ema.num_updates"]) == STEPS
    assert list((first_run / "plots").glob("parity_val_*.png")) and (first_run / "plots" / "parity_test_final.png").is_file()
    assert (first_run / "csv" / "metrics.csv").is_file()

    from escn_train.training.checkpoint import load_potential

    potential = load_potential(last)
    norm = ckpt["normalizers"]
    assert float(potential.energy_std) == pytest.approx(norm["energy_std"] * norm["energy_scale"])
    ema_weight = ckpt["state_dict"]["ema.module.model.sphere_embedding.weight"]
    torch.testing.assert_close(potential.model.sphere_embedding.weight, ema_weight)
    raw = load_potential(last, use_ema=False)
    torch.testing.assert_close(raw.model.sphere_embedding.weight, ckpt["state_dict"]["potential.model.sphere_embedding.weight"])


@pytest.mark.slow
def test_resume_continues_steps_optimizer_and_ema(first_run: Path, stats_dir: Path, tmp_path: Path):
    first = load(first_run / "checkpoints" / "last.ckpt")
    run_dir = tmp_path / "resumed"
    run_train(
        [*tiny_overrides(stats_dir), "trainer.max_epochs=2", f"ckpt_path={first_run / 'checkpoints' / 'last.ckpt'}",
         "test_after_fit=false", f"hydra.run.dir={run_dir}"],
        run_dir,
    )
    resumed = load(run_dir / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 2 * STEPS
    assert resumed["epoch"] == 1
    assert int(resumed["state_dict"]["ema.num_updates"]) == 2 * STEPS
    step_counts = {int(s["step"]) for s in resumed["optimizer_states"][0]["state"].values()}
    assert step_counts == {2 * STEPS}
    assert resumed["lr_schedulers"][0]["last_epoch"] == 2 * STEPS
    for key in ("energy_mean", "energy_std", "force_std"):
        assert resumed["normalizers"][key] == pytest.approx(first["normalizers"][key])


@pytest.mark.slow
def test_resume_auto_finds_last_checkpoint_in_fixed_run_dir(first_run: Path, stats_dir: Path, tmp_path: Path):
    run_dir = tmp_path / "requeued"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(first_run / "checkpoints" / "last.ckpt", run_dir / "checkpoints" / "last.ckpt")
    proc = run_train([*tiny_overrides(stats_dir), "trainer.max_epochs=2", "resume=auto", "test_after_fit=false",
                      f"hydra.run.dir={run_dir}"], run_dir)
    assert "resuming from" in proc.stdout
    assert load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 2 * STEPS


@pytest.mark.slow
def test_init_from_starts_fresh(first_run: Path, stats_dir: Path, tmp_path: Path):
    run_dir = tmp_path / "finetune"
    best = next((first_run / "checkpoints").glob("best-*.ckpt"))
    # different normaliser settings would be ignored: init_from brings the checkpoint's
    run_train([*tiny_overrides(stats_dir), f"init_from={best}", "test_after_fit=false", "normalizer.element_references=false",
               f"hydra.run.dir={run_dir}"], run_dir)
    tuned = load(run_dir / "checkpoints" / "last.ckpt")
    source = load(best)
    assert tuned["global_step"] == STEPS  # a fresh step counter
    assert int(tuned["state_dict"]["ema.num_updates"]) == STEPS
    assert tuned["normalizers"] == source["normalizers"]


@pytest.mark.slow
def test_invalid_value_names_key_and_cfg_job(tmp_path: Path):
    bad = run_train(["loss.forces.type=l3", f"hydra.run.dir={tmp_path / 'bad'}"], tmp_path, check=False)
    assert bad.returncode != 0
    assert "loss.forces.type" in bad.stderr and "l3" in bad.stderr
    bad_model = run_train(["model.mmax=3", f"hydra.run.dir={tmp_path / 'bad2'}"], tmp_path, check=False)
    assert bad_model.returncode != 0 and "model.mmax" in bad_model.stderr
    missing = run_train(["data=lmdb", f"hydra.run.dir={tmp_path / 'bad3'}"], tmp_path, check=False)
    assert missing.returncode != 0 and "data.train.src" in missing.stderr
    shown = run_train(["--cfg", "job", "model=escn_l6_m3"], tmp_path)
    assert "sphere_channels: 160" in shown.stdout and "optimizer:" in shown.stdout
    helped = run_train(["--help"], tmp_path)
    assert "experiment:" in helped.stdout and "oc20_s2ef_2m_escn_l4_m2" in helped.stdout


@pytest.mark.slow
def test_multirun_writes_summary(stats_dir: Path, tmp_path: Path):
    sweep = tmp_path / "sweep"
    run_train(
        ["-m", *tiny_overrides(stats_dir), "model.num_layers=1,2", "callbacks.parity_plot=null",
         f"hydra.sweep.dir={sweep}"],
        tmp_path,
    )
    summary = (sweep / "multirun_summary.md").read_text()
    assert "model.num_layers=1" in summary and "model.num_layers=2" in summary
    rows = (sweep / "multirun_summary.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and "test/forces_mae" in rows[0]
    assert all(",ok," in row for row in rows[1:])


@pytest.mark.slow
def test_wandb_offline_without_key(stats_dir: Path, tmp_path: Path):
    run_dir = tmp_path / "wb"
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb_dir"), "WANDB_API_KEY": "",
           "NETRC": str(tmp_path / "no-netrc")}
    run_train([*tiny_overrides(stats_dir), "logger=wandb", "test_after_fit=false", f"hydra.run.dir={run_dir}"], run_dir, env=env)
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert run_id
    assert load(run_dir / "checkpoints" / "last.ckpt")["run_info"]["wandb_id"] == run_id
    offline_runs = list(run_dir.rglob(f"offline-run-*-{run_id}"))
    assert offline_runs, "no offline wandb run directory"
    # a resumed run (new run directory) continues the same wandb run id
    resumed_dir = tmp_path / "wb_resumed"
    run_train([*tiny_overrides(stats_dir), "logger=wandb", "test_after_fit=false", "trainer.max_epochs=2",
               f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={resumed_dir}"], resumed_dir, env=env)
    assert (resumed_dir / "wandb_id.txt").read_text().strip() == run_id
    assert list(resumed_dir.rglob(f"offline-run-*-{run_id}"))


@pytest.mark.slow
def test_ddp_two_cpu_processes(stats_dir: Path, tmp_path: Path):
    run_dir = tmp_path / "ddp"
    run_train(
        [*tiny_overrides(stats_dir), "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "threads=1",
         f"trainer.limit_train_batches={STEPS}", "trainer.max_epochs=1", "trainer.enable_model_summary=false",
         f"hydra.run.dir={run_dir}"],
        run_dir,
        timeout=400,
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == STEPS
    assert metrics["test/forces_mae"] > 0
    ckpt = load(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == STEPS
