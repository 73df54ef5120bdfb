"""Read PyTorch `.pt` / `.bin` weight files without torch, the way `torch.load(weights_only=True)` does:
a restricted unpickler that admits tensors, storages and ordered dicts and nothing else.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_unused) -> np.ndarray:
    if not size:
        return storage[offset].copy()
    strides = [s * storage.itemsize for s in stride]
    return np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size), strides=strides).copy()


def _rebuild_parameter(data, _requires_grad, _hooks):
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _WeightsUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a weights file")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, _numel = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid[:2]}")
        if key not in self._storages:
            raw = self._archive.read(f"{self._prefix}/data/{key}")
            self._storages[key] = np.frombuffer(raw, storage_type.dtype)
        return self._storages[key]


def load_torch_file(path: str | Path) -> dict[str, np.ndarray]:
    """name → array of a zip-format torch.save file holding a (nested) dict of tensors."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path.name}: not a zip-format torch file (legacy torch.save files are not supported)")
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path.name}: expected one data.pkl, found {len(pickles)}")
        prefix = pickles[0][: -len("/data.pkl")]
        with archive.open(pickles[0]) as f:
            obj = _WeightsUnpickler(f, archive, prefix).load()
    if isinstance(obj, dict) and "module" in obj and isinstance(obj["module"], dict):
        obj = obj["module"]  # DeepSpeed wraps the state dict
    if not isinstance(obj, dict):
        raise ValueError(f"{path.name}: expected a dict of tensors, found {type(obj).__name__}")
    return {str(k): v for k, v in obj.items() if isinstance(v, np.ndarray)}
