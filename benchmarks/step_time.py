"""One training step of a denoiser, side by side in one run: the frozen base, PEFT LoRA r4 (attention, as
diffusers' DreamBooth script) and r16 (every Linear), svdiff merged once per step in shape groups, svdiff per call
(today's layers) and a naive rebuild of every weight on every forward; optionally each compiled too.

    python benchmarks/step_time.py --model sd15 --device cuda --dtype bf16 --resolution 512 --batch 2 --compile
    python benchmarks/step_time.py --model flux --device cuda --dtype bf16 --flux_layers 2 2 --resolution 512 --compile
    python benchmarks/step_time.py --model tiny --device cpu --dtype fp32 --resolution 64 --batch 1

Per method: median / p10 / p90 step time over `--steps` steps after `--warmup`; the host's time to the end of
`backward()` (unsynchronized) beside the summed kernel time from torch.profiler (a step whose host time reaches
its kernel time is CPU-bound); aten ops per step (a dispatch-mode count, views included) and, on a GPU, kernels
per step from the profiler; peak memory on a GPU. For svdiff merged also: the merge's and the projection's time
and achieved TFLOP/s, the δ-gradient agreement with the per-call path on the same δ and batch, and whether δ = 0
gives W′ == W and the frozen output bit for bit. Base weights in `--dtype` (frozen), δ and LoRA in float32,
the SVD factors in the weights' dtype. A step is forward, loss, backward, AdamW (foreach) and zero_grad; the
frozen step carries activation gradients through the network instead.
"""

import argparse
import statistics
import time

import torch
from torch import nn
from torch.nn.utils import parametrize

import svdiff
from step_flops import NaiveRebuild
from svdiff.spectral import shifted_modules
from svdiff.spectral.dispatch import AtenOps
from svdiff.spectral.merged import MergedShifts

from common import emit, machine, sync

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
METHODS = ("frozen", "lora_r4_attn", "lora_r16_linear", "svdiff_merged", "svdiff_per_call", "naive_rebuild")
ATTENTION = ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out"]


def build(args) -> tuple[nn.Module, dict]:
    """The denoiser (random weights, no download) and one batch of its inputs."""
    dtype, device = DTYPES[args.dtype], args.device
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    if args.model == "flux":
        from diffusers import FluxTransformer2DModel

        torch.manual_seed(0)
        model = FluxTransformer2DModel(
            num_layers=args.flux_layers[0],
            num_single_layers=args.flux_layers[1],
            num_attention_heads=args.flux_heads,
            axes_dims_rope=(16, 56, 56),
            guidance_embeds=True,
        )  # Flux.1's width by default: 24 heads of 128, joint attention 4096, pooled 768; fewer blocks
        side = args.resolution // 16  # 8× VAE, then 2×2 patches
        ids = torch.zeros(side, side, 3)
        ids[..., 1] = torch.arange(side)[:, None]
        ids[..., 2] = torch.arange(side)[None, :]
        inputs = {
            "hidden_states": rand(args.batch, side * side, 64),
            "encoder_hidden_states": rand(args.batch, 512, 4096),
            "pooled_projections": rand(args.batch, 768),
            "timestep": torch.full((args.batch,), 0.5, device=device, dtype=dtype),
            "img_ids": ids.reshape(-1, 3).to(device, dtype),
            "txt_ids": torch.zeros(512, 3, device=device, dtype=dtype),
            "guidance": torch.full((args.batch,), 3.5, device=device, dtype=dtype),
        }
        first = "hidden_states"
    else:
        if args.model == "tiny":
            from svdiff.models import load_components

            model = load_components(None, device="cpu")["unet"]
            latent = args.resolution // 4
        else:
            from svdiff.models import build_architecture

            model = build_architecture(args.model, device="cpu")["unet"]
            latent = args.resolution // 8
        c = model.config
        inputs = {
            "sample": rand(args.batch, c.in_channels, latent, latent),
            "timestep": torch.full((args.batch,), 500, device=device),
            "encoder_hidden_states": rand(args.batch, 77 if args.model != "tiny" else 8, c.cross_attention_dim),
        }
        first = "sample"
    model = model.to(device, dtype).requires_grad_(False)
    model.train()
    return model, inputs | {"_first": first}


