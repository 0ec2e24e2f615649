"""Mistakes users make with train.py, each answered before any data is read (or, for a full
disk, when the checkpoint is written) with one line naming the setting or file and what was
expected; and every `python train.py` command line of the README composing as written.

Entry-level data errors (cells, shapes, dtypes, `length`) are in tests/test_data_bad_samples.py.
"""

from __future__ import annotations

import errno
import itertools
import os
import pickle
import re
import shlex
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch

from escn_train.training.checkpoint import model_differences
from escn_train.training.config_checks import ConfigError, check_devices
from escn_train.training.reliability import AtomicCheckpointIO, CheckpointWriteError, atomic_torch_save
from escn_train.training.run import check_resume_model

REPO = Path(__file__).resolve().parents[1]
TINY = {"num_layers": 1, "lmax": 1, "mmax": 1, "sphere_channels": 8, "hidden_channels": 8, "edge_channels": 8,
        "num_sphere_samples": 8, "max_neighbors": 12, "distance_resolution": 0.1}
TINY_OVERRIDES = [f"model.{k}={v}" for k, v in TINY.items()]
ENOSPC = os.strerror(errno.ENOSPC)  # "No space left on device"


def _env() -> dict[str, str]:
    return {**os.environ, "ESCN_DATA_DIR": str(REPO / "data"), "PYTHONWARNINGS": "ignore"}


def _train(args: list[str], timeout: int = 300, prelude: str | None = None) -> subprocess.CompletedProcess:
    """``python train.py args`` from the repository root; ``prelude`` runs first in the same process."""
    if prelude is None:
        cmd = [sys.executable, str(REPO / "train.py"), *args]
    else:
        runner = f"{prelude}\nimport runpy, sys\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"
        cmd = [sys.executable, "-c", runner, str(REPO / "train.py"), *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ------------------------------------------------------------------------- full disk
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, ENOSPC)


def test_disk_full_keeps_the_previous_checkpoint_and_says_so_in_one_line(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1}, path)
    monkeypatch.setattr(torch, "save", _enospc)
    with pytest.raises(CheckpointWriteError) as info:
        io.save_checkpoint({"global_step": 2}, path)
    assert str(info.value) == f"cannot write checkpoint {path}: {ENOSPC} (previous last.ckpt kept)"
    assert info.value.__suppress_context__  # no chained tracebacks behind it
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # temporary removed


def test_disk_full_inside_torch_zip_writer_is_one_line_too(tmp_path, monkeypatch):
    """A real failed write: torch's zip writer raises its own RuntimeError while handling the ENOSPC."""
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, handle):
            self.handle, self.written = handle, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 64:
                raise OSError(errno.ENOSPC, ENOSPC)
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    path = tmp_path / "best.ckpt"
    with pytest.raises(CheckpointWriteError) as info:
        atomic_torch_save({"w": torch.zeros(1000)}, path)
    assert str(info.value) == f"cannot write checkpoint {path}: {ENOSPC} (nothing was written)"
    assert list(tmp_path.iterdir()) == []


