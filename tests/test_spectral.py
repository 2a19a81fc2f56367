"""The spectral-shift parametrization: exactness, agreement with Eq. 2, gradients, dispatch, fuse, remove."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import svdiff
from svdiff.spectral import SpectralShift, decompose, find_targets, shifted_modules
from svdiff.spectral import kinds as kinds_mod
from svdiff.spectral.kinds import SPECTRAL, DeltaGrad, Plan, Route
from svdiff.spectral.layer import _Shifted


def _layers():
    torch.manual_seed(0)
    return {
        "linear-wide": (nn.Linear(24, 7), lambda: torch.randn(5, 3, 24)),
        "linear-tall": (nn.Linear(6, 20), lambda: torch.randn(4, 6)),
        "conv1d": (nn.Conv1d(5, 8, 3, padding=1), lambda: torch.randn(2, 5, 11)),
        "conv2d-k1": (nn.Conv2d(6, 4, 1), lambda: torch.randn(2, 6, 5, 5)),
        "conv2d-k1-one-image": (nn.Conv2d(4, 6, 1), lambda: torch.randn(1, 4, 5, 5)),
        "conv2d-k3": (nn.Conv2d(3, 9, 3, stride=2, padding=1), lambda: torch.randn(2, 3, 9, 9)),
        # more output positions than kinds.UNFOLD_POSITIONS: V's convolution through torch's convolution
        "conv2d-k3-many-positions": (nn.Conv2d(3, 5, 3, padding=1), lambda: torch.randn(1, 3, 9, 9)),
        "conv2d-k3-dilated": (nn.Conv2d(4, 6, 3, padding=2, dilation=2), lambda: torch.randn(1, 4, 7, 6)),
        "conv2d-same-reflect": (
            nn.Conv2d(4, 5, 3, padding="same", padding_mode="reflect"),
            lambda: torch.randn(1, 4, 6, 7),
        ),
        "conv-transpose2d": (nn.ConvTranspose2d(6, 4, 3, stride=2), lambda: torch.randn(2, 6, 4, 4)),
        "embedding": (nn.Embedding(30, 6), lambda: torch.randint(0, 30, (3, 7))),
        "layernorm": (nn.LayerNorm(12), lambda: torch.randn(3, 12)),
        "groupnorm": (nn.GroupNorm(2, 6), lambda: torch.randn(2, 6, 3, 3)),
    }


LAYERS = list(_layers())


def _shifted(name, **kw):
    layer, make_x = _layers()[name]
    base = copy.deepcopy(layer)
    params = svdiff.add_shifts(layer, cache=False, progress=False, **kw)
    return base, layer, params, make_x


def _randomize(params, std=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.values():
            p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("name", LAYERS)
def test_zero_shift_and_zero_scale_are_bit_exact(name):
    base, layer, params, make_x = _shifted(name)
    x = make_x()
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))  # δ = 0
    # while δ trains, a layer may compute through its factors (the SPECTRAL plan): equal up to the SVD's round-off
    torch.testing.assert_close(layer(x), base(x), rtol=1e-5, atol=1e-5)
    _randomize(params)
    with torch.no_grad():
        assert not torch.equal(layer(x), base(x))
        svdiff.set_scales(layer, {"default": 0.0})
        assert torch.equal(layer(x), base(x))  # scale 0


def _reference_weight(module, delta, kind):
    """Eq. 2 in float64 from an independent SVD: W' = U diag(ReLU(σ + δ)) Vᵀ."""
    w = module.weight.detach().double()
    if kind.is_vector:
        return w + delta.double()
    mat = kind.to_matrix(w)
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    return kind.from_matrix(u @ torch.diag(torch.relu(s + delta.double())) @ vh, w.shape)


@pytest.mark.parametrize("name", LAYERS)
def test_matches_float64_eq2(name):
    base, layer, params, make_x = _shifted(name)
    _randomize(params, std=0.5)
    (target,) = find_targets(base)
    (delta,) = params.values()
    ref = copy.deepcopy(base).double()
    with torch.no_grad():
        ref.weight.copy_(_reference_weight(base, delta.detach(), target.kind))
    x = make_x()
    xr = x if not x.is_floating_point() else x.double()
    torch.testing.assert_close(layer(x).double(), ref(xr), rtol=1e-4, atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 12), n=st.integers(1, 12), k=st.sampled_from([1, 3]), seed=st.integers(0, 2**16))
