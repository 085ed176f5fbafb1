"""Reading a checkpoint without running code it carries: every pickle in it is read by an allowlist.

A checkpoint can come from elsewhere (a colleague's run, a download), and a pickle can name any
function for the reader to call. Three kinds of pickle can be in a checkpoint, each read here:

    state/.metadata       DCP's index of the shards: :func:`read_metadata` (also what
                          :class:`PlainReader` gives DCP), an unpickler that builds only DCP's
                          metadata classes, ``torch.Size``, dtypes, layouts and paths
    non-tensor entries    in the shard files (the optimizer's hyper-parameters): DCP's own planner
                          reads them with ``torch.load(weights_only=False)``; :class:`PlainLoadPlanner`
                          with ``weights_only=True`` (tensors and plain Python data)
    *.pt (older format)   ``trainer_state.pt`` / ``rng_rank<R>.pt`` of checkpoints written before
                          ``checkpoint_files.py``: :func:`torch_load_plain`, ``weights_only=True``
                          and numpy arrays (the numpy RNG state)

Anything else named in them (``os.system``, a class of the writer's) is :class:`Refused` before
any of it runs. What this does not cover: the tensors' values and the shards' bytes are the
writer's (the CRC-32s in ``.metadata`` catch damage, not tampering), and ``hf_config/`` and
``model/`` are read by transformers as any downloaded model is (medix_fast never passes
``trust_remote_code``).
"""
from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta


class Refused(pickle.UnpicklingError):
    """A pickle in a checkpoint names something that is not checkpoint data (``str``: what it names)."""


_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath"},  # StorageMeta's checkpoint id
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _METADATA_GLOBALS.get(module, ()) or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise Refused(f"{module}.{name}")


def read_metadata(file: Path):
    """DCP's ``Metadata`` from ``file`` (a ``.metadata``); :class:`Refused` if it names anything else."""
    with open(file, "rb") as f:
        return _MetadataUnpickler(f).load()


class PlainReader(FileSystemReader):
    """DCP's file reader, its ``.metadata`` read by :func:`read_metadata` instead of ``pickle.load``."""

    def read_metadata(self, *args, **kwargs):
        metadata = read_metadata(Path(self.path) / ".metadata")
        metadata.storage_meta = metadata.storage_meta or StorageMeta()  # as DCP's own reader does
        metadata.storage_meta.load_id = self.load_id
        return metadata


class PlainLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, a non-tensor entry read with ``weights_only=True``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        plain = torch_load_plain(value)
        again = io.BytesIO()  # DCP's bookkeeping, given a pickle of plain data only (its own torch.load
        torch.save(plain, again)  # is weights_only=False)
        again.seek(0)
        super().load_bytes(read_item, again)


_NUMPY_CORE = np._core if hasattr(np, "_core") else np.core  # numpy 2 / 1
_NUMPY_ARRAYS = [np.ndarray, np.dtype, np.dtypes.UInt32DType, _NUMPY_CORE.multiarray._reconstruct]
_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL (\S+)")


def torch_load_plain(file):
    """``torch.load`` of tensors, plain Python data and numpy arrays (``weights_only=True``);
    :class:`Refused` if the pickle names anything else (torch's own errors for a damaged file)."""
    try:
        with torch.serialization.safe_globals(_NUMPY_ARRAYS):
            return torch.load(file, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        named = _UNSUPPORTED.search(str(err))
        if named:
            raise Refused(named.group(1)) from None
        raise
