"""On-disk cache of SVD factors, keyed by the content of each weight.

One safetensors file per weight matrix: `<cache>/<key[:2]>/<key>.safetensors` holding U, S, Vh in float32 and a
CRC of their bytes. The key hashes the weight's bytes, dtype and matrix shape (and the engine's version), so a
second attach to the same base reads its factors instead of decomposing again, whatever the weight's name. An entry
that is truncated, corrupted or of the wrong shape is deleted and recomputed, never used.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zlib
from pathlib import Path

import platformdirs
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .basis import SpectralBasis

ENGINE_VERSION = "1"


def cache_dir() -> Path:
    """`$SVDIFF_CACHE`, or the user cache folder (e.g. ~/.cache/svdiff/svd)."""
    env = os.environ.get("SVDIFF_CACHE")
    return Path(env) if env else Path(platformdirs.user_cache_dir("svdiff")) / "svd"


def content_key(matrix: torch.Tensor) -> str:
    """A hash of the matrix's values as stored, its dtype and shape."""
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{ENGINE_VERSION}|{matrix.dtype}|{tuple(matrix.shape)}|".encode())
    data = matrix.detach().contiguous().cpu()
    h.update(data.view(torch.uint8).numpy().data if data.numel() else b"")
    return h.hexdigest()


def _crc(tensors: dict[str, torch.Tensor]) -> str:
    crc = 0
    for name in sorted(tensors):
        crc = zlib.crc32(tensors[name].contiguous().view(torch.uint8).numpy().data, crc)
    return f"{crc:08x}"


class SVDCache:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else cache_dir()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str, shape: tuple[int, int]) -> SpectralBasis | None:
        """The cached factors of a matrix of `shape`, or None (missing, or bad and now removed)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in ("U", "S", "Vh")}
            m, n = shape
            r = min(shape)
            ok = (
                meta.get("key") == key
                and meta.get("crc") == _crc(tensors)
                and tensors["U"].shape == (m, r)
                and tensors["S"].shape == (r,)
                and tensors["Vh"].shape == (r, n)
            )
        except Exception:  # any unreadable entry is treated the same way: recompute it
            ok = False
        if not ok:
            path.unlink(missing_ok=True)
            return None
        return SpectralBasis(tensors["U"], tensors["S"], tensors["Vh"])

    def put(self, key: str, basis: SpectralBasis) -> None:
        tensors = {"U": basis.U.float().cpu(), "S": basis.S.float().cpu(), "Vh": basis.Vh.float().cpu()}
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"key": key, "crc": _crc(tensors), "engine": ENGINE_VERSION})
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def entries(self) -> list[Path]:
        return sorted(self.root.glob("*/*.safetensors")) if self.root.is_dir() else []

    def clear(self) -> int:
        entries = self.entries()
        for p in entries:
            p.unlink(missing_ok=True)
        return len(entries)
