"""NVMe store throughput per backend, next to ``dd`` with O_DIRECT on the same directory.

Each repeat runs every engine once per size, interleaved, because a shared disk swings a lot
between minutes (0.7 to 3 GB/s was seen on the build machines); the table gives the median and
the range over the repeats. GB/s is 10^9 bytes per second, as dd prints it.

    python examples/bench_io.py --dir /mnt/nvme/bench               # 256 MiB and 1 GiB, 5 repeats
    python examples/bench_io.py --dir /tmp/b --sizes 256MiB --repeat 3 --backends odirect

What is timed: ``store.write(key, src).wait()`` and ``store.read(key, dst).wait()``, with
``src``/``dst`` from ``store.allocate`` (no staging), and again with plain torch tensors
(rows marked "staged": every chunk bounces through the aligned staging pool). Before each read
the file's pages are dropped from the page cache so buffered reads come from the disk;
buffered writes land in the page cache and are not flushed, which flatters them.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from swap.aio import aio_prebuilt
from swap.nvme import BACKENDS, NvmeStore

UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def parse_size(text: str) -> int:
    """``"256MiB"`` -> 268435456."""
    m = re.fullmatch(r"(\d+)\s*(KiB|MiB|GiB)?", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"size {text!r}: use e.g. 256MiB or 1GiB")
    return int(m.group(1)) * UNITS.get(m.group(2) or "", 1)


def fmt_size(n: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        if n % UNITS[unit] == 0:
            return f"{n // UNITS[unit]} {unit}"
    return f"{n} B"


def drop_cache(directory: Path) -> None:
    """Flush and evict the directory's files from the page cache (for honest buffered reads)."""
    for p in directory.iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def time_store(store: NvmeStore, src: torch.Tensor, dst: torch.Tensor) -> tuple[float, float]:
    """Seconds for one write and one read of ``src``'s bytes."""
    t0 = time.perf_counter()
    store.write("bench", src).wait()
    t_write = time.perf_counter() - t0
    drop_cache(store.directory)
    t0 = time.perf_counter()
    store.read("bench", dst).wait()
    t_read = time.perf_counter() - t0
    if not torch.equal(src[:: 1 << 16], dst[:: 1 << 16]):
        raise SystemExit(f"{store.backend}: read back different bytes")
    store.delete("bench")
    return t_write, t_read


def time_dd(directory: Path, nbytes: int, bs: int) -> tuple[float, float]:
    """Seconds dd reports for an O_DIRECT write and read of ``nbytes`` in blocks of ``bs``."""
    path = directory / "dd.bin"
    count = nbytes // bs

    def run(args: list[str]) -> float:
        done = subprocess.run(["dd", *args], capture_output=True, text=True, check=True)
        m = re.search(r"copied, ([\d.e+-]+) s", done.stderr)
        if not m:
            raise SystemExit(f"cannot read dd's time from: {done.stderr!r}")
        return float(m.group(1))

    try:
        t_write = run(["if=/dev/zero", f"of={path}", f"bs={bs}", f"count={count}", "oflag=direct"])
        t_read = run([f"if={path}", "of=/dev/null", f"bs={bs}", f"count={count}", "iflag=direct"])
    finally:
        path.unlink(missing_ok=True)
    return t_write, t_read


def summary(nbytes: int, seconds: list[float]) -> str:
    rates = [nbytes / s / 1e9 for s in seconds]
    return f"{statistics.median(rates):5.2f} ({min(rates):.2f}-{max(rates):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="directory on the disk to test")
    parser.add_argument("--sizes", default="256MiB,1GiB", help="comma-separated, e.g. 256MiB,1GiB")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--chunk", type=parse_size, default=8 << 20, help="chunk_bytes")
    parser.add_argument("--dd-bs", type=parse_size, default=1 << 20, help="dd block size")
    parser.add_argument("--no-staged", action="store_true", help="skip the staged rows")
    parser.add_argument(
        "--build-aio", action="store_true", help="build DeepSpeed's op if needed (~5 min)"
    )
    args = parser.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    args.dir.mkdir(parents=True, exist_ok=True)

    stores: dict[str, NvmeStore] = {}
    for name in args.backends.split(","):
        if name == "aio" and not (aio_prebuilt() or args.build_aio):
            print("skipping aio: op not built (run .ci/install-aio.sh or pass --build-aio)")
            continue
        store = NvmeStore(args.dir, backend=name, threads=args.threads, chunk_bytes=args.chunk)
        if store.backend != name:
            print(f"skipping {name}: it degraded to {store.backend} here")
            store.close()
            continue
        stores[name] = store

    engines = [(name, False) for name in stores]
    if not args.no_staged:
        engines += [(name, True) for name in stores if name != "buffered"]
    # (engine label, size) -> write seconds, read seconds over the repeats
    times: dict[tuple[str, int], tuple[list[float], list[float]]] = {}
    try:
        for size in sizes:
            data = torch.randint(0, 256, (size,), dtype=torch.uint8)  # incompressible
            plain_dst = torch.empty_like(data)
            buffers = {}
            for name, store in stores.items():
                src = store.allocate(size)
                src.copy_(data)
                buffers[name] = (src, store.allocate(size))
            for rep in range(args.repeat):
                for name, staged in engines:
                    src, dst = (data, plain_dst) if staged else buffers[name]
                    label = f"{name} (staged)" if staged else name
                    w, r = time_store(stores[name], src, dst)
                    times.setdefault((label, size), ([], []))[0].append(w)
                    times[(label, size)][1].append(r)
                w, r = time_dd(args.dir, size, args.dd_bs)
                label = f"dd bs={fmt_size(args.dd_bs)} direct"
                times.setdefault((label, size), ([], []))[0].append(w)
                times[(label, size)][1].append(r)
                print(f"  {fmt_size(size)}: repeat {rep + 1}/{args.repeat} done", file=sys.stderr)
    finally:
        for store in stores.values():
            store.close()

    print(
        f"\n{args.repeat} repeats, threads={args.threads}, chunk={fmt_size(args.chunk)}, "
        f"dir={args.dir}; GB/s median (min-max)\n"
    )
    print("| size | engine | write GB/s | read GB/s |")
    print("|---|---|---|---|")
    for (label, size), (ws, rs) in times.items():
        print(f"| {fmt_size(size)} | {label} | {summary(size, ws)} | {summary(size, rs)} |")


if __name__ == "__main__":
    main()
