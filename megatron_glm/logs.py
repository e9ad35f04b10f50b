"""The commands' logging: stdlib ``logging`` under the ``megatron_glm`` logger, one line per record.

Library code only logs. A command (``glm-pretrain``) calls ``setup`` once it knows its rank:
records go to stdout with a timestamp, the level and the rank; ranks other than 0 show warnings
and errors only, unless ``--log-all-ranks``. Used as a library without ``setup``, records go to
whatever handlers the application gave the root logger.
"""

from __future__ import annotations

import logging
import sys

NAME = "megatron_glm"
_HANDLER_MARK = "_megatron_glm_handler"


def setup(rank: int = 0, all_ranks: bool = False, level: int = logging.INFO) -> logging.Logger:
    """Configure the ``megatron_glm`` logger for a command; calling it again replaces the handler."""
    logger = logging.getLogger(NAME)
    for handler in [h for h in logger.handlers if getattr(h, _HANDLER_MARK, False)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    setattr(handler, _HANDLER_MARK, True)
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s rank {rank} %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S"
        )
    )
    logger.addHandler(handler)
    logger.setLevel(level if rank == 0 or all_ranks else max(level, logging.WARNING))
    logger.propagate = False
    return logger


def get(name: str) -> logging.Logger:
    """The logger of a module (``megatron_glm.<part>``)."""
    return logging.getLogger(name if name.startswith(NAME) else f"{NAME}.{name}")