def test_other_save_errors_are_not_disguised(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise TypeError("cannot pickle 'generator' object")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(TypeError, match="cannot pickle"):
        atomic_torch_save({"g": 1}, tmp_path / "x.ckpt")


_FULL_DISK_AFTER_FIRST_SAVE = """
import errno, os, torch
real_save, saves = torch.save, []
def save(obj, f, *args, **kwargs):
    saves.append(1)
    if len(saves) > 1:
        f.write(b"PK partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_save(obj, f, *args, **kwargs)
torch.save = save
"""


@pytest.mark.slow
def test_train_with_a_full_disk_prints_one_line_and_keeps_last_ckpt(tmp_path):
    run_dir = tmp_path / "run"
    done = _train([
        "data.train.subset=16", "data.val.subset=8", "data.test=null", "data.batch_size=4", "data.progress=false",
        f"data.stats_cache_dir={tmp_path / 'stats'}", *TINY_OVERRIDES, "trainer.max_epochs=1",
        "trainer.enable_model_summary=false", "trainer.enable_progress_bar=false", "callbacks.progress_bar=null",
        "callbacks.parity_plot=null", "callbacks.last_checkpoint.every_n_train_steps=1", "threads=1",
        f"hydra.run.dir={run_dir}",
    ], prelude=_FULL_DISK_AFTER_FIRST_SAVE)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert done.returncode == 1, done.stderr[-3000:]
    assert _last_line(done.stderr) == f"cannot write checkpoint {last}: {ENOSPC} (previous last.ckpt kept)"
    assert "Traceback" not in done.stderr
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 1


# ------------------------------------------------------------------------- devices
def test_gpu_accelerator_without_gpus_names_the_setting(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError) as info:
        check_devices({"accelerator": "gpu", "devices": 8, "strategy": "ddp"})
    assert str(info.value) == (
        f"trainer.accelerator: 'gpu' (with trainer.devices=8) needs a GPU, but this machine has none "
        f"(torch.cuda.device_count() = 0; {os.cpu_count()} CPU cores); use trainer.accelerator=cpu, e.g. trainer=ddp "
        "trainer.accelerator=cpu trainer.devices=2"
    )
    check_devices({"accelerator": "cpu", "devices": 8})  # CPU processes: fine
    check_devices({"accelerator": "auto", "devices": "auto"})


@pytest.mark.parametrize("devices, ok", [(2, True), (4, False), ("auto", True), (-1, True), ("0,1", True),
                                         ([1, 3], False), ("3", False), ([0], True)])
def test_more_gpus_than_the_machine_has_names_trainer_devices(monkeypatch, devices, ok):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    if ok:
        check_devices({"accelerator": "cuda", "devices": devices})
        return
    with pytest.raises(ConfigError) as info:
        check_devices({"accelerator": "cuda", "devices": devices})
    assert str(info.value) == (
        f"trainer.devices: {devices!r} asks for GPU(s) this machine does not have: it has 2 (indices 0..1); "
        "set trainer.devices=2 or fewer"
    )


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="this machine has GPUs")
def test_readme_ddp_line_on_a_machine_without_gpus_fails_before_reading_data(tmp_path):
    # the README's line, as written, with data that does not exist: the devices are checked first
    done = _train(["model=escn_l4_m2", "trainer=ddp", "trainer.devices=8", "data=lmdb",
                   f"data.train.src={tmp_path / 'nowhere'}", f"data.val.src={tmp_path / 'nowhere'}",
                   f"hydra.run.dir={tmp_path / 'run'}"])
    assert done.returncode == 1
    assert _last_line(done.stderr) == (
        "invalid configuration: trainer.accelerator: 'gpu' (with trainer.devices=8) needs a GPU, but this machine "
        f"has none (torch.cuda.device_count() = 0; {os.cpu_count()} CPU cores); use trainer.accelerator=cpu, e.g. "
        "trainer=ddp trainer.accelerator=cpu trainer.devices=2"
    )
    assert "Traceback" not in done.stderr


# ------------------------------------------------------------------------- resuming another model
def _fake_checkpoint(path: Path, model: dict) -> Path:
    torch.save({"state_dict": {"potential.w": torch.zeros(2)}, "hyper_parameters": {"model": model}}, path)
    return path


def test_model_differences_fill_in_defaults_and_ignore_runtime_switches():
    assert model_differences({**TINY, "compile": True}, {**TINY, "export": False}) == []
    assert model_differences({**TINY, "cutoff": 8.0}, TINY) == []  # 8.0 is eSCN's default
    assert model_differences({**TINY, "sphere_channels": 128, "num_layers": 2}, TINY) == [
        "model.num_layers is 1 here but 2 in the checkpoint",
        "model.sphere_channels is 8 here but 128 in the checkpoint",
    ]