def output(model, inputs):
    kw = {k: v for k, v in inputs.items() if k != "_first"}
    return model(**kw, return_dict=False)[0]


def loss(model, inputs, grad_input: bool):
    first = inputs["_first"]
    x = inputs[first].detach().requires_grad_(grad_input)
    return output(model, inputs | {first: x}).float().pow(2).mean()


def measure(model, inputs, args, params, grad_input: bool) -> dict:
    opt = torch.optim.AdamW(params, lr=1e-6, foreach=True) if params else None

    def step():
        began = time.perf_counter()
        loss(model, inputs, grad_input).backward()
        host = time.perf_counter() - began
        if opt:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return host

    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    times, hosts = [], []
    for _ in range(args.steps):
        sync(args.device)
        began = time.perf_counter()
        hosts.append(step())
        sync(args.device)
        times.append(time.perf_counter() - began)
    q = statistics.quantiles(times, n=10)
    result = {
        "step_s": {"median": statistics.median(times), "p10": q[0], "p90": q[-1]},
        "host_to_end_of_backward_s": statistics.median(hosts),
    }
    if args.device.startswith("cuda"):
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    counter = AtenOps()
    with counter:
        step()
    result["aten_ops_per_step"] = counter.n
    result |= profile(step, args)
    return result


def profile(step, args, steps: int = 3) -> dict:
    """Summed kernel time per step (self time of device kernels on a GPU, of aten ops on a CPU) and kernels per
    step, from torch.profiler."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(args.device)
    events = prof.events()
    if cuda:
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        total_us = sum(e.self_device_time_total for e in kernels)
    else:
        kernels = [e for e in events if e.name.startswith("aten::")]
        total_us = sum(e.self_cpu_time_total for e in kernels)
    return {"kernel_time_s": total_us / 1e6 / steps, "kernels_per_step": len(kernels) / steps}


def lora(model, rank: int, attention_only: bool) -> list:
    from peft import LoraConfig, inject_adapter_in_model

    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    targets = [n for n in linears if any(n.endswith("." + a) for a in ATTENTION)] if attention_only else linears
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets)
    inject_adapter_in_model(config, model)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def random_deltas(model, std=1e-3) -> dict:
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(p.shape, generator=g) * std for k, p in svdiff.get_deltas(model).items()}


def timed(fn, device, repeats=5) -> float:
    fn()
    sync(device)
    began = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - began) / repeats


def merged_extras(model, inputs, args, frozen_out) -> tuple[MergedShifts, dict]:
    """Wires `model` (shifted, δ = 0) for merging; checks exactness, gradient agreement; times merge, projection."""
    ms = MergedShifts(model, choose="merged")
    with torch.no_grad():
        exact_out = torch.equal(output(model, inputs), frozen_out)
    exact_w = all(torch.equal(g.merged, g.base) for g in ms.groups if g.merged is not None)
    svdiff.set_deltas(model, random_deltas(model))
    grads = {}
    for path in ("per-call", "merged"):
        ms.use(path)
        loss(model, inputs, False).backward()
        grads[path] = torch.cat([p.grad.clone() for p in ms.parameters().values()])
        for p in ms.parameters().values():
            p.grad = None
    ref, got = grads["per-call"], grads["merged"]
    agreement = float((got - ref).norm() / ref.norm())
    merged_groups = [g for g in ms.groups if g.path == "merged"]
    merge_s = timed(ms.merge, args.device)
    flops = sum(g.flops() for g in merged_groups)

    def project():
        for g in merged_groups:
            g.merged.grad = torch.ones_like(g.merged)
            ms._project(g, g.merged)

    for p in ms.parameters().values():
        p.grad = torch.zeros_like(p)
    project_s = timed(project, args.device)
    for p in ms.parameters().values():
        p.grad = None
    return ms, {
        "delta_zero_weights_bit_exact": exact_w,
        "delta_zero_output_bit_exact": exact_out,
        "delta_grad_relative_error_vs_per_call": agreement,
        "shape_groups": len(ms.groups),
        "merged_groups": len(merged_groups),
        "merge_s": merge_s,
        "merge_tflops_per_s": flops / merge_s / 1e12,
        "projection_s": project_s,  # includes filling G with ones: a copy per group
        "projection_tflops_per_s": flops / project_s / 1e12,
    }


def setup(method, args):
    """A fresh model for `method`, its trained parameters, whether the input needs a gradient, and extras."""
    model, inputs = build(args)
    extras = {}
    if method == "frozen":
        return model, inputs, [], True, extras
    if method.startswith("lora"):
        rank = 4 if method == "lora_r4_attn" else 16
        return model, inputs, lora(model, rank, attention_only=method == "lora_r4_attn"), False, extras
    with torch.no_grad():
        frozen_out = output(model, inputs)
    svdiff.add_shifts(model, progress=False)
    if method == "svdiff_merged":
        ms, extras = merged_extras(model, inputs, args, frozen_out)
        ms.use("merged")
        return model, inputs, list(ms.parameters().values()), False, extras
    svdiff.set_deltas(model, random_deltas(model))
    params = [s.deltas["default"] for _, s in shifted_modules(model).values()]
    if method == "naive_rebuild":
        for module, shift in shifted_modules(model).values():
            del module._modules["spectral_shift"]
            module.__dict__.pop("forward")
            parametrize.register_parametrization(module, "weight", NaiveRebuild(shift))
    return model, inputs, params, False, extras


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="sd15", help="sd15, another built-in UNet architecture, tiny, or flux")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=DTYPES)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--flux_layers", type=int, nargs=2, default=[2, 4], metavar=("DOUBLE", "SINGLE"))
    ap.add_argument("--flux_heads", type=int, default=24, help="attention heads of 128 (24: Flux.1's width)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--compile", action="store_true", help="also every method with torch.compile of the denoiser")
    ap.add_argument("--compile_backend", default="inductor", help="aot_eager: no kernels compiled (slow CPUs)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    results = {}
    for compiled in (False, True) if args.compile else (False,):
        for method in args.methods:
            if compiled and method == "svdiff_per_call":
                continue  # per-call autograd Functions break the graph; merged is the compiled svdiff path
            model, inputs, params, grad_input, extras = setup(method, args)
            if compiled:
                torch._dynamo.reset()
                model.forward = torch.compile(model.forward, backend=args.compile_backend)
            name = method + ("_compiled" if compiled else "")
            results[name] = measure(model, inputs, args, params, grad_input) | extras
            print(name, round(results[name]["step_s"]["median"], 4), flush=True)
            del model, inputs, params
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    ratios = {}
    for suffix in ("", "_compiled"):
        frozen = results.get("frozen" + suffix, {}).get("step_s", {}).get("median")
        for k, v in results.items():
            if frozen and k.endswith(suffix) and (suffix or not k.endswith("_compiled")):
                ratios[f"{k}_over_frozen"] = v["step_s"]["median"] / frozen
        r16 = results.get("lora_r16_linear" + suffix, {}).get("step_s", {}).get("median")
        if r16 and "svdiff_merged" + suffix in results:
            ratios[f"svdiff_merged{suffix}_over_lora_r16"] = results["svdiff_merged" + suffix]["step_s"]["median"] / r16
    emit(
        {
            "benchmark": "step_time",
            "settings": vars(args),
            "results": results,
            "ratios": ratios,
            "machine": machine(args.device),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
