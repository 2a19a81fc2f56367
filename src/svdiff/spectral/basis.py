"""The SVD engine: reduced SVDs of many weight matrices, fast and checked.

Per matrix A (m × n, short side s = min(m, n)) we take the Gram matrix of the short side, `G = A·Aᵀ` (s × s), its
eigendecomposition `G = P·diag(λ)·Pᵀ`, and recover the long-side vectors as `Q = Aᵀ·P·diag(1/σ)`, σ = √λ: two
matrix products and a small symmetric eigenproblem instead of a bidiagonalization. Matrices of one shape are
stacked and done in one batched call, on whatever device the weights live on.

Squaring A squares its condition number κ = σ₁/σᵢ, so the recovered vectors lose orthogonality as ε·κ². Hence
three tiers, each result checked (reconstruction and orthogonality errors, see `factor_errors`) before it is
accepted: float32 for well-conditioned matrices, kept only when as accurate as a float32 LAPACK SVD would be;
float64 for the matrices float32 could not do (good down to σᵢ/σ₁ ≈ 1e-5); a full float64 SVD for the rest
(rank-deficient or nearly so). On a CPU, near-square matrices gain nothing from the Gram route and go straight to
a float32 SVD.

Singular values come out sorted descending and each pair of singular vectors gets a deterministic sign
(largest-magnitude entry of u positive), so a shift file means the same thing on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOLERANCE = 1e-5  # relative reconstruction / orthogonality error a float64 Gram result must meet
# A float32 Gram result is kept only if it is as accurate as a float32 LAPACK SVD of the same matrix, whose errors
# grow like ε₃₂·√(long side): (3e-8·√l, about the better end of what LAPACK reaches).
FLOAT32_TOLERANCE = 3e-8
# On a CPU, LAPACK's SVD of a near-square matrix (long side < GRAM_ASPECT × short side) is as fast as the Gram
# route, which then gains nothing; GPU SVDs are slow at every shape while float64 products and eigh are fast.
GRAM_ASPECT = 2
# Below this aspect ratio the float32 Gram route rarely meets FLOAT32_TOLERANCE (κ² of a random matrix of aspect
# a is ((√a + 1)/(√a − 1))⁴), so such matrices start in float64.
FLOAT32_ASPECT = 5
PROBES = 8  # random vectors used to estimate the errors (E‖R·x‖² = ‖R‖²_F for Gaussian x)
# Matrix elements per batched call. A CPU gains nothing from batching big matrices (and loses cache locality);
# a GPU gains from filling the device.
BATCH_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}


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
    if torch.backends.cuda.matmul.allow_tf32:  # TF32 products would fail every float32 check
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            return decompose(matrices, progress)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = True
    groups: dict[tuple, list[int]] = {}
    for i, a in enumerate(matrices):
        groups.setdefault((tuple(a.shape), a.device), []).append(i)
    out: list[SpectralBasis | None] = [None] * len(matrices)
    for (shape, device), idx in groups.items():
        per_batch = max(1, BATCH_ELEMENTS.get(device.type, BATCH_ELEMENTS["cpu"]) // (shape[0] * shape[1]))
        for start in range(0, len(idx), per_batch):
            chunk = idx[start : start + per_batch]
            for i, basis in zip(chunk, _decompose_batch([matrices[i] for i in chunk]), strict=True):
                out[i] = basis
            if progress is not None:
                progress(len(chunk))
    return out  # type: ignore[return-value]


def _decompose_batch(mats: list[torch.Tensor]) -> list[SpectralBasis]:
    a = torch.stack([m.detach() for m in mats]).to(torch.float32)
    if a.is_meta:  # shapes only: no numbers to compute
        u, sigma, vh = _empty_like_factors(a)
    else:
        u, sigma, vh = _fix_signs(*_factors(a))
    return [SpectralBasis(u[k].contiguous(), sigma[k], vh[k].contiguous()) for k in range(len(mats))]


def _factors(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, σ, Vᵀ of the batch `a` through the tiers described at the top of this file."""
    long, short = max(a.shape[1:]), min(a.shape[1:])
    if a.device.type == "cpu" and long < GRAM_ASPECT * short:
        return torch.linalg.svd(a, full_matrices=False)
    u, sigma, vh = _empty_like_factors(a)
    todo = torch.arange(len(a), device=a.device)  # matrices still without an accepted result
    if long >= FLOAT32_ASPECT * short:
        u, sigma, vh = _gram_svd(a)
        todo = (factor_errors(a, u, sigma, vh) > FLOAT32_TOLERANCE * long**0.5).nonzero().flatten()
    if len(todo):
        a64 = a[todo].double()
        u64, sigma64, vh64 = _gram_svd(a64)
        for j in (factor_errors(a64, u64, sigma64, vh64) > TOLERANCE).nonzero().flatten().tolist():
            u64[j], sigma64[j], vh64[j] = torch.linalg.svd(a64[j], full_matrices=False)
        u[todo], sigma[todo], vh[todo] = u64.float(), sigma64.float(), vh64.float()
    return u, sigma, vh


