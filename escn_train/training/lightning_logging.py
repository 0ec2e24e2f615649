"""Lightning's console messages, printed once and without advertisements.

Lightning attaches its own console handler (``INFO: ...``) to the ``lightning`` logger and
lets its records propagate to the root logger as well. Under Hydra the root logger already
has a console and a file handler (``<run dir>/train.log``), so every message came out twice,
and Lightning adds promotional "💡 Tip: ..." lines about its cloud products.
:func:`configure_lightning_logging` leaves Lightning's records to the root handlers when there
are any and drops the tips.
"""

from __future__ import annotations

import logging

#: Loggers Lightning writes its user-facing messages through (``rank_zero_info`` & co.).
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")
RANK_ZERO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "pytorch_lightning.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
)


class DropPromotionalTips(logging.Filter):
    """Rejects Lightning's "💡 Tip: ... try installing ..." records."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


_TIPS_FILTER = DropPromotionalTips()


def configure_lightning_logging() -> None:
    """One line per Lightning message; no tips. Idempotent; safe without Hydra."""
    root_has_handlers = bool(logging.getLogger().handlers)
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if root_has_handlers:
            # the root handlers (Hydra's console and train.log) print the record; Lightning's
            # own console handler would print it a second time
            for handler in list(logger.handlers):
                if type(handler) is logging.StreamHandler:
                    logger.removeHandler(handler)
            logger.propagate = True
    for name in RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if _TIPS_FILTER not in logger.filters:
            logger.addFilter(_TIPS_FILTER)
