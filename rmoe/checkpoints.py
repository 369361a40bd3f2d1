"""Reading and writing checkpoints safely: one place that says what is wrong with a model file.

Every command that reads a model goes through :func:`read_checkpoint` or :func:`verify_weights_files`, so a
truncated file, a bit flip, a text file, another program's checkpoint or a damaged ``model.safetensors``
ends in one paragraph naming the file and the fault, never in a traceback or a silently damaged model.
torch's zip reader does not verify the archive's CRCs (a flipped bit loads as a wrong weight):
:func:`verify_archive` does, with :mod:`zipfile`. safetensors files have no checksum: ``rmoe export``
records each one's SHA-256 in ``config.json``.

Writing: :class:`AtomicCheckpointIO`, the trainer's checkpoint writer, writes to a temporary name and
renames it over the final one, so a kill or a full disk never leaves a truncated checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from rmoe.errors import RmoeError

ZIP_MAGIC = b"PK\x03\x04"
"""The first bytes of every file ``torch.save`` writes (a zip archive since torch 1.6)."""

EXPECTED = "a checkpoint written by `rmoe fit` or `rmoe import` (<run>/checkpoints/*.ckpt)"


def _describe_content(head: bytes) -> str:
    """What a file that is not a zip archive looks like, from its first bytes."""
    if not head:
        return "it is empty (0 bytes)"
    if head.startswith(b"\x80") and len(head) > 1 and head[1] <= 5:
        return "it is a bare pickle, not a torch zip archive (written by pickle or by torch < 1.6?)"
    if head.startswith((b"{", b"[")):
        return "it looks like a JSON file, not a torch zip archive"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"it is not a torch zip archive (it starts with the bytes {head[:8]!r})"
    first = " ".join(text.split())[:40]
    return f"it is a text file, not a torch zip archive (it starts with {first!r})"


def verify_archive(path: str | os.PathLike[str], option: str) -> Path:
    """Check that ``path`` is a complete, undamaged torch zip archive; returns it as a Path.

    ``option`` is how the user named it (``--ckpt``, ``model.init_from``), for the message.

    Raises:
        RmoeError: No such file, a directory, not a zip archive (empty, text, pickle, other binary),
            truncated, or an entry whose CRC does not match.
    """
    path = Path(path).expanduser()
    where = f"{option} {path}"
    if path.is_dir():
        raise RmoeError(f"{where} is a directory; expected {EXPECTED}.")
    if not path.is_file():
        raise RmoeError(f"{where}: no such file; expected {EXPECTED}.")
    try:
        with open(path, "rb") as file:
            head = file.read(64)
    except OSError as err:
        raise RmoeError(f"{where} cannot be read: {err.strerror or err}.") from None
    if not head.startswith(ZIP_MAGIC):
        raise RmoeError(f"{where} is not a checkpoint: {_describe_content(head)}; expected {EXPECTED}.")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # reads every entry and checks its CRC-32
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        raise RmoeError(
            f"{where} is truncated or damaged ({' '.join(str(err).split())}): an interrupted copy or save? "
            "Use another checkpoint of the run (last.ckpt, best-*.ckpt)."
        ) from None
    if damaged is not None:
        raise RmoeError(
            f"{where} is corrupted: the CRC of its entry {damaged!r} does not match its content (the file changed "
            "after it was written: a disk or copy error). Use another checkpoint of the run."
        )
    return path


def read_checkpoint(
    path: str | os.PathLike[str], option: str = "--ckpt", *, weights_only: bool = True, mmap: bool = True
) -> dict[str, Any]:
    """Load a checkpoint of rmoe's ``MoeLMModule`` after :func:`verify_archive`.

    Raises:
        RmoeError: What :func:`verify_archive` refuses; a file torch cannot load; not a Lightning checkpoint
            (no ``state_dict``); a Lightning checkpoint of another module (no ``hyper_parameters.arch``).
    """
    path = verify_archive(path, option)
    where = f"{option} {path}"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except Exception as err:  # a pickle with code in it, a damaged record that passed the CRC check...
        raise RmoeError(
            f"{where} is not a readable checkpoint ({type(err).__name__}: {' '.join(str(err).split())[:300]}); "
            f"expected {EXPECTED}."
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        keys = sorted(map(str, checkpoint))[:6] if isinstance(checkpoint, dict) else [type(checkpoint).__name__]
        raise RmoeError(
            f"{where} is a torch file but not a Lightning checkpoint (it holds {', '.join(keys) or 'nothing'}, "
            f"no state_dict): a checkpoint of another program? Expected {EXPECTED}."
        )
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, dict) or not isinstance(hparams.get("arch"), dict):
        raise RmoeError(
            f"{where} is a Lightning checkpoint of another module, not of rmoe's MoeLMModule (it has no "
            f"hyper_parameters.arch); expected {EXPECTED}."
        )
    return checkpoint


def sha256_of(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """The hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weights_digests(folder: str | os.PathLike[str]) -> dict[str, str]:
    """``{file name: SHA-256}`` of the ``*.safetensors`` files of an export folder."""
    return {p.name: sha256_of(p) for p in sorted(Path(folder).glob("*.safetensors"))}