def test_random_shapes_match_eq2(m, n, k, seed):
    torch.manual_seed(seed)
    for layer, x in [
        (nn.Linear(n, m), torch.randn(3, n)),
        (nn.Conv2d(n, m, k, padding=k // 2), torch.randn(2, n, 5, 5)),
    ]:
        base = copy.deepcopy(layer)
        params = svdiff.add_shifts(layer, cache=False, progress=False)
        _randomize(params, seed=seed)
        (target,) = find_targets(base)
        ref = copy.deepcopy(base).double()
        with torch.no_grad():
            ref.weight.copy_(_reference_weight(base, next(iter(params.values())).detach(), target.kind))
        torch.testing.assert_close(layer(x).double(), ref(x.double()), rtol=1e-4, atol=1e-4)


EXACT = (Route.REBUILD, Route.FACTORED)
PLANS = [Plan(f, gx, gd) for f in EXACT for gx in EXACT for gd in DeltaGrad] + [SPECTRAL]


def _plan_id(plan: Plan) -> str:
    return f"{plan.forward.value}-{plan.grad_x.value}-{plan.grad_delta.value}"


def _force(monkeypatch, plan: Plan):
    monkeypatch.setattr(
        kinds_mod.Kind,
        "plan",
        lambda self, *a: plan if self.can_factor else Plan(Route.REBUILD, Route.REBUILD, DeltaGrad.WEIGHT),
    )


MATRIX_LAYERS = [
    "linear-wide",
    "linear-tall",
    "conv1d",
    "conv2d-k1",
    "conv2d-k1-one-image",
    "conv2d-k3",
    "conv2d-k3-dilated",
    "conv2d-same-reflect",
]


def _gradcheck(name, plan):
    """gradcheck of the layer's autograd function under `plan`, in float64, with respect to x and δ."""
    layer, make_x = _layers()[name]
    layer = layer.double()
    svdiff.add_shifts(layer, cache=False, progress=False)
    shift = layer.spectral_shift
    x = make_x().double().requires_grad_(True)
    x = shift.kind.prepare(layer, x)
    d = (torch.randn(shift.length, dtype=torch.float64) * 0.3).requires_grad_(True)
    f = lambda x, total: _Shifted.apply(x, total, layer.weight, layer.bias, shift, layer, plan)  # noqa: E731
    return torch.autograd.gradcheck(f, (x, d))


@pytest.mark.parametrize("name", MATRIX_LAYERS)
@pytest.mark.parametrize("plan", PLANS, ids=_plan_id)
def test_gradcheck_every_plan(name, plan):
    assert _gradcheck(name, plan)


@pytest.mark.parametrize("name", MATRIX_LAYERS + ["embedding", "layernorm", "groupnorm", "conv-transpose2d"])
def test_gradcheck_delta_through_module(name):
    layer, make_x = _layers()[name]
    layer = layer.double()
    svdiff.add_shifts(layer, cache=False, progress=False)
    shift = layer.spectral_shift
    x = make_x()
    x = x.double() if x.is_floating_point() else x

    def f(delta):
        shift.deltas["default"].data = delta  # the function of δ as the module computes it
        return layer(x)

    delta = (torch.randn(shift.length, dtype=torch.float64) * 0.3).requires_grad_(True)
    shift.deltas["default"] = nn.Parameter(delta.detach().clone())
    out = layer(x)
    (grad,) = torch.autograd.grad(out.sum(), shift.deltas["default"])
    eps = 1e-6
    numeric = torch.empty_like(delta)
    with torch.no_grad():
        for i in range(delta.numel()):
            e = torch.zeros_like(delta)
            e[i] = eps
            numeric[i] = (f(delta.detach() + e).sum() - f(delta.detach() - e).sum()) / (2 * eps)
    torch.testing.assert_close(grad, numeric, rtol=1e-5, atol=1e-6)


def _outputs_and_grads(name):
    """A shifted layer with random δ run forward and backward: its output and the gradients of x and δ."""
    base, layer, params, make_x = _shifted(name)
    _randomize(params)
    x = make_x().requires_grad_(True)
    y = layer(x)
    y.pow(2).sum().backward()
    return y.detach(), x.grad, next(iter(params.values())).grad


@pytest.mark.parametrize("name", MATRIX_LAYERS + ["conv-transpose2d"])
def test_every_plan_agrees(monkeypatch, name):
    results = []
    for plan in PLANS:
        _force(monkeypatch, plan)
        results.append(_outputs_and_grads(name))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _unfold(monkeypatch, on: bool):
    """Make V's convolutions run as products of unfolded patches (on) or through torch's convolution (off)."""
    monkeypatch.setattr(kinds_mod, "UNFOLD_POSITIONS", 1 << 62)
    monkeypatch.setattr(kinds_mod, "UNFOLD_VALUES", 0 if on else 1 << 62)


@pytest.mark.parametrize("name", ["conv2d-k3", "conv2d-k3-dilated", "conv2d-same-reflect", "conv2d-k3-many-positions"])
def test_unfolded_convolution_matches_torch(monkeypatch, name):
    _force(monkeypatch, SPECTRAL)
    results = []
    for on in (False, True):
        _unfold(monkeypatch, on)
        results.append(_outputs_and_grads(name))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["conv2d-k3", "conv2d-k3-dilated"])
def test_gradcheck_unfolded_convolution(monkeypatch, name):
    _unfold(monkeypatch, True)
    assert _gradcheck(name, SPECTRAL)


@pytest.mark.parametrize("plan", PLANS, ids=_plan_id)
def test_backward_keeps_no_weight_sized_tensor(monkeypatch, plan):
    _force(monkeypatch, plan)
    layer = nn.Linear(64, 48)
    svdiff.add_shifts(layer, cache=False, progress=False)
    x = torch.randn(4, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        layer(x).sum().backward()
    assert torch.Size([48, 64]) not in saved  # x, d and x·V only; W + ΔW is rebuilt in backward


def test_plan_follows_flops():
    wide = nn.Conv2d(64, 64, 3, padding=1)
    svdiff.add_shifts(wide, cache=False, progress=False)
    shift = wide.spectral_shift
    many = torch.randn(2, 64, 64, 64, device="meta", requires_grad=True)
    few = torch.randn(1, 64, 2, 2, device="meta", requires_grad=True)
    assert shift.kind.plan(wide, shift, many, False).forward is Route.REBUILD  # many tokens share one weight
    assert shift.kind.plan(wide, shift, few, False).forward is Route.FACTORED  # a big matrix for four tokens
    # while δ trains, a 3×3 convolution runs through its factors: x·V is the convolution itself
    assert shift.kind.plan(wide, shift, many, True) == SPECTRAL
    square = nn.Linear(64, 64)
    svdiff.add_shifts(square, cache=False, progress=False)
    tokens = torch.randn(4096, 64, device="meta", requires_grad=True)
    assert square.spectral_shift.kind.plan(square, square.spectral_shift, tokens, True) != SPECTRAL  # 2× the op
    low = nn.Conv2d(64, 64, 3, padding=1).to(torch.bfloat16)
    svdiff.add_shifts(low, cache=False, progress=False)
    coarse = many.to(torch.bfloat16)
    assert low.spectral_shift.kind.plan(low, low.spectral_shift, coarse, True) != SPECTRAL  # bf16: exact plans only


def test_sum_and_interpolation_identities():
    """Eq. 4: two sets at scale 1 act as one set δ1 + δ2. Eq. 5: scales α, 1−α act as αδ1 + (1−α)δ2."""
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 6, 3, padding=1)
    one = copy.deepcopy(layer)
    a = svdiff.add_shifts(layer, name="a", cache=False, progress=False)
    b = svdiff.add_shifts(layer, name="b", cache=False, progress=False)
    single = svdiff.add_shifts(one, cache=False, progress=False)
    _randomize(a, seed=1)
    _randomize(b, seed=2)
    (da,), (db,), (ds,) = a.values(), b.values(), single.values()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        ds.copy_(da + db)
        torch.testing.assert_close(layer(x), one(x))
        alpha = 0.3
        svdiff.set_scales(layer, {"a": alpha, "b": 1 - alpha})
        ds.copy_(alpha * da + (1 - alpha) * db)
        torch.testing.assert_close(layer(x), one(x))


def test_fuse_unfuse_restore_and_match():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Conv2d(8, 4, 1))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    params = svdiff.add_shifts(model, cache=False, progress=False)
    _randomize(params)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        y = model(x)
        svdiff.fuse(model)
        assert not torch.equal(model[0].weight, weights["0.weight"])
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
        svdiff.set_scales(model, {"default": 0.5})  # re-fuses at the new scale
        svdiff.unfuse(model)
        y_half = model(x)
        svdiff.fuse(model)
        torch.testing.assert_close(model(x), y_half, rtol=1e-5, atol=1e-5)
        svdiff.unfuse(model)
    for k, v in weights.items():
        assert torch.equal(model.state_dict()[k], v)


