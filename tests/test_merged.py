"""Merged training (spectral/merged.py): exactness, agreement with the per-call path, flat δ seen per target, the
path choice, compiling, and the aten ops a step issues."""

import copy

import pytest
import torch
from torch import nn

import svdiff
from svdiff.spectral import merged as merged_mod
from svdiff.spectral import shifted_modules
from svdiff.spectral.dispatch import AtenOps
from svdiff.spectral.merged import MergedShifts, StepPath
from tiny_models import tiny_text_encoder, tiny_unet


def _inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([10, 500][:batch]), torch.randn(batch, 5, 16)


def _pair(seed=0, std=0.1):
    """Two copies of one tiny UNet with the same random δ: per-call (today's layers) and wired for merging."""
    torch.manual_seed(seed)
    base = tiny_unet()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    pa = svdiff.add_shifts(a, cache=False, progress=False)
    svdiff.add_shifts(b, cache=False, progress=False)
    g = torch.Generator().manual_seed(seed + 1)
    values = {k: torch.randn(p.shape, generator=g) * std for k, p in pa.items()}
    svdiff.set_deltas(a, values)
    svdiff.set_deltas(b, values)
    return base, a, pa, b


def _flat_grads(ms: MergedShifts) -> dict[str, torch.Tensor]:
    """Each target's part of the flat gradients."""
    out = {}
    for g in ms.groups:
        grad = ms.flat["vector" if g.vector else "matrix"].grad
        for i, (name, shift) in enumerate(zip(g.names, g.shifts, strict=True)):
            out[name] = grad[g.start + i * shift.length : g.start + (i + 1) * shift.length]
    return out


def _close(grads, ref, rtol=1e-4):
    worst = max(float((grads[k] - ref[k].grad).abs().max() / (ref[k].grad.abs().max() + 1e-12)) for k in ref)
    assert worst < rtol, worst


def test_zero_delta_gives_the_base_weights_and_outputs_bit_for_bit():
    torch.manual_seed(0)
    base = tiny_unet()
    model = copy.deepcopy(base)
    svdiff.add_shifts(model, cache=False, progress=False)
    ms = MergedShifts(model, choose="merged")
    assert all(g.path == "merged" for g in ms.groups)
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(model(*x).sample, base(*x).sample)
    assert all(torch.equal(g.merged, g.base) for g in ms.groups)
    out = model(*x).sample  # with gradients too
    assert torch.equal(out, base(*x).sample)


def test_per_call_groups_copy_nothing_and_merged_groups_view_their_stacks():
    """On the per-call path (a CPU's) the layers keep their own weights and factors; a group stacks them only when
    it goes on the merged path, and then every layer's tensors are views of its group's stacks."""
    torch.manual_seed(0)
    model = tiny_unet()
    svdiff.add_shifts(model, cache=False, progress=False)
    shifted = shifted_modules(model)

    def pointers():
        matrices = {k: (m, s) for k, (m, s) in shifted.items() if not s.kind.is_vector}
        return {k: (m.weight.data_ptr(), s.U.data_ptr(), s.Vh.data_ptr()) for k, (m, s) in matrices.items()}

    before = pointers()
    ms = MergedShifts(model, choose="per-call")
    assert pointers() == before and all(g.base is None for g in ms.groups)
    ms.use("merged")
    merged = [g for g in ms.groups if g.path == "merged"]
    assert merged and all(g.base is not None for g in merged)
    for g in merged:
        for i, (module, shift) in enumerate(zip(g.modules, g.shifts, strict=True)):
            assert module.weight.data_ptr() == g.base[i].data_ptr()
            if not g.vector:
                assert shift.U.data_ptr() == g.U[i].data_ptr() and shift.Vh.data_ptr() == g.Vh[i].data_ptr()


def test_text_encoder_with_embeddings_is_bit_exact_at_zero_and_trains():
    torch.manual_seed(0)
    # float64: in float32 the per-call reference runs its layers on their factors (the SPECTRAL plan), whose
    # round-off the attention amplifies to ~1e-3 in these tiny gradients
    base = tiny_text_encoder().double()
    model = copy.deepcopy(base)
    ref = copy.deepcopy(base)
    svdiff.add_shifts(model, cache=False, progress=False)
    pr = svdiff.add_shifts(ref, cache=False, progress=False)
    ms = MergedShifts(model, choose="merged")
    assert "Embedding" in {g.key[0] for g in ms.groups}
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(3))
    assert torch.equal(model(ids)[0], base(ids)[0])
    model(ids)[0].pow(2).mean().backward()
    ref(ids)[0].pow(2).mean().backward()
    _close(_flat_grads(ms), pr)


