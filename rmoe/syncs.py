"""Host synchronisations: moving device values to the host in one transfer, and counting the rest.

The host waits for the GPU when it needs a value: a Python number (``.item()``, ``.tolist()``, ``bool()``), an
output shape that depends on the data (``nonzero``, boolean indexing, ``unique``, ``bincount``, ``masked_select``,
``repeat_interleave`` without ``output_size``), a copy to the host (``.cpu()``, ``.numpy()``), or host data copied
to the device (``torch.tensor(x, device="cuda")``). On CPU these cost nothing, so they are counted, not timed.

* :func:`to_host` moves device tensors to the host in ONE transfer; the training loop reads device values only so.
* :class:`HostSyncCounter` counts every synchronisation of a stretch of code, on any device, with its source line.

On CPU the counter plays the device's part. Tensors that existed before it started (parameters, the batch) and
everything computed from them are "device" tensors. Tensors made on the default device (``torch.zeros`` ... without
a ``device``, or with ``"cpu"``), by :func:`to_host` or ``.cpu()``, and everything computed from those alone are
"host" tensors, free to read. A host tensor's ``.device`` is a marked ``cpu`` device while the counter runs, so
``torch.zeros(..., device=host_tensor.device)`` is a host tensor too; any other device object is the device's.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten


def to_host(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors on the host (same shapes and dtypes, contiguous): their bytes packed into one device buffer,
    copied once and split on the host. Host tensors are returned as they are."""
    tensors = [t.detach() for t in tensors]
    on_device = [i for i, t in enumerate(tensors) if t.device.type != "cpu" or _device_to_counters(t)]
    out = [t.contiguous() for t in tensors]
    if on_device:
        parts, offsets, offset = [], [], 0
        for i in on_device:
            part = out[i].reshape(-1).view(torch.uint8)
            pad = -part.numel() % 16  # every tensor starts 16-byte aligned in the buffer
            parts += [part, part.new_zeros(pad)] if pad else [part]
            offsets.append(offset)
            offset += part.numel() + pad
        packed = torch.cat(parts).cpu()  # the one transfer
        for i, start in zip(on_device, offsets, strict=True):
            size = tensors[i].numel() * tensors[i].element_size()
            out[i] = packed[start : start + size].view(tensors[i].dtype).view(tensors[i].shape)
    return [_host(t) for t in out]


def _device_to_counters(tensor: torch.Tensor) -> bool:
    """Whether an active :class:`HostSyncCounter` takes this CPU tensor for a device tensor."""
    return any(not counter.is_host(tensor) for counter in _ACTIVE)


