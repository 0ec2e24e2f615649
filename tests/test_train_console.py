"""`train.py`'s console: Lightning messages once, no promotional tips, and
`trainer.enable_progress_bar=false` accepted (the default callbacks include a progress bar)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from test_train_cli import run_train, tiny_overrides

from escn_train.training.lightning_logging import configure_lightning_logging


def test_lightning_records_reach_the_root_handlers_once(monkeypatch):
    import lightning.pytorch  # noqa: F401  (attaches Lightning's own console handler)

    root = logging.getLogger()
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    collector = Collect()
    root.addHandler(collector)
    lightning_logger = logging.getLogger("lightning")
    saved = (list(lightning_logger.handlers), lightning_logger.propagate)
    try:
        configure_lightning_logging()
        configure_lightning_logging()  # idempotent
        assert not [h for h in lightning_logger.handlers if type(h) is logging.StreamHandler]
        from lightning.pytorch.utilities.rank_zero import rank_zero_info

        rank_zero_info("GPU available: False, used: False")
        rank_zero_info("💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels](...)")
        messages = [r.getMessage() for r in records if r.name.startswith("lightning")]
        assert messages == ["GPU available: False, used: False"]
    finally:
        root.removeHandler(collector)
        lightning_logger.handlers[:] = saved[0]
        lightning_logger.propagate = saved[1]


@pytest.mark.slow
def test_train_without_progress_bar_prints_each_message_once(tmp_path: Path):
    run_dir = tmp_path / "quiet"
    proc = run_train(
        [*tiny_overrides(tmp_path / "stats"), "trainer.enable_progress_bar=false", "trainer.limit_val_batches=1",
         "trainer.limit_test_batches=1", f"hydra.run.dir={run_dir}"],
        tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert (run_dir / "metrics.json").is_file()
    assert "it/s" not in out and "Epoch 0:" not in out  # no progress bar
    lines = [line for line in out.splitlines() if "GPU available" in line]
    assert len(lines) == 1, lines
    assert "Tip:" not in out
    assert "`Trainer.fit` stopped" in out and out.count("`Trainer.fit` stopped") == 1