@pytest.mark.parametrize("choose", ["merged", "per-call"])
def test_gradients_agree_with_the_per_call_path_over_accumulation_and_steps(choose):
    _, a, pa, b = _pair()
    ms = MergedShifts(b, choose=choose)
    flats = list(ms.parameters().values())
    opt_a = torch.optim.AdamW(list(pa.values()), lr=1e-2, foreach=True)
    opt_b = torch.optim.AdamW(flats, lr=1e-2, foreach=True)
    for step in range(3):
        for micro in range(2):  # gradient accumulation: the projections add up
            x = _inputs(seed=10 * step + micro)
            la, lb = a(*x).sample.pow(2).mean(), b(*x).sample.pow(2).mean()
            torch.testing.assert_close(lb, la, rtol=1e-5, atol=0)
            la.backward()
            lb.backward()
        _close(_flat_grads(ms), pa)
        opt_a.step()
        opt_b.step()  # the flat parameters change: the next forward merges again
        opt_a.zero_grad(set_to_none=True)
        opt_b.zero_grad(set_to_none=True)
    got = svdiff.get_deltas(b)
    for k, p in pa.items():
        torch.testing.assert_close(got[k], p.detach(), rtol=1e-4, atol=1e-6)


def test_per_target_deltas_are_views_of_the_flat_parameters():
    _, a, pa, b = _pair()
    ms = MergedShifts(b, choose="merged")
    x = _inputs()
    with torch.no_grad():
        before = b(*x).sample
        # what checkpoints and shift files do: read and write δ per target
        assert all(torch.equal(svdiff.get_deltas(b)[k], pa[k]) for k in pa)
        values = {k: p * 2 for k, p in pa.items()}
        svdiff.set_deltas(a, values)
        svdiff.set_deltas(b, values)  # written through the views: the next forward merges again
        after = b(*x).sample
        torch.testing.assert_close(after, a(*x).sample, rtol=1e-4, atol=1e-5)
    assert not torch.equal(before, after)
    flat = ms.parameters()["matrix"]
    shift = next(s for _, s in shifted_modules(b).values() if not s.kind.is_vector)
    assert shift.deltas["default"].untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()


def test_merged_run_writes_the_same_shift_file(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from svdiff.adapters import save_shifts

    _, a, _, b = _pair()
    MergedShifts(b, choose="merged")
    save_shifts(tmp_path / "a.safetensors", {"unet": a}, base_model="tiny", preset="all", dtype="fp32")
    save_shifts(tmp_path / "b.safetensors", {"unet": b}, base_model="tiny", preset="all", dtype="fp32")
    ta, tb = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    meta = [safe_open(tmp_path / f, "pt").metadata() for f in ("a.safetensors", "b.safetensors")]
    assert meta[0] == meta[1]  # (the header's key order is the writer's hash order, so bytes are not compared)


def test_auto_times_each_group_and_keeps_the_faster(monkeypatch):
    _, a, pa, b = _pair()
    calls = []

    def fake_timed(fn, device):  # merged is timed first, then per call: merged wins on even groups
        calls.append(fn)
        group = (len(calls) - 1) // 2
        return (1.0 if len(calls) % 2 else 2.0) if group % 2 == 0 else (2.0 if len(calls) % 2 else 1.0)

    monkeypatch.setattr(merged_mod, "_timed", fake_timed)
    lines = []
    ms = MergedShifts(b, choose="auto", report=lines.append)
    x = _inputs()
    b(*x).sample.pow(2).mean().backward()
    paths = [g.path for g in ms.groups]
    assert paths == [StepPath.MERGED if i % 2 == 0 else StepPath.PER_CALL for i in range(len(ms.groups))]
    assert all("merged_ms" in p and "per_call_ms" in p for p in ms.paths())
    assert len(lines) == 1 and "shape groups merged" in lines[0]
    a(*x).sample.pow(2).mean().backward()
    _close(_flat_grads(ms), pa)  # both kinds of group, and the timing runs left no gradient behind


def test_compiles_without_a_graph_break():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 8), nn.Linear(8, 3))
    ref = copy.deepcopy(model)
    svdiff.add_shifts(model, cache=False, progress=False)
    pr = svdiff.add_shifts(ref, cache=False, progress=False)
    svdiff.set_deltas(ref, {k: torch.randn(p.shape) * 0.1 for k, p in pr.items()})
    svdiff.set_deltas(model, svdiff.get_deltas(ref))
    ms = MergedShifts(model, choose="merged")
    torch._dynamo.reset()
    # aot_eager: dynamo and AOTAutograd as inductor would see them, without compiling kernels on a 2-core machine
    model.forward = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 6)
    for _ in range(2):  # the second call reuses the graph with fresh views of W′
        out = model(x)
        out.pow(2).mean().backward()
    ref(x).pow(2).mean().backward()
    ref(x).pow(2).mean().backward()
    torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-6)
    _close(_flat_grads(ms), pr)


