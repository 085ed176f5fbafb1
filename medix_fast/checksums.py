"""Per-file checksums of a checkpoint's DCP shards, computed as the bytes are written.

    writer = ChecksumWriter(directory)          # a dcp.FileSystemWriter; dcp.save(..., storage_writer=writer)
    bad = first_mismatch(directory, checksums)  # "__0_0.distcp", or None when every file matches

Each rank's writer updates a CRC-32 of every shard file on each ``write`` (no second read of what
was written: at 8B/30B scale a checkpoint is hundreds of GB) and hands it to the coordinator
with its write results; the coordinator keeps ``{file name: crc32}`` in the checkpoint's
``.metadata`` (``Metadata.checksums``), the plain DCP storage entries unchanged, so any DCP reader
still loads it. Reading a checkpoint back verifies the files (``checkpoint.check_checkpoint``,
sequential reads of 16 MiB). CRC-32 catches accidental damage (a zeroed page, a bad sector, a torn
copy), not tampering; zlib's runs at ~2 GB/s on one core (``bench/bench_checkpoint.py``).
"""
from __future__ import annotations

import dataclasses
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.futures import Future

CHUNK = 16 << 20  # bytes per read when verifying


def file_crc(path: Path) -> str:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def first_mismatch(directory: Path, checksums: dict[str, str]) -> str | None:
    """The first file (by name) of ``checksums`` whose bytes in ``directory`` do not match, else None."""
    return next((name for name in sorted(checksums) if file_crc(directory / name) != checksums[name]), None)


class _Hashing:
    """A write stream that updates a CRC-32 with every buffer written through it."""

    def __init__(self, raw):
        self.raw, self.crc = raw, 0

    def write(self, data) -> int:
        written = self.raw.write(data)
        self.crc = zlib.crc32(memoryview(data).cast("B")[:written], self.crc)
        return written

    def __getattr__(self, name):  # tell, flush, fileno, close: the file's own
        return getattr(self.raw, name)


class _HashingFileSystem(FileSystem):
    def __init__(self, sums: dict[str, str]):
        super().__init__()
        self.sums = sums

    @contextmanager
    def create_stream(self, path, mode):
        with super().create_stream(path, mode) as stream:
            if "w" not in mode:
                yield stream
                return
            hashing = _Hashing(stream)
            yield hashing
            self.sums[Path(path).name] = f"{hashing.crc:08x}"


class _Summed(NamedTuple):  # a write result's storage entry and its file's checksum, rank -> coordinator
    info: object
    crc: str


class ChecksumWriter(dcp.FileSystemWriter):
    """``dcp.FileSystemWriter`` whose shard files carry a CRC-32 in the metadata (``Metadata.checksums``)."""

    def __init__(self, path, **kwargs):
        super().__init__(path, **kwargs)
        self.sums: dict[str, str] = {}
        self.fs = _HashingFileSystem(self.sums)

    def write_data(self, plan, planner):
        results = super().write_data(plan, planner).wait()  # written synchronously by then
        summed: Future = Future()
        summed.set_result([dataclasses.replace(r, storage_data=_Summed(r.storage_data,
                                                                       self.sums[r.storage_data.relative_path]))
                           for r in results])
        return summed

    def finish(self, metadata, results) -> None:
        checksums = {r.storage_data.info.relative_path: r.storage_data.crc for rank in results for r in rank}
        plain = [[dataclasses.replace(r, storage_data=r.storage_data.info) for r in rank] for rank in results]
        metadata.checksums = checksums
        super().finish(metadata, plain)
