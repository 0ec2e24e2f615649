"""Fine-tuning a fairchem eSCN checkpoint as the README says:
``escn-convert-checkpoint ckpt.pt -o converted.ckpt`` then ``python train.py model=... init_from=converted.ckpt``.

The fairchem checkpoints are built here in fairchem 1.x's trainer layout (no fairchem import):
the ``escn`` layout with ``max_num_elements=90`` (the reference class's default) and the
``escn_export`` layout with ``max_num_elements=100``, both with ``energy_scale`` 1 (fairchem has
no such factor) against the project's default 1000. ``init_from`` must take the checkpoint's
model arguments and normalisers unless they are overridden explicitly, and a conflicting
explicit override must fail with one line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_inference_reference_checkpoint import ENERGY_MEAN, ENERGY_STD, FORCE_STD, reference_checkpoint
from test_train_cli import run_train

from escn_train.inference.reference_checkpoint import FAIRCHEM_EMA_NOTE, main as convert_main
from escn_train.training.checkpoint import CheckpointMismatchError, init_from_settings

DEMO = [
    "data.train.subset=16", "data.val.subset=8", "data.test.subset=8", "data.batch_size=8",
    "data.eval_batch_size=8", "data.progress=false", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]
TINY_CONFIG = {"cutoff": 6.0, "max_num_elements": 100, "basis_width_scalar": 2.0, "max_neighbors": 20}


def fairchem_checkpoint(layout: str) -> dict:
    """fairchem's trainer layout: ``escn`` with 90 elements, ``escn_export`` padded to 100 elements."""
    checkpoint = reference_checkpoint("tiny_l2m1", layout=layout, trainer_config=True, ema_noise=0.02)
    if layout == "escn_export":
        def pad(t: torch.Tensor) -> torch.Tensor:
            extra = torch.randn(10, *t.shape[1:], generator=torch.Generator().manual_seed(1))
            return torch.cat([t, extra]) if t.ndim == 2 and t.shape[0] == 90 else t

        checkpoint["state_dict"] = {k: pad(v) if k.endswith("embedding.weight") else v
                                    for k, v in checkpoint["state_dict"].items()}
        checkpoint["ema"]["shadow_params"] = [pad(t) for t in checkpoint["ema"]["shadow_params"]]
        checkpoint["config"]["model_attributes"]["max_num_elements"] = 100
    return checkpoint


@pytest.fixture(scope="module", params=["escn", "escn_export"])
def converted(request, tmp_path_factory) -> tuple[str, Path, Path]:
    folder = tmp_path_factory.mktemp(request.param)
    source, output = folder / "fairchem.pt", folder / "converted.ckpt"
    torch.save(fairchem_checkpoint(request.param), source)
    assert convert_main([str(source), "-o", str(output)]) == 0
    return request.param, source, output


def test_converter_summary_names_the_default_weights(tmp_path, capsys):
    source = tmp_path / "fairchem.pt"
    torch.save(fairchem_checkpoint("escn"), source)
    assert convert_main([str(source), "-o", str(tmp_path / "c.ckpt")]) == 0
    printed = capsys.readouterr().out
    assert "EMA weights kept and used by default" in printed
    assert FAIRCHEM_EMA_NOTE in printed and "OCPCalculator" in printed and "inference_only=True" in printed
    assert convert_main([str(source), "-o", str(tmp_path / "raw.ckpt"), "--no-ema"]) == 0
    assert "not kept (--no-ema): the raw weights" in capsys.readouterr().out


