"""On-disk cache of SVD factors, keyed by the content of each weight.

One safetensors file per weight matrix: `<cache>/<key[:2]>/<key>.safetensors` holding U, S, Vh in float32. The key
hashes the weight's bytes, dtype and matrix shape (and the engine's version), so a second attach to the same base
reads its factors instead of decomposing again, whatever the weight's name. Nothing read is trusted: an entry is
used only if it loads, has the right shapes and passes the engine's own accuracy check against the weight it is
for (reconstruction and orthogonality, estimated with random probes) and is in canonical order and signs (σ
descending, each uᵢ's largest entry positive: reordered factors rebuild W exactly but would give δ another
meaning); a truncated, corrupted, reordered or mismatched entry is deleted and recomputed. A cache that cannot be
written (full, read-only) warns once and the run goes on.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import platformdirs
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..files import atomic_path
from .basis import TOLERANCE, SpectralBasis, factor_errors, is_canonical

ENGINE_VERSION = "1"


def cache_dir() -> Path:
    """`$SVDIFF_CACHE`, or the user cache folder (e.g. ~/.cache/svdiff/svd)."""
    env = os.environ.get("SVDIFF_CACHE")
    return Path(env) if env else Path(platformdirs.user_cache_dir("svdiff")) / "svd"


def content_key(matrix: torch.Tensor) -> str:
    """A hash of the matrix's values as stored, its dtype and shape."""
    h = hashlib.sha256(f"{ENGINE_VERSION}|{matrix.dtype}|{tuple(matrix.shape)}|".encode())
    data = matrix.detach().contiguous().cpu()
    h.update(data.view(torch.uint8).numpy().data if data.numel() else b"")
    return h.hexdigest()[:40]


def content_keys(matrices: list[torch.Tensor]) -> list[str]:
    """`content_key` of each matrix, hashed in parallel (hashlib releases the GIL on large buffers)."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(content_key, matrices))


class SVDCache:
    # Cache folders found full or read-only in this process: not tried again, so the warning comes once.
    unwritable: set[Path] = set()

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else cache_dir()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str, matrix: torch.Tensor) -> SpectralBasis | None:
        """The cached factors of `matrix`, or None (missing, or bad and now removed)."""
        path = self.path(key)
        if not path.is_file():
            return None
        m, n = matrix.shape
        r = min(m, n)
        try:
            with safe_open(path, framework="pt") as f:
                ok = (f.metadata() or {}).get("key") == key
                tensors = {k: f.get_tensor(k) for k in ("U", "S", "Vh")}
            u, s, vh = (tensors[k].to(matrix.device) for k in ("U", "S", "Vh"))
            ok = ok and u.shape == (m, r) and s.shape == (r,) and vh.shape == (r, n)
            ok = ok and is_canonical(u[None], s[None])
            ok = ok and bool(factor_errors(matrix[None], u[None], s[None], vh[None])[0] <= TOLERANCE)
        except Exception:  # any unreadable entry is treated the same way: recompute it
            ok = False
        if not ok:
            try:
                path.unlink(missing_ok=True)
            except OSError:  # a read-only cache keeps its bad entry; this run recomputes the factors anyway
                pass
            return None
        return SpectralBasis(u, s, vh)

    def put(self, key: str, basis: SpectralBasis) -> bool:
        """Stores the factors; False when the cache folder cannot take them (full, read-only): that costs speed
        next time, not this run, so it warns once and stops trying."""
        if self.root in SVDCache.unwritable:
            return False
        tensors = {"U": basis.U.float().cpu(), "S": basis.S.float().cpu(), "Vh": basis.Vh.float().cpu()}
        try:
            with atomic_path(self.path(key)) as temp:
                save_file(tensors, temp, metadata={"key": key, "engine": ENGINE_VERSION})
            return True
        except (OSError, SafetensorError) as e:
            SVDCache.unwritable.add(self.root)
            reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
            warnings.warn(
                f"cannot write the SVD cache at {self.root} ({reason}): factors are recomputed next time", stacklevel=3
            )
            return False

    def entries(self) -> list[Path]:
        return sorted(self.root.glob("*/*.safetensors")) if self.root.is_dir() else []

    def clear(self) -> int:
        entries = self.entries()
        for p in entries:
            p.unlink(missing_ok=True)
        return len(entries)