def test_remove_shifts_restores_modules_and_bits():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 9), nn.LayerNorm(9), nn.Linear(9, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 5)
    y = model(x)
    params = svdiff.add_shifts(model, cache=False, progress=False)
    assert set(params) == {"0.weight", "1.weight", "2.weight"}
    assert all(not k.endswith((".U", ".S", ".Vh")) for k in model.state_dict())  # factors are not state
    _randomize(params)
    svdiff.fuse(model)
    svdiff.remove_shifts(model)
    assert list(model.state_dict()) == list(before)
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert not shifted_modules(model)
    assert torch.equal(model(x), y)


def test_presets_include_exclude_and_errors():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Conv2d(4, 4, 3))
    assert [t.name for t in find_targets(model, "unet-1d")] == ["1.weight"]
    assert [t.name for t in find_targets(model, "all", include=[r"^[02]\."], exclude=[r"^2"])] == ["0.weight"]
    with pytest.raises(svdiff.SvdiffError, match="unknown preset"):
        find_targets(model, "everything")
    with pytest.raises(svdiff.SvdiffError, match="bad include"):
        find_targets(model, include=["("])


def test_second_set_reuses_factors_and_duplicate_name_is_refused():
    layer = nn.Linear(6, 6)
    svdiff.add_shifts(layer, cache=False, progress=False)
    u = layer.spectral_shift.U
    svdiff.add_shifts(layer, name="other", cache=False, progress=False)
    assert layer.spectral_shift.U is u
    with pytest.raises(ValueError, match="already exists"):
        svdiff.add_shifts(layer, name="other", cache=False, progress=False)