def test_settings_come_from_the_checkpoint_unless_explicit(converted):
    layout, _, path = converted
    expected_elements = 90 if layout == "escn" else 100
    model, normalizer, notes = init_from_settings(path, {**TINY_CONFIG, "compile": False},
                                                  {"energy_scale": 1000.0, "element_references": True,
                                                   "energy_mean": None, "energy_std": None, "force_std": None})
    assert model["max_num_elements"] == expected_elements and model["basis_width_scalar"] == 1.0
    assert normalizer["energy_scale"] == 1.0 and normalizer["element_references"] is False
    assert normalizer["energy_mean"] == pytest.approx(ENERGY_MEAN) and normalizer["force_std"] == pytest.approx(FORCE_STD)
    assert normalizer["energy_std"] == pytest.approx(ENERGY_STD)
    assert any("model.basis_width_scalar=1.0 from the checkpoint" in n for n in notes)
    assert any("normalizer.energy_scale=1.0 from the checkpoint (the configuration had 1000.0)" in n for n in notes)
    # explicit settings stay as given
    model, normalizer, _ = init_from_settings(path, {**TINY_CONFIG, "max_neighbors": 12}, {"force_std": 2.5},
                                              ["model.max_neighbors", "normalizer.force_std"])
    assert model["max_neighbors"] == 12 and normalizer["force_std"] == 2.5
    with pytest.raises(CheckpointMismatchError, match=r"normalizer.energy_scale=1000.0 was set explicitly.*1.0"):
        init_from_settings(path, TINY_CONFIG, {"energy_scale": 1000.0}, ["normalizer.energy_scale"])
    with pytest.raises(CheckpointMismatchError, match=r"normalizer.energy_mean=null asks to fit it"):
        init_from_settings(path, TINY_CONFIG, {"energy_mean": None}, ["normalizer.energy_mean"])


@pytest.mark.slow
def test_readme_recipe_fine_tunes_and_explicit_conflicts_get_one_line(converted, tmp_path):
    layout, source, path = converted
    run_dir = tmp_path / "tuned"
    proc = run_train([*DEMO, "model=escn_tiny", f"init_from={path}", "test_after_fit=false", f"data.stats_cache_dir={tmp_path}",
                      f"hydra.run.dir={run_dir}"], tmp_path)
    assert "from the checkpoint" in proc.stdout
    tuned = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    expected_elements = 90 if layout == "escn" else 100
    assert tuned["hyper_parameters"]["model"]["max_num_elements"] == expected_elements
    assert tuned["hyper_parameters"]["model"]["basis_width_scalar"] == 1.0
    assert tuned["normalizers"]["energy_scale"] == 1.0
    assert tuned["normalizers"]["energy_mean"] == pytest.approx(ENERGY_MEAN)
    assert tuned["normalizers"]["energy_std"] == pytest.approx(ENERGY_STD)
    assert tuned["normalizers"]["force_std"] == pytest.approx(FORCE_STD)
    assert tuned["global_step"] == 2

    if layout == "escn":  # an explicit override the weights still fit is honoured; the raw fairchem file works too
        run_train([*DEMO, f"init_from={source}", "model.max_neighbors=12", "test_after_fit=false",
                  f"data.stats_cache_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'fc'}"], tmp_path)
        tuned = torch.load(tmp_path / "fc" / "checkpoints" / "last.ckpt", weights_only=True)
        assert tuned["hyper_parameters"]["model"]["max_neighbors"] == 12

    conflicts = [("normalizer.energy_scale=1000", "normalizer.energy_scale=1000.0 was set explicitly")]
    if layout == "escn":
        conflicts.append(("model.max_num_elements=100", "model.max_num_elements=100 (checkpoint: 90) set explicitly "
                                                        "does not fit the checkpoint's weights"))
    for override, message in conflicts:
        bad = run_train([*DEMO, f"init_from={path}", override, f"hydra.run.dir={tmp_path / 'bad'}"], tmp_path,
                        check=False)
        assert bad.returncode != 0
        errors = [line for line in bad.stderr.splitlines() if line.strip()]
        assert "Traceback" not in bad.stderr and len(errors) == 1, bad.stderr
        assert errors[0].startswith(f"invalid configuration: init_from={path}: ") and message in errors[0]
