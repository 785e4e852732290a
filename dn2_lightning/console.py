"""The library's console messages: one ``dn2_lightning`` logger, written by rank zero only.

Lightning's own notices go to the ``lightning.pytorch`` logger, so each can be quietened separately, e.g.
``logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)`` keeps DN2's bank size, threshold and
report paths while hiding "GPU available" and tips.
"""

from __future__ import annotations

import logging

from dn2_lightning.distributed import process_rank

logger = logging.getLogger("dn2_lightning")


def info(message: str) -> None:
    """Log ``message`` at INFO level once per job (on rank zero of the process group)."""
    if process_rank() == 0:
        logger.info(message)