def test_resuming_a_checkpoint_of_another_model_size_names_the_settings(tmp_path):
    path = _fake_checkpoint(tmp_path / "big.ckpt", {**TINY, "sphere_channels": 128, "lmax": 4})
    with pytest.raises(ConfigError) as info:
        check_resume_model(str(path), TINY, "ckpt_path")
    assert str(info.value) == (
        f"ckpt_path: {path} holds a different model: model.lmax is 1 here but 4 in the checkpoint; "
        "model.sphere_channels is 8 here but 128 in the checkpoint (resume with the checkpoint's model settings)"
    )
    check_resume_model(str(_fake_checkpoint(tmp_path / "same.ckpt", TINY)), TINY, "ckpt_path")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=rf"^ckpt_path: cannot resume from {tmp_path / 'junk.ckpt'}: "):
        check_resume_model(str(tmp_path / "junk.ckpt"), TINY, "ckpt_path")


@pytest.mark.slow
def test_train_resuming_another_model_fails_before_the_data_is_read(tmp_path):
    import yaml

    tiny_conf = {**yaml.safe_load((REPO / "conf" / "model" / "escn_tiny.yaml").read_text()), **TINY}
    path = _fake_checkpoint(tmp_path / "big.ckpt", {**tiny_conf, "sphere_channels": 128})
    done = _train(["data=lmdb", f"data.train.src={tmp_path / 'nowhere'}", f"data.val.src={tmp_path / 'nowhere'}",
                   *TINY_OVERRIDES, f"ckpt_path={path}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert done.returncode == 1
    assert _last_line(done.stderr) == (
        f"invalid configuration: ckpt_path: {path} holds a different model: model.sphere_channels is 8 here but 128 "
        "in the checkpoint (resume with the checkpoint's model settings)"
    )
    assert "Traceback" not in done.stderr


# ------------------------------------------------------------------------- the README's command lines
def readme_train_commands() -> list[list[str]]:
    """Every ``python train.py ...`` line of the README's shell blocks, as argument lists."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.split(r"\s#", line)[0].strip()
            if line.startswith("python train.py"):
                commands.append(shlex.split(line)[2:])
    return commands


def _plugin_missing(args: list[str]) -> str | None:
    import importlib.util

    needs = {"hparams_search=optuna": ("hydra_plugins.hydra_optuna_sweeper", "sweep"),
             "hydra/launcher=slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm")}
    for arg, (module, extra) in needs.items():
        if arg in args:
            try:
                found = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:
                found = False
            if not found:
                return f"needs pip install -e '.[{extra}]'"
    return None


def _jobs(args: list[str]) -> list[list[str]]:
    """The jobs a command starts: a multirun (``-m``) expands its sweeps as Hydra's basic sweeper does."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in args if a != "..."]  # the README's "and your other settings"
    if "-m" not in args and "--multirun" not in args:
        return [args]
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    choices = []
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override():
            key = override.get_key_element()
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    return [list(job) for job in itertools.product(*choices)]


README_COMMANDS = readme_train_commands()


def test_readme_lists_the_train_commands():
    assert ["data=lmdb", "data.train.src=/d/train", "data.val.src=/d/val", "data.test.src=/d/test",
            "data.key_mapping={y: energy, force: forces}"] in README_COMMANDS
    assert len(README_COMMANDS) >= 10


@pytest.mark.slow
@pytest.mark.parametrize("args", README_COMMANDS, ids=[" ".join(a)[:60] or "(no arguments)" for a in README_COMMANDS])
def test_readme_train_command_composes_as_written(args, tmp_path):
    """Each README line composes and resolves (``--cfg job --resolve``; a real run would take hours)."""
    missing = _plugin_missing(args)
    if missing:
        pytest.skip(missing)
    for job in _jobs(args):
        shown = job if ("--help" in job or "--cfg" in job) else [*job, "--cfg", "job", "--resolve"]
        done = _train(shown, timeout=120)
        assert done.returncode == 0, f"python train.py {' '.join(job)}:\n{done.stderr[-3000:]}"
        assert done.stdout.strip()


def test_readme_key_mapping_override_reaches_the_datamodule():
    """The README's override for older OC20 files replaces the (empty) mapping of data=lmdb."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["data=lmdb", "data.train.src=/d/train", "data.val.src=/d/val",
                                           "data.test.src=/d/test", "data.key_mapping={y: energy, force: forces}"])
    assert dict(cfg.data.key_mapping) == {"y": "energy", "force": "forces"}
    assert cfg.data.test.src == "/d/test"
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        plain = compose("config", overrides=["data=lmdb", "data.train.src=/d/train", "data.val.src=/d/val"])
    assert plain.data.key_mapping is None and plain.data.test.src is None  # no mapping, no test split


def _write_legacy_lmdb(path: Path, count: int) -> Path:
    """``count`` demo structures stored the older OC20 way: energy as ``y``, forces as ``force``."""
    from escn_train.data import LmdbDataset

    demo = LmdbDataset(REPO / "data" / "demo" / "train.lmdb")
    env = lmdb.open(str(path), subdir=False, map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i in range(count):
            data = demo[i]
            entry = {"pos": data.pos.numpy(), "cell": data.cell.numpy(), "atomic_numbers": data.atomic_numbers.numpy(),
                     "natoms": int(data.natoms), "y": float(data.energy), "force": data.forces.numpy(),
                     "fixed": data.fixed.numpy(), "tags": data.tags.numpy(), "sid": i}
            txn.put(str(i).encode(), pickle.dumps(entry))
        txn.put(b"length", pickle.dumps(count))
    env.close()
    return path


@pytest.mark.slow
@pytest.mark.skipif(not (REPO / "data" / "demo" / "train.lmdb").exists(), reason="demo data not generated")
def test_readme_lmdb_line_trains_on_older_oc20_files(tmp_path):
    """The README's data=lmdb line as written (paths replaced), run for a few steps on y/force files."""
    data = {split: _write_legacy_lmdb(tmp_path / f"{split}.lmdb", 12) for split in ("train", "val", "test")}
    line = next(a for a in README_COMMANDS if "data=lmdb" in a and any(x.startswith("data.key_mapping=") for x in a))
    args = [re.sub(r"^(data\.(train|val|test)\.src)=.*", lambda m: f"{m[1]}={data[m[2]]}", a) for a in line]
    done = _train([*args, "data.batch_size=4", "data.num_workers=0", "data.persistent_workers=false",
                   "data.pin_memory=false", "data.progress=false", f"data.stats_cache_dir={tmp_path / 'stats'}",
                   *TINY_OVERRIDES, "trainer.max_epochs=1", "trainer.enable_model_summary=false",
                   "trainer.enable_progress_bar=false", "callbacks.progress_bar=null", "callbacks.parity_plot=null",
                   "threads=1", f"hydra.run.dir={tmp_path / 'run'}"])
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["global_step"] == 3 and np.isfinite(metrics["test/forces_mae"])


def test_a_split_placeholder_with_null_src_is_no_split():
    from escn_train.data import LmdbDataModule
    from escn_train.data.datamodule import is_absent_split

    assert is_absent_split(None) and is_absent_split({"src": None, "subset": None})
    assert not is_absent_split({"path": "x"}) and not is_absent_split("a.lmdb")  # a typo stays an error
    dm = LmdbDataModule(train="a.lmdb", val="b.lmdb", test={"src": None, "subset": None})
    assert dm.splits["test"] is None
    with pytest.raises(ValueError, match="no 'test' split"):
        dm.test_dataloader()


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")))
def test_every_experiment_passes_the_config_checks(experiment):
    """The published recipes compose and pass the start-up checks (on this machine's CPU)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from escn_train.training.config_checks import check_config

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}", "oc20_root=/data/oc20",
                                           "trainer.accelerator=cpu", "trainer.devices=1"], return_hydra_config=True)
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        resolved = OmegaConf.to_container(cfg, resolve=True)
    check_config(resolved)
    assert resolved["trainer"]["gradient_clip_val"] == 20.0


def test_a_non_numeric_gradient_clip_is_refused_naming_the_key():
    from escn_train.training.config_checks import check_config

    with pytest.raises(ConfigError, match=r"^trainer\.gradient_clip_val: expected null or a number >= 0, got 'x20'$"):
        check_config({"trainer": {"gradient_clip_val": "x20"}, "data": {"train": {"src": "a"}, "val": {"src": "b"}}})
