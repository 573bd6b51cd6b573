"""Moving stored states between the compute device and CPU memory without stalling the compute stream.

On CUDA, :class:`StateMover` enqueues every copy on its own side stream, ordered after the work already enqueued
on the caller's stream (``side.wait_stream(current)``: a GPU-side dependency, not a host wait), into pinned host
memory so the copy engine runs it asynchronously. The caller gets a :class:`PendingPayload` at once: its tensors
are the destinations, valid once the copy's event has fired.

- ``offload`` (device -> pinned CPU) after a checkpoint or an edge is taken: the forward goes on while the copy
  runs; the source tensors are marked as used by the side stream (``record_stream``) so the caching allocator
  cannot hand their memory out before the copy has read it.
- ``prefetch`` (CPU -> device) as soon as a lookup knows which stored prefix it will restore; ``wait()`` then makes
  the caller's stream wait for the copy's event, so the restore that reads the prefetched tensors is ordered after
  the copy, still without the host waiting.

Nothing here synchronises the host, except :meth:`PendingPayload.synchronize` (for code that reads the values on
the CPU, e.g. persistence). On a machine without CUDA, or for CPU-to-CPU moves, the copies are plain synchronous
copies and every pending payload is ready on return.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from ..states import DeviceSpec, KVEdge, StateCheckpoint, map_payload

Payload = TypeVar("Payload", StateCheckpoint, KVEdge)


@dataclass
class PendingPayload(Generic[Payload]):
    """A payload whose tensors are being copied; ``event`` fires when the copy is complete (None: already done)."""

    payload: Payload
    event: "torch.cuda.Event | None" = None

    def is_ready(self) -> bool:
        """Whether the copy has completed (a non-blocking query)."""
        return self.event is None or self.event.query()

    def wait(self) -> Payload:
        """Order the caller's current CUDA stream after the copy (the host does not wait); return the payload.

        Use it before the payload's tensors are read by GPU work on that stream (e.g. a restore).
        """
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)
        return self.payload

    def synchronize(self) -> Payload:
        """Block the host until the copy is complete; return the payload (for reading the values on the CPU)."""
        if self.event is not None:
            self.event.synchronize()
        return self.payload


class StateMover:
    """Copies payloads to ``storage_device`` (offload) and back to a compute device (prefetch).

    Args:
        storage_device: where stored states live (default: CPU memory).
        pin_memory: allocate CPU destinations in pinned memory, which asynchronous copies need; default: whenever
            CUDA is available.
    """

    def __init__(self, storage_device: DeviceSpec = "cpu", pin_memory: bool | None = None) -> None:
        self.storage_device = torch.device(storage_device if storage_device is not None else "cpu")
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        if self.pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory=True needs CUDA (pinned memory is page-locked for the GPU's copy engine)")
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def offload(self, payload: Payload) -> PendingPayload[Payload]:
        """Start copying ``payload`` to the storage device; the source tensors may be dropped by the caller."""
        return self._move(payload, self.storage_device)

    def prefetch(self, payload: Payload, device: DeviceSpec) -> PendingPayload[Payload]:
        """Start copying a stored ``payload`` to ``device``; call ``wait()`` before GPU work reads the result."""
        return self._move(payload, torch.device(device))

    # ---------------------------------------------------------------- internal
    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    def _move(self, payload: Payload, target: torch.device) -> PendingPayload[Payload]:
        cuda = _cuda_device_of(payload, target)
        if cuda is None:
            return PendingPayload(map_payload(payload, lambda t: t.detach().to(target, copy=True)))
        current = torch.cuda.current_stream(cuda)
        side = self._side_stream(cuda)
        # The copy must read the states only after the work that produced them, and may write a destination
        # block only after the caller's stream is done with whatever last used it: order the side stream after
        # everything enqueued so far (GPU-side).
        side.wait_stream(current)

        def copy(tensor: torch.Tensor) -> torch.Tensor:
            pin = self.pin_memory and target.type == "cpu"
            destination = torch.empty(tensor.shape, dtype=tensor.dtype, device=target, pin_memory=pin)
            with torch.cuda.stream(side):
                destination.copy_(tensor.detach(), non_blocking=True)
            for end in (tensor, destination):
                if end.is_cuda:
                    end.record_stream(side)  # the allocator must not reuse it before the side stream is done
            return destination

        moved = map_payload(payload, copy)
        event = torch.cuda.Event()
        event.record(side)
        return PendingPayload(moved, event)


def _tensors(payload: StateCheckpoint | KVEdge) -> list[torch.Tensor]:
    if isinstance(payload, KVEdge):
        return [tensor for pair in payload.kv.values() for tensor in pair]
    return list(payload.tensors().values())


def _cuda_device_of(payload: StateCheckpoint | KVEdge, target: torch.device) -> torch.device | None:
    """The CUDA device a move of ``payload`` to ``target`` involves, or None for a move between CPU tensors."""
    if target.type == "cuda":
        return target if target.index is not None else torch.device("cuda", torch.cuda.current_device())
    return next((tensor.device for tensor in _tensors(payload) if tensor.is_cuda), None)
