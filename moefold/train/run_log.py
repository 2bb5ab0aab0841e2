"""Logging for one run: every warning reaches the console (stderr) and OUT/train.log.

Configured by `run_training` for the length of a run and undone afterwards (the handlers go on
the "moefold" and "py.warnings" loggers, so library modules keep plain module loggers and
Python warnings from torch land in the same places). Rank 0 logs INFO and above; other ranks
log warnings and errors, tagged with their rank, to the console and to the same train.log.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

LOG_FILE = "train.log"
_LOGGERS = ("moefold", "py.warnings")


@contextlib.contextmanager
def run_logging(out_dir: Path, rank: int) -> Iterator[None]:
    level = logging.INFO if rank == 0 else logging.WARNING
    tag = "" if rank == 0 else f" [rank {rank}]"
    # Progress lines (INFO) go to stdout as they are; warnings and errors to stderr, marked.
    progress = logging.StreamHandler(sys.stdout)
    progress.addFilter(lambda record: record.levelno < logging.WARNING)
    problems = logging.StreamHandler(sys.stderr)
    problems.setLevel(logging.WARNING)
    problems.setFormatter(logging.Formatter(f"moefold{tag} %(levelname)s: %(message)s"))
    log_file = logging.FileHandler(out_dir / LOG_FILE, mode="a", encoding="utf-8")
    log_file.setFormatter(
        logging.Formatter(f"%(asctime)s{tag} %(levelname)s %(name)s: %(message)s")
    )
    handlers = (progress, problems, log_file)
    saved = []
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        saved.append(logger.level)
        logger.setLevel(level)
        for handler in handlers:
            handler.setLevel(max(handler.level, level))
            logger.addHandler(handler)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for name, old_level in zip(_LOGGERS, saved, strict=True):
            logger = logging.getLogger(name)
            for handler in handlers:
                logger.removeHandler(handler)
            logger.setLevel(old_level)
        log_file.close()
