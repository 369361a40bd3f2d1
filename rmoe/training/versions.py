"""Run folders that two ``rmoe fit`` started at once cannot share.

Lightning's TensorBoard and CSV loggers pick ``version_<n>`` by listing the folder: two processes
started together with the same ``save_dir`` and ``name`` both see ``version_0`` free and write into
it (one's ``config.yaml`` beside the other's ``last.ckpt``). :func:`claim_log_versions` reserves the
folder instead, with ``mkdir``, which the file system performs atomically: exactly one process
creates ``version_<n>``, the other moves on to ``version_<n+1>``.
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
    """Create ``root/version_<n>`` for the smallest free ``n`` above every existing one; returns ``n``.

    Raises:
        RmoeError: ``root`` cannot be created or written (naming it and why).
    """
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
    """Give each TensorBoard/CSV logger without a fixed version a folder of its own (:func:`claim_version`).

    Only global rank 0 claims: it is the process that writes the run folder, and the other ranks
    receive its paths by broadcast (``trainer.log_dir``, ``ModelCheckpoint``'s folder).
    A logger with a fixed version (``rmoe sweep``, a resumed run) writes where it says; its folder
    is checked for write access. Returns the folders this process claimed (new, so a run that
    fails before it trains can give them back).
    """
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
