"""A CUDA device budget next to what PyTorch's caching allocator really reserves.

harmony's device tier accounts the bytes of the tensors a plan places on the GPU: weights,
gradients, optimizer state, activations, and each pack's working memory, which the profile
measures on CUDA with ``torch.cuda.max_memory_allocated`` (:mod:`harmony.planning.profile`). The
caching allocator those tensors come from *reserves* more than their bytes (with its default
settings):

* every block is rounded up to a multiple of 512 bytes (:func:`block_bytes`);
* blocks of at most 1 MiB are cut from 2 MiB segments, blocks under 10 MiB from 20 MiB
  segments, and larger ones get a segment of their own rounded up to 2 MiB
  (:func:`segment_bytes`);
* freed blocks stay reserved for reuse.

So a budget means what it says only if what the allocator reserves is measured and shown:
``trainer.stats.peak_bytes["device reserved"]`` is ``max_memory_reserved`` since the trainer
started counting (:class:`ReservedPeak`: after its first plan, with the profile's and the
bandwidth probe's blocks given back to the driver), next to ``peak_bytes["device"]``, the
accounted peak. :func:`reserved_allowance` bounds the difference the rounding and the
segments alone make.

Outside ``device_memory`` altogether: the CUDA context (a few hundred MiB of the driver's, not
the allocator's), NCCL's own buffers, and the cuBLAS/cuBLASLt workspaces of the compute stream
(up to 32 MiB each on recent GPUs, kept for the process's life). A trainer therefore refuses a
``device_memory`` that the GPU's free memory cannot hold together with
:data:`WORKSPACE_HEADROOM` (:func:`check_fits`), at construction and when the budget is set
between steps (then against :func:`room_for_new_packs`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

MIB = 1 << 20
BLOCK = 512                 # the allocator rounds every request up to this
SMALL = 1 * MIB             # blocks up to this size come from 2 MiB segments...
SMALL_SEGMENT = 2 * MIB
MEDIUM = 10 * MIB           # ...below this from 20 MiB segments...
MEDIUM_SEGMENT = 20 * MIB
LARGE_ROUND = 2 * MIB       # ...and larger ones get their own, rounded to 2 MiB
WORKSPACE_HEADROOM = 64 * MIB  # cuBLAS and cuBLASLt workspaces of one compute stream


def block_bytes(nbytes: int) -> int:
    """The bytes the caching allocator gives a request of ``nbytes`` (a multiple of 512).

    >>> block_bytes(1), block_bytes(512), block_bytes(513)
    (512, 512, 1024)
    """
    if nbytes < 0:
        raise ValueError(f"nbytes={nbytes} must be >= 0")
    return max(BLOCK, -(-nbytes // BLOCK) * BLOCK)


def segment_bytes(nbytes: int) -> int:
    """The size of the segment the allocator reserves when no cached one can serve a request of
    ``nbytes``.

    >>> [segment_bytes(n) >> 20 for n in (100, 1 << 20, (1 << 20) + 1, 10 << 20, 21 << 20)]
    [2, 2, 20, 10, 22]
    """
    size = block_bytes(nbytes)
    if size <= SMALL:
        return SMALL_SEGMENT
    if size < MEDIUM:
        return MEDIUM_SEGMENT
    return -(-size // LARGE_ROUND) * LARGE_ROUND


def reserved_allowance(blocks: Iterable[int]) -> int:
    """What the allocator may reserve beyond the bytes of live tensors of these sizes through
    rounding and segments alone (not fragmentation): each block's rounding to 512 bytes and,
    for large blocks, to 2 MiB, plus one partly used segment of the small and one of the
    medium pool when such blocks exist.

    >>> reserved_allowance([100, 200]) == (512 - 100) + (512 - 200) + 2 * MIB
    True
    >>> reserved_allowance([]) == 0
    True
    """
    extra, small, medium = 0, False, False
    for n in blocks:
        size = block_bytes(n)
        extra += size - n
        if size <= SMALL:
            small = True
        elif size < MEDIUM:
            medium = True
        else:
            extra += segment_bytes(n) - size
    return extra + (SMALL_SEGMENT if small else 0) + (MEDIUM_SEGMENT if medium else 0)


def check_fits(device_memory: int | None, free_bytes: int, device: object = "cuda") -> None:
    """Refuse a ``device_memory`` the GPU cannot hold beside the workspaces' headroom.

    Args:
        device_memory: the budget (None: no limit, nothing to check).
        free_bytes: the GPU's free memory now (``torch.cuda.mem_get_info``), which already
            excludes this process's CUDA context and every other process's memory.

    Raises:
        ValueError: naming the budget, what is free and the largest budget that fits.

    >>> check_fits(1 << 30, 8 << 30)
    >>> check_fits(None, 0)
    """
    if device_memory is None:
        return
    if device_memory + WORKSPACE_HEADROOM > free_bytes:
        from swap.tier import fmt_bytes

        most = max(0, free_bytes - WORKSPACE_HEADROOM)
        raise ValueError(
            f"device_memory={fmt_bytes(device_memory)} does not fit on {device}: "
            f"{fmt_bytes(free_bytes)} are free (the CUDA context and other processes hold the "
            f"rest) and the cuBLAS workspaces need up to {fmt_bytes(WORKSPACE_HEADROOM)} "
            f"beside the budget; use device_memory<={fmt_bytes(most)} or free the GPU")


def room_for_new_packs(device: torch.device, held: int) -> int:
    """The bytes a new plan's packs can have on CUDA ``device`` once this trainer's packs
    (``held`` bytes of the device tier) are released: the driver's free memory, the blocks the
    caching allocator keeps free, and ``held``. For :func:`check_fits` when a budget is set
    between steps.
    """
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free + max(0, cached) + held


class ReservedPeak:
    """The caching allocator's reserved bytes on a CUDA device, counted from :meth:`start`.

    :meth:`start` gives the cached but unused blocks back to the driver
    (``torch.cuda.empty_cache``), resets the device's peak statistics and takes what is still
    reserved (live tensors of anyone in the process, the workspaces) as the base;
    :attr:`peak` is ``max_memory_reserved`` above that base since. On a CPU device both are 0.

    Example (on a GPU)::

        window = ReservedPeak(torch.device("cuda", 0))
        window.start()
        train()
        print(window.peak)   # bytes the allocator reserved beyond the base, at most
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base: int | None = None

    def start(self) -> None:
        if self.device.type != "cuda":
            self.base = 0
            return
        torch.cuda.synchronize(self.device)  # (freed blocks still in use by a stream stay)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_reserved(self.device)

    @property
    def peak(self) -> int:
        if self.device.type != "cuda" or self.base is None:
            return 0
        return max(0, torch.cuda.max_memory_reserved(self.device) - self.base)
