"""The SVD engine: reduced SVDs of many weight matrices, fast and checked.

Per matrix A (m × n, short side s = min(m, n)) we take the Gram matrix of the short side in float64,
`G = A·Aᵀ` (s × s), its eigendecomposition `G = P·diag(λ)·Pᵀ`, and recover the long-side vectors as
`Q = Aᵀ·P·diag(1/σ)`, with σ = √λ. Matrices of one shape are stacked and done in one batched call, on whatever
device the weights live on. Squaring the matrix squares its condition number, which float64 absorbs down to
σᵢ/σ₁ ≈ 1e-5; below that (rank-deficient or nearly so) the recovered vectors lose orthogonality, so every
result is checked and a matrix that misses the tolerance is redone with a full float64 SVD.

Singular values come out sorted descending and each pair of singular vectors gets a deterministic sign
(largest-magnitude entry of u positive), so a shift file means the same thing on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOLERANCE = 1e-5  # relative reconstruction / orthogonality error a Gram result must meet
PROBES = 8  # random vectors used to estimate the errors (E‖R·x‖² = ‖R‖²_F for Gaussian x)
BATCH_BYTES = 1 << 30  # float64 working set per batched call


@dataclass
class SpectralBasis:
    """`A = U · diag(S) · Vh` for one weight matrix A (c_out × rest)."""

    U: torch.Tensor  # c_out × r
    S: torch.Tensor  # r, descending, float32
    Vh: torch.Tensor  # r × rest

    @property
    def rank(self) -> int:
        return self.S.numel()


def decompose(matrices: list[torch.Tensor], progress=None) -> list[SpectralBasis]:
    """Reduced SVDs of `matrices`, in order, as float32 factors on each matrix's device.

    `progress`, if given, is called with the number of matrices finished after each batch."""
    groups: dict[tuple, list[int]] = {}
    for i, a in enumerate(matrices):
        groups.setdefault((tuple(a.shape), a.device), []).append(i)
    out: list[SpectralBasis | None] = [None] * len(matrices)
    for (shape, _), idx in groups.items():
        per_batch = max(1, BATCH_BYTES // (8 * (shape[0] * shape[1] + 2 * min(shape) ** 2)))
        for start in range(0, len(idx), per_batch):
            chunk = idx[start : start + per_batch]
            for i, basis in zip(chunk, _decompose_batch([matrices[i] for i in chunk]), strict=True):
                out[i] = basis
            if progress is not None:
                progress(len(chunk))
    return out  # type: ignore[return-value]


def _decompose_batch(mats: list[torch.Tensor]) -> list[SpectralBasis]:
    a = torch.stack([m.detach() for m in mats]).to(torch.float64)
    if a.is_meta:  # shapes only: no numbers to compute
        return [_empty_basis(m) for m in mats]
    wide = a.shape[1] <= a.shape[2]
    short = a if wide else a.transpose(1, 2)  # b × s × l
    lam, p = torch.linalg.eigh(short @ short.transpose(1, 2))
    lam, p = lam.flip(-1), p.flip(-1)  # descending
    sigma = lam.clamp_min(0).sqrt()
    q = (short.transpose(1, 2) @ p) / sigma.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(1)
    u, vh = (p, q.transpose(1, 2)) if wide else (q, p.transpose(1, 2))
    bad = _errors(a, u, sigma, vh) > TOLERANCE
    for k in bad.nonzero().flatten().tolist():
        u[k], sigma[k], vh[k] = torch.linalg.svd(a[k], full_matrices=False)
    u, vh = _fix_signs(u, vh)
    return [
        SpectralBasis(u[k].float().contiguous(), sigma[k].float(), vh[k].float().contiguous()) for k in range(len(mats))
    ]


def _errors(a, u, sigma, vh) -> torch.Tensor:
    """Per matrix, the larger of the relative reconstruction error ‖A − UΣVᵀ‖/‖A‖ and the orthogonality error
    ‖VᵀV − I‖ of the vectors that came from a division by σ, both estimated with Gaussian probes
    (E‖M·x‖² = ‖M‖²_F), which costs a few matrix-vector products instead of another m × n product."""
    gen = torch.Generator(device=a.device).manual_seed(0)
    x = torch.randn(a.shape[0], a.shape[2], PROBES, dtype=a.dtype, device=a.device, generator=gen)
    ax = a @ x
    recon = (ax - u @ (sigma.unsqueeze(-1) * (vh @ x))).norm(dim=(1, 2)) / ax.norm(dim=(1, 2))
    v = vh if a.shape[1] <= a.shape[2] else u.transpose(1, 2)  # s × l, rows should be orthonormal
    z = torch.randn(a.shape[0], v.shape[1], PROBES, dtype=a.dtype, device=a.device, generator=gen)
    orth = (v @ (v.transpose(1, 2) @ z) - z).norm(dim=(1, 2)) / z.norm(dim=(1, 2))
    return torch.maximum(recon, orth).nan_to_num(float("inf"))


def _fix_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair (uᵢ, vᵢ) is defined up to a joint sign; pick the one whose largest-magnitude uᵢ entry is positive."""
    peak = u.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(u.gather(1, peak))
    sign[sign == 0] = 1
    return u * sign, vh * sign.transpose(1, 2)


def _empty_basis(m: torch.Tensor) -> SpectralBasis:
    r = min(m.shape)
    return SpectralBasis(
        torch.empty(m.shape[0], r, device="meta"),
        torch.empty(r, device="meta"),
        torch.empty(r, m.shape[1], device="meta"),
    )