def test_low_precision_factors():
    torch.manual_seed(0)
    layer = nn.Linear(16, 12)
    base = copy.deepcopy(layer)
    ref = copy.deepcopy(layer)
    p16 = svdiff.add_shifts(layer, factor_dtype=torch.bfloat16, cache=False, progress=False)
    p32 = svdiff.add_shifts(ref, cache=False, progress=False)
    assert layer.spectral_shift.U.dtype == torch.bfloat16
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), base(x))  # exact at δ = 0 whatever the factor precision
    _randomize(p16)
    _randomize(p32)
    torch.testing.assert_close(layer(x), ref(x), rtol=3e-2, atol=3e-2)


def test_half_precision_base():
    torch.manual_seed(0)
    layer = nn.Linear(16, 12).to(torch.bfloat16)
    base = copy.deepcopy(layer)
    params = svdiff.add_shifts(layer, cache=False, progress=False)
    assert next(iter(params.values())).dtype == torch.float32  # δ trains in fp32
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    assert torch.equal(layer(x), base(x))
    _randomize(params)
    layer(x).float().sum().backward()
    assert next(iter(params.values())).grad is not None


def test_works_on_meta_tensors():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.GroupNorm(2, 8), nn.Linear(6, 5))
    params = svdiff.add_shifts(model, cache=False, progress=False)
    assert {k: p.shape[0] for k, p in params.items()} == {"0.weight": 8, "1.weight": 8, "2.weight": 5}
    for p in params.values():
        p.requires_grad_(True)
    y = model(torch.randn(2, 4, 8, 8, device="meta"))
    assert y.shape == (2, 8, 6, 5) and y.is_meta
    y.sum().backward()


def test_spectral_shift_is_a_module_child():
    layer = nn.Linear(3, 3)
    svdiff.add_shifts(layer, cache=False, progress=False)
    assert isinstance(layer.spectral_shift, SpectralShift)
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias", "spectral_shift.deltas.default"]