def _gram_svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, σ, Vᵀ of each matrix in the batch `a` through the Gram matrix of its short side, in a's dtype."""
    wide = a.shape[1] <= a.shape[2]
    short = a if wide else a.transpose(1, 2)  # b × s × l
    lam, p = torch.linalg.eigh(short @ short.transpose(1, 2))
    lam, p = lam.flip(-1), p.flip(-1)  # descending
    sigma = lam.clamp_min(0).sqrt()
    q = (short.transpose(1, 2) @ p) / sigma.clamp_min(torch.finfo(a.dtype).tiny).unsqueeze(1)
    return (p, sigma, q.transpose(1, 2)) if wide else (q, sigma, p.transpose(1, 2))


def factor_errors(a, u, sigma, vh) -> torch.Tensor:
    """Per matrix of the batch, the largest of the relative reconstruction error ‖A − UΣVᵀ‖_F / ‖A‖_F and the
    orthogonality errors of U's columns and V's columns, each estimated with Gaussian probes (E‖M·x‖² = ‖M‖²_F):
    a few matrix-vector products instead of another m × n product."""
    a, u, sigma, vh = (t.double() for t in (a, u, sigma, vh))  # the check itself must be far below TOLERANCE
    gen = torch.Generator(device=a.device).manual_seed(0)

    def probes(n):
        return torch.randn(a.shape[0], n, PROBES, dtype=a.dtype, device=a.device, generator=gen)

    def rel(err, ref):
        e, r = err.norm(dim=(1, 2)), ref.norm(dim=(1, 2))
        return torch.where(r > 0, e / r, torch.where(e > 0, torch.inf, 0.0))  # a zero matrix is exact at 0

    x = probes(a.shape[2])
    ax = a @ x
    recon = rel(ax - u @ (sigma.unsqueeze(-1) * (vh @ x)), ax)
    z = probes(u.shape[2])
    orth_u = rel(u.transpose(1, 2) @ (u @ z) - z, z)
    orth_v = rel(vh @ (vh.transpose(1, 2) @ z) - z, z)
    return torch.stack([recon, orth_u, orth_v]).amax(0).nan_to_num(float("inf"))


def _fix_signs(u: torch.Tensor, sigma: torch.Tensor, vh: torch.Tensor):
    """Each pair (uᵢ, vᵢ) is defined up to a joint sign; pick the one whose largest-magnitude uᵢ entry is positive."""
    sign = _peak_signs(u)
    sign[sign == 0] = 1
    return u * sign, sigma, vh * sign.transpose(1, 2)


def _peak_signs(u: torch.Tensor) -> torch.Tensor:
    """The sign of each column's largest-magnitude entry, for a batch u (b × m × r): b × 1 × r."""
    return torch.sign(u.gather(1, u.abs().argmax(dim=1, keepdim=True)))


def is_canonical(u: torch.Tensor, sigma: torch.Tensor) -> bool:
    """Whether factors are in the order and signs `decompose` gives: σ non-negative and descending, each uᵢ's
    largest-magnitude entry positive. Any other order or sign reconstructs the same W, but a δ trained on the
    canonical factors means something else on them (δᵢ would shift another singular value)."""
    descending = bool((sigma[..., :-1] >= sigma[..., 1:]).all()) and bool((sigma >= 0).all())
    return descending and bool((_peak_signs(u.reshape(-1, *u.shape[-2:])) >= 0).all())


def _empty_like_factors(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, m, n = a.shape
    r = min(m, n)
    return a.new_empty(b, m, r), a.new_empty(b, r), a.new_empty(b, r, n)