def all_reduce_(tensors: Sequence[torch.Tensor], op: Any = None) -> None:
    """All-reduce host or device tensors in place across processes (SUM unless ``op``); a no-op on one process.
    NCCL reduces CUDA tensors only: host tensors go through the current CUDA device there."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    op = dist.ReduceOp.SUM if op is None else op
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    for tensor in tensors:
        if device is None or tensor.device == device:
            dist.all_reduce(tensor, op=op)
        else:
            on_device = tensor.to(device)
            dist.all_reduce(on_device, op=op)
            tensor.copy_(on_device.cpu())


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Average a device tensor over every process, in place, and return it. Not Lightning's ``strategy.reduce``:
    its barrier makes the host wait for the GPU under NCCL."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a device tensor over every process, in place, and return it (see :func:`all_reduce_mean_`)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class HostCopy:
    """A copy of a device tensor to the host that does not wait for the device: read it a step later.

    On CUDA: a non-blocking copy into pinned memory and an event that :meth:`tolist` waits for, long done a step
    later (in the same step, use :func:`to_host`, which is counted). On CPU: a plain copy."""

    def __init__(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        self._event: Any = None
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(tensor.device))
        else:
            self._host = _host(tensor.clone())

    def tolist(self) -> Any:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


def _host(tensor: torch.Tensor) -> torch.Tensor:
    """Declare a CPU tensor a host tensor to an active :class:`HostSyncCounter` (no-op otherwise)."""
    for counter in _ACTIVE:
        counter.mark_host(tensor)
    return tensor


# Operators that read a value on the host, or whose output size depends on the values.
_SYNC_OPS = {
    aten._local_scalar_dense.default: "a value read on the host",  # .item(), bool(), float(), int()
    aten.is_nonzero.default: "a value read on the host",
    aten.equal.default: "a value read on the host",
    aten.nonzero.default: "an output shape that depends on the data",
    aten.argwhere.default: "an output shape that depends on the data",
    aten.masked_select.default: "an output shape that depends on the data",
    aten._unique2.default: "an output shape that depends on the data",
    aten.unique_dim.default: "an output shape that depends on the data",
    aten.unique_consecutive.default: "an output shape that depends on the data",
    aten.bincount.default: "an output shape that depends on the data",
}
_ACTIVE: list[HostSyncCounter] = []
# Factories that make a tensor on the default device (the host) unless given a device.
_CREATORS = ("tensor", "as_tensor", "arange", "zeros", "ones", "empty", "full", "rand", "randn", "randint", "randperm",
             "linspace", "eye", "from_numpy")  # fmt: skip
_HOST_DEVICE = torch.device("cpu")  # what a host tensor's .device returns while a counter is active
_REAL_DEVICE = torch._C.TensorBase.device.__get__


@dataclass(frozen=True)
class SyncEvent:
    """One host synchronisation: ``kind`` (operator or method), ``reason``, and ``where`` (``folder/file.py:line in
    function`` of the innermost caller outside torch and this module)."""

    kind: str
    reason: str
    where: str


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        name = frame.filename.replace("\\", "/")
        if "/torch/" not in name and not name.endswith("rmoe/syncs.py"):
            return f"{'/'.join(name.split('/')[-2:])}:{frame.lineno} in {frame.name}"
    return "?"


class HostSyncCounter(TorchDispatchMode):
    """``with HostSyncCounter() as syncs: ...`` records every host synchronisation in ``syncs.events``.

    A host tensor made while no counter is active looks like a device tensor to a later one: to count stretches of
    a long run, keep one counter active from the start and switch ``recording`` on for the stretches."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[SyncEvent] = []
        self._host: dict[int, weakref.ref] = {}  # id -> tensor (tensors compare by value: no WeakSet)
        self._originals: dict[tuple[Any, str], Any] = {}
        self.recording = True  # False: follow host and device tensors without recording (between windows)

    # -- host or device

    def mark_host(self, tensor: torch.Tensor) -> None:
        key = id(tensor)
        self._host[key] = weakref.ref(tensor, lambda _, key=key: self._host.pop(key, None))

    def unmark_host(self, tensor: torch.Tensor) -> None:
        self._host.pop(id(tensor), None)

    def is_host(self, tensor: torch.Tensor) -> bool:
        ref = self._host.get(id(tensor))
        return (ref is not None and ref() is tensor) or _REAL_DEVICE(tensor).type == "meta"

    def _record(self, kind: str, reason: str) -> None:
        if self.recording:
            self.events.append(SyncEvent(kind, reason, _caller()))

    # -- operators

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_host = bool(inputs) and all(self.is_host(t) for t in inputs)
        if func is aten.lift_fresh.default:  # torch.tensor(data): the wrapper below decides
            on_host = True
        elif not on_host:
            reason = _SYNC_OPS.get(func)
            if func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
                reason = "an output shape that depends on the data"  # x[mask] runs nonzero() inside
            if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
                reason = "an output shape that depends on the data"
            if reason is not None:
                self._record(str(func.overloadpacket.__name__), reason)
        out = func(*args, **kwargs)
        if on_host:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.mark_host(t)
        return out

    # -- what does not reach an operator on CPU

    def _patch(self, owner: Any, name: str, wrapper: Any) -> None:
        self._originals[(owner, name)] = getattr(owner, name)
        setattr(owner, name, wrapper)

    def _host_device(self, device: Any) -> bool:
        """Whether a ``device`` argument means the host: None, a ``"cpu"`` string, or a host tensor's ``.device``."""
        return device is None or device is _HOST_DEVICE or (isinstance(device, str) and device.startswith("cpu"))

    def __enter__(self) -> HostSyncCounter:
        counter = self
        originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "cpu", "to")}

        def read(name: str) -> Any:
            def method(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                if not counter.is_host(tensor):
                    counter._record(f"Tensor.{name}", "a copy to the host")
                return originals[name](tensor, *args, **kwargs)

            return method

        def to_host_copy(tensor: torch.Tensor, out: torch.Tensor, kind: str, wait: bool) -> torch.Tensor:
            if counter.is_host(tensor):
                return out
            if wait:
                counter._record(kind, "a copy to the host")
            out = out.clone() if out is tensor else out  # a new tensor: the host copy
            counter.mark_host(out)
            return out

        def cpu(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return to_host_copy(tensor, originals["cpu"](tensor, *args, **kwargs), "Tensor.cpu", wait=True)

        def to(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            out = originals["to"](tensor, *args, **kwargs)
            device = kwargs.get("device", next((a for a in args if isinstance(a, (str, torch.device))), None))
            if device is None:
                return out
            if counter._host_device(device):
                return to_host_copy(tensor, out, "Tensor.to", wait=not kwargs.get("non_blocking", False))
            if counter.is_host(tensor):  # host data moved to the device (asynchronously from pinned memory)
                out = out.clone() if out is tensor else out
                counter.unmark_host(out)
            return out

        def device_of(tensor: torch.Tensor) -> torch.device:
            return _HOST_DEVICE if counter.is_host(tensor) else _REAL_DEVICE(tensor)

        def creator(name: str) -> Any:
            original = getattr(torch, name)

            def make(*args: Any, **kwargs: Any) -> torch.Tensor:
                out = original(*args, **kwargs)
                if not isinstance(out, torch.Tensor) or kwargs.get("out") is not None:
                    return out
                if counter._host_device(kwargs.get("device")):
                    counter.mark_host(out)
                else:
                    counter.unmark_host(out)
                    if name in ("tensor", "as_tensor") and not isinstance(args[0] if args else None, torch.Tensor):
                        counter._record(f"torch.{name}", "host data copied to the device")
                return out

            return make

        for name in ("tolist", "numpy"):
            self._patch(torch.Tensor, name, read(name))
        self._patch(torch.Tensor, "cpu", cpu)
        self._patch(torch.Tensor, "to", to)
        self._device_property = torch.Tensor.__dict__.get("device")  # an enclosing counter's
        torch.Tensor.device = property(device_of)  # shadows TensorBase.device until __exit__
        for name in _CREATORS:
            self._patch(torch, name, creator(name))
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for (owner, name), original in self._originals.items():
            setattr(owner, name, original)
        self._originals.clear()
        if self._device_property is None:
            del torch.Tensor.device
        else:
            torch.Tensor.device = self._device_property
        _ACTIVE.remove(self)
        return super().__exit__(*exc)

    # -- results

    def summary(self) -> Counter[str]:
        """Events counted by ``"kind at where"``."""
        return Counter(f"{e.kind} at {e.where}" for e in self.events)

    def report(self, title: str) -> str:
        """One line per place, most frequent first."""
        lines = [f"{title}: {len(self.events)} host synchronisation(s)"]
        lines += [f"  {n:4d}  {place}" for place, n in self.summary().most_common()]
        return "\n".join(lines)


@contextlib.contextmanager
def count_host_syncs() -> Iterator[HostSyncCounter]:
    """``with count_host_syncs() as syncs:`` (a :class:`HostSyncCounter`)."""
    with HostSyncCounter() as counter:
        yield counter


def print_report(counter: HostSyncCounter, title: str) -> None:
    print(counter.report(title), file=sys.stderr)