def _ops_per_step(unet, optimizer, input_grad: bool) -> int:
    def step():
        x = torch.randn(2, 4, 64, 64, device="meta", requires_grad=input_grad)
        t = torch.full((2,), 500, device="meta")
        text = torch.randn(2, 77, 768, device="meta")
        unet(x, t, text).sample.float().pow(2).mean().backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step()  # the first step merges and allocates; count a steady one
    counter = AtenOps()
    with counter:
        step()
    return counter.n


def test_a_merged_step_issues_at_most_1_3_times_the_frozen_steps_aten_ops():
    """SD 1.5's UNet at 512 px, batch 2, on meta tensors: every aten op the step dispatches, views included,
    forward, backward and AdamW. The frozen step carries activation gradients through the network."""
    from svdiff.models import build_architecture

    unet = build_architecture("sd15", device="meta")["unet"]
    frozen = _ops_per_step(unet, None, input_grad=True)
    svdiff.add_shifts(unet, cache=False, progress=False)
    ms = MergedShifts(unet, choose="merged")
    optimizer = torch.optim.AdamW(list(ms.parameters().values()), lr=1e-3, foreach=True)
    merged = _ops_per_step(unet, optimizer, input_grad=False)
    assert merged <= 1.3 * frozen, (merged, frozen, merged / frozen)


def test_the_chosen_paths_come_back_from_a_checkpoint(monkeypatch):
    _, _, _, b = _pair()
    monkeypatch.setattr(merged_mod, "_timed", lambda fn, device: float(id(fn) % 7))  # some choice per group
    ms = MergedShifts(b, choose="auto")
    b(*_inputs()).sample.pow(2).mean().backward()
    state = ms.state_dict()
    assert {type(p) for p in state["paths"]} == {str}  # the values `--step_path` takes, not a class of ours
    _, _, _, c = _pair()

    def no_timing(fn, device):
        raise AssertionError("a restored choice is not timed again")

    monkeypatch.setattr(merged_mod, "_timed", no_timing)
    restored = MergedShifts(c, choose="auto")
    restored.load_state_dict(state)
    c(*_inputs()).sample.pow(2).mean().backward()
    assert [g.path for g in restored.groups] == [g.path for g in ms.groups]


def test_a_merged_run_with_accumulation_resumes_bit_exact(tmp_path):
    import shutil

    from safetensors.torch import load_file

    from svdiff.train import train
    from tiny_models import quick

    flags = dict(
        step_path="merged", gradient_accumulation_steps=2, max_train_steps=4, checkpointing_steps=2, save_dtype="fp32"
    )
    train(quick(None, tmp_path / "whole", **flags))
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    train(quick(None, tmp_path / "resumed", resume_from_checkpoint="latest", **flags))
    train(quick(None, tmp_path / "per-call", **flags | {"step_path": "per-call"}))
    whole, resumed, per_call = (
        load_file(tmp_path / run / "svdiff_weights.safetensors") for run in ("whole", "resumed", "per-call")
    )
    assert whole.keys() == resumed.keys() == per_call.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    # the same training either way, to float rounding over four steps
    assert max(float((whole[k] - per_call[k]).abs().max()) for k in whole) < 1e-4
    assert any(float(whole[k].abs().max()) > 0 for k in whole)