def verify_weights_files(folder: str | os.PathLike[str], recorded: dict[str, str] | None, option: str) -> None:
    """Check the safetensors files of an export folder: present, readable, and matching the ``recorded``
    SHA-256 digests if any; RmoeError otherwise."""
    from safetensors import safe_open

    folder = Path(folder)
    for name, digest in (recorded or {}).items():
        file = folder / name
        if not file.is_file():
            raise RmoeError(f"{option} {folder}: the weights file {name} that rmoe export wrote is missing.")
        if sha256_of(file) != digest:
            raise RmoeError(
                f"{option} {folder}: {name} is corrupted: its SHA-256 differs from the one rmoe export recorded in "
                "config.json (the file changed after it was written). Export the checkpoint again."
            )
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise RmoeError(f"{option} {folder}: no *.safetensors weights file in it.")
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as err:
            raise RmoeError(
                f"{option} {file} is not a readable safetensors file ({' '.join(str(err).split())[:200]}): "
                "truncated or damaged?"
            ) from None


WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR})
"""The errors of a write to a full, read-only or unwritable place."""


def describe_os_error(err: OSError, path: str | os.PathLike[str], doing: str) -> str:
    """One paragraph for an OSError while ``doing`` something with ``path`` (disk full, no permission...)."""
    reason = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        advice = "free space there or choose another folder"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = "choose a folder you can write to"
    else:
        advice = "check the path"
    return f"cannot {doing} {path}: {reason} ({advice})."


def ensure_writable_dir(path: str | os.PathLike[str], option: str) -> Path:
    """Create ``path`` (and its parents) if needed and check that files can be created in it (else RmoeError)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise RmoeError(f"{option} {path} is an existing file; expected a directory (new or empty).")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".rmoe-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RmoeError(f"{option}: {describe_os_error(err, path, 'write to')}") from None
    return path


def check_can_create(path: str | os.PathLike[str], option: str) -> Path:
    """Check, without creating anything, that the folder ``path`` can be created or written: it is not a
    file and its nearest existing ancestor is a writable folder (else RmoeError saying why)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise RmoeError(f"{option} {path} is an existing file; expected a directory (new or empty).")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RmoeError(f"{option} {path}: {existing} is a file, so the folder cannot be created.")
    if not os.access(existing, os.W_OK | os.X_OK) or _read_only_mount(existing):
        reason = "a read-only file system" if _read_only_mount(existing) else "no write permission"
        raise RmoeError(f"{option} {path}: cannot write to {existing} ({reason}); choose a folder you can write to.")
    return path


def _read_only_mount(path: Path) -> bool:
    """Whether ``path`` is on a read-only mount (``os.access`` says yes to root even there)."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def nonfinite_entries(state_dict: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``state_dict`` that hold a NaN or an inf."""
    return [
        name
        for name, value in state_dict.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]


def disk_nearly_full(path: str | os.PathLike[str], margin: int = 1 << 20) -> bool:
    """Whether the file system of ``path`` has less than ``margin`` bytes left for this user."""
    try:
        stat = os.statvfs(path)
    except (OSError, AttributeError):
        return False
    return stat.f_bavail * stat.f_frsize < margin


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint writer, made atomic: ``path.tmp-<pid>`` is written, fsynced, then renamed
    over ``path``, so a failure while writing leaves the previous file as it was. An :class:`OSError`
    becomes an :class:`RmoeError` naming the checkpoint and the cause.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO does not take storage_options (got {storage_options!r}).")
        final = Path(path)
        bad = nonfinite_entries(checkpoint.get("state_dict") or {})
        if bad:  # the last line of defence behind the divergence check of MoeLMModule
            raise RmoeError(
                f"refusing to write {final}: the weights {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''} hold "
                "NaN or inf values (training diverged); the run's earlier checkpoints are left as they are."
            )
        temporary = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            with open(temporary, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, final)
        except BaseException as err:
            # torch's zip writer reports a full disk as a RuntimeError ("unexpected pos"): ask the file system
            full = disk_nearly_full(final.parent)
            with contextlib.suppress(OSError):
                temporary.unlink()
            if isinstance(err, OSError):
                raise RmoeError(describe_os_error(err, final, "write the checkpoint")) from None
            if full and isinstance(err, RuntimeError):
                raise RmoeError(
                    f"cannot write the checkpoint {final}: the disk is full (free space there or choose another "
                    "trainer.logger.init_args.save_dir); the run's earlier checkpoints are left as they were."
                ) from None
            raise
