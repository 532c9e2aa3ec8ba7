"""The runtime's reads and writes of NVMe files: :class:`NvmeIO`.

Every file the runtime reads or writes during a step goes through here: a host tensor is read
or written directly (the host thread marks it touched, for the deferred copier's checks); a
device tensor goes through a host staging buffer, the file I/O and the copy chained on worker
threads and copy streams (:mod:`swap.staging`), so nothing here blocks the host thread. Each
write is kept until the step waits for it: a step succeeds only once what it wrote is on disk.
"""

from __future__ import annotations

import torch

from swap.engine import SwapEngine
from swap.handle import Handle
from swap.nvme import NvmeStore
from swap.staging import read_staged, write_staged
from swap.tier import Tier


class NvmeIO:
    """Reads and writes of the NVMe store, counted on their links, and the step's writes.

    Args:
        store: the NVMe store (None: no ``nvme_dir``; any read or write is then a bug).
        engine: counts bytes and marks host tensors touched. host: lends staging buffers.

    Example::

        io = NvmeIO(store, engine, host)
        io.write("pack1.W.0", flat, "host->nvme", "W")
        io.wait_writes()   # at the step's end: a failed write raises here
    """

    def __init__(self, store: NvmeStore | None, engine: SwapEngine, host: Tier) -> None:
        self.store, self._engine, self._host = store, engine, host
        self._writes: list[tuple[Handle, str]] = []  # writes behind this step, and their link

    def read(self, key: str, dst: torch.Tensor, name: str, kind: str) -> Handle:
        """Start reading file ``key`` into ``dst``; a GPU ``dst`` goes through host staging,
        the copy to the device starting when the read ends: nothing here blocks the host."""
        assert self.store is not None
        if dst.device.type == "cpu":
            self._engine.count(name, kind, dst.numel() * dst.element_size())
            self._engine.host_write(dst, f"the file {key} read into it")
            return self.store.read(key, dst)
        return read_staged(self.store, self._engine, self._host, key, dst, kind)

    def write(self, key: str, src: torch.Tensor, name: str, kind: str) -> Handle:
        """Start writing ``src`` to file ``key`` (a GPU ``src`` through host staging); the
        step waits for it in :meth:`wait_writes`."""
        assert self.store is not None
        if src.device.type == "cpu":
            self._engine.count(name, kind, src.numel() * src.element_size())
            self._engine.host_read(src, f"the file {key} written from it")
            handle = self.store.write(key, src.contiguous())
        else:
            handle = write_staged(self.store, self._engine, self._host, key, src, kind)
        self._writes.append((handle, name))
        return handle

    def delete(self, key: str) -> None:
        """Delete file ``key`` once its write is done (no file: nothing to do, as after a
        write that failed)."""
        if self.store is not None and key in self.store:
            self.store.delete(key)

    def wait_writes(self) -> None:
        """Wait for every write of the step (raising the first failure)."""
        for handle, name in self._writes:
            self._engine.synchronize(handle, name)
        self._writes.clear()

    def forget_writes(self) -> None:
        """After a failed step: the writes are the store's to finish or fail."""
        self._writes.clear()
