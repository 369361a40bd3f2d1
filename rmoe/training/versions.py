"""Run folders that two ``rmoe fit`` started at once cannot share.

Lightning's loggers pick ``version_<n>`` by listing the folder, so two runs started together can both take
``version_0``. :func:`claim_log_versions` reserves it with ``mkdir``, which is atomic: one process creates it,
the other moves on to ``version_<n+1>``.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.rank_zero import rank_zero_only

from rmoe.errors import RmoeError

_VERSION = re.compile(r"version_(\d+)$")


def claim_version(root: str | os.PathLike[str]) -> int:
    """Create ``root/version_<n>`` for the smallest free ``n`` above every existing one; returns ``n``."""
    from rmoe.checkpoints import describe_os_error

    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        taken = [int(m[1]) for p in root.iterdir() if (m := _VERSION.match(p.name)) and p.is_dir()]
        n = max(taken, default=-1) + 1
        while True:
            try:
                (root / f"version_{n}").mkdir()
                return n
            except FileExistsError:
                n += 1
    except OSError as err:
        raise RmoeError(
            f"trainer.logger.init_args.save_dir: {describe_os_error(err, root, 'create the run folder in')}"
        ) from None


def claim_log_versions(loggers: Iterable[Any]) -> list[Path]:
    """Give each TensorBoard/CSV logger without a fixed version a folder of its own; returns the folders claimed
    (so a run that fails before it trains can give them back). A logger with a fixed version is checked for write
    access. Only global rank 0 claims: the other ranks receive its paths by broadcast (``trainer.log_dir``)."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from rmoe.checkpoints import disk_nearly_full, ensure_writable_dir

    claimed_dirs: list[Path] = []
    if rank_zero_only.rank != 0:
        return claimed_dirs
    for logger in loggers:
        if not isinstance(logger, (TensorBoardLogger, CSVLogger)):
            continue
        claimed = logger._version is None
        if claimed:
            logger._version = claim_version(logger.root_dir)
            claimed_dirs.append(Path(logger.log_dir))
        else:
            ensure_writable_dir(logger.log_dir, "trainer.logger.init_args.save_dir")
        if disk_nearly_full(logger.log_dir):  # the event file's writer thread would fail with a traceback
            if claimed:  # give the empty folder back: no run folder for a run that never started
                with contextlib.suppress(OSError):
                    os.rmdir(logger.log_dir)
            raise RmoeError(
                f"trainer.logger.init_args.save_dir: the disk of {logger.log_dir} is full (less than 1 MiB free); "
                "free space there or choose another folder."
            )
    return claimed_dirs