def test_engine_matches_svd_and_falls_back_on_rank_deficient():
    torch.manual_seed(0)
    mats = [
        torch.randn(20, 50),
        torch.randn(50, 20),
        torch.randn(6, 3) @ torch.randn(3, 9),
        torch.zeros(4, 5),
    ]
    for a, b in zip(mats, decompose(mats), strict=True):
        torch.testing.assert_close(b.S, torch.linalg.svdvals(a), rtol=1e-5, atol=1e-5)
        assert torch.all(b.S[:-1] >= b.S[1:])
        torch.testing.assert_close(b.U @ torch.diag(b.S) @ b.Vh, a, rtol=1e-5, atol=1e-5)
        r = b.rank
        torch.testing.assert_close(b.U.T @ b.U, torch.eye(r), rtol=0, atol=1e-5)
        torch.testing.assert_close(b.Vh @ b.Vh.T, torch.eye(r), rtol=0, atol=1e-5)
        peak = b.U.abs().argmax(0)
        assert torch.all(b.U[peak, torch.arange(r)] > 0)  # deterministic signs


def _with_spectrum(m, n, sigma, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(sigma), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(sigma), generator=g, dtype=torch.float64))
    return ((u * torch.tensor(sigma, dtype=torch.float64)) @ v.T).float()


@pytest.mark.parametrize(
    "case",
    ["well-conditioned", "ill-conditioned", "rank-deficient", "zero", "tall-ill-conditioned"],
)
def test_engine_tiers_stay_accurate(case):
    """float32 Gram for easy matrices, float64 when κ² defeats float32, a full SVD when σ reaches 0."""
    mat = {
        "well-conditioned": _with_spectrum(8, 80, torch.linspace(2, 1, 8).tolist()),
        "ill-conditioned": _with_spectrum(8, 80, torch.logspace(0, -3, 8).tolist()),
        "rank-deficient": _with_spectrum(8, 80, [3.0, 2.0, 1.0] + [0.0] * 5),
        "zero": torch.zeros(8, 80),
        "tall-ill-conditioned": _with_spectrum(90, 6, torch.logspace(0, -3, 6).tolist()),
    }[case]
    (b,) = decompose([mat])
    torch.testing.assert_close(b.S, torch.linalg.svdvals(mat.double()).float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close((b.U * b.S) @ b.Vh, mat, rtol=0, atol=1e-5)
    torch.testing.assert_close(b.U.T @ b.U, torch.eye(b.rank), rtol=0, atol=1e-5)
    torch.testing.assert_close(b.Vh @ b.Vh.T, torch.eye(b.rank), rtol=0, atol=1e-5)


def test_fused_model_refuses_changes_and_training():
    layer = nn.Linear(6, 6)
    params = svdiff.add_shifts(layer, cache=False, progress=False)
    _randomize(params)
    svdiff.fuse(layer)
    with pytest.raises(svdiff.SvdiffError, match="unfuse"):
        svdiff.add_shifts(layer, name="b", cache=False, progress=False)
    with pytest.raises(svdiff.SvdiffError, match="unfuse"):
        svdiff.set_deltas(layer, {"weight": torch.zeros(6)})
    assert "forward" not in layer.__dict__  # a fused layer runs its own forward: no overhead
    svdiff.unfuse(layer)
    assert "forward" in layer.__dict__


def test_half_keeps_sigma_and_delta_in_float32():
    torch.manual_seed(0)
    layer = nn.Linear(32, 24)
    params = svdiff.add_shifts(layer, cache=False, progress=False)
    _randomize(params, std=2e-3)
    d32 = layer.spectral_shift.diagonal_change().detach().clone()
    layer.half()
    assert layer.weight.dtype == torch.float16
    assert layer.spectral_shift.S.dtype == torch.float32 and params["weight"].dtype == torch.float32
    assert torch.equal(layer.spectral_shift.diagonal_change().detach(), d32)


def test_unbatched_conv_input():
    layer = nn.Conv2d(3, 5, 3, padding=1)
    params = svdiff.add_shifts(layer, cache=False, progress=False)
    _randomize(params)
    x = torch.randn(3, 6, 6)
    torch.testing.assert_close(layer(x), layer(x[None])[0])


def test_tied_weights_are_shifted_once_and_restored():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    before = emb.weight.detach().clone()
    params = svdiff.add_shifts(model, cache=False, progress=False)
    assert list(params) == ["emb.weight"]
    _randomize(params)
    svdiff.fuse(model)
    svdiff.unfuse(model)
    assert torch.equal(emb.weight, before)
