#!/usr/bin/env python
"""Dense vs 2:4 sparse at the same dtype, side by side in one run: fp16 against fp16
(PyTorch semi-structured, cuSPARSELt/CUTLASS) and FP8 against dense FP8.

    python bench/sparse24.py --only linear          # on a CUDA machine; one group per call
    python bench/sparse24.py --only block
    python bench/sparse24.py --only e2e
    python bench/sparse24.py --only percall
    python bench/sparse24.py --cpu-smoke            # tiny shapes on CPU, exercises the code only

Arms. fp16: dense nn.Linear (cuBLAS) vs `pruning.sparse_exec.to_semi_structured`.
FP8: both arms quantise the weight per output channel and the activations per token
to e4m3 (pruning.fp8) and run an FP8 tensor-core matmul: dense `torch._scaled_mm` vs
a 2:4 FP8 kernel (`pruning.sparse_exec.to_fp8`: torchao's CUTLASS sm90 kernel when
torchao is importable, else cuSPARSELt FP8); activations outside the linears bf16.
A kernel that cannot run is recorded with its reason in `fp8_kernels` and in the
case's `error`; nothing is estimated.

Cases (GPU): single linears of Llama-2-7B/70B shapes (d_out x d_in 4096x4096,
11008x4096, 4096x11008, 28672x8192) at 16..16384 tokens; one LlamaDecoderLayer of
the Llama-2-7B config at 1x2048 and 16x2048 (prefill) and 1x1 (decode step, no KV
cache); a whole random 7B-shaped model: a 1x2048 prefill and greedy decode. `percall`
profiles single calls of each arm and says whether the 2:4 weight is re-compressed
(or an algorithm searched) per call and which copies and pads run per call.

Cold L2: a linear's or block's weights and inputs are built in as many copies as it
takes for the other copies to span more than `rotate_bytes` (256 MiB; the H100's L2
is 50 MB), and the timed loop cycles through the copies, so no call finds its
operands in L2. A 7B model (13 GB of weights per forward) is cold by size.
Timing: conversion and output checks happen before; warm-up calls are discarded;
CUDA events around a batch of calls; median of repeats. speedup = dense_ms /
sparse_ms (> 1: sparse faster). The `target` entry says whether FP8 2:4 reached 1.3x
over dense FP8 on the 28672x8192 linear at >= 2048 tokens.

Also measures sizes: packed / dense bytes of a 7B decoder block's linear weights in
the project's formats (pruning/packing.py), `packed` and `packed-fp8`.

Writes bench/results/sparse24.json after every case group; a rerun skips cases
already measured on the same device and torch version (--force redoes them).
Without CUDA (or with --cpu-smoke) it runs tiny shapes and writes no timings:
`cases: []` and a note naming the command that fills them.

Imports only torch, transformers, safetensors and the project's `pruning` package
(torchao if present), so it runs on the GPU machine as it is.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (tests), not run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, git_commit  # noqa: E402  (also puts REPO on sys.path)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from pruning.masks import nm_mask  # noqa: E402
from pruning.packing import flatten_packed, pack_nm, pack_nm_fp8, packed_size_report  # noqa: E402
from pruning.discovery import prunable_linear_names  # noqa: E402
from pruning.sparse_exec import FP8_KERNELS, fp8_unavailable_reason, to_fp8, to_semi_structured  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "sparse24.json"
FILL_COMMAND = "python bench/sparse24.py --only GROUP  (GROUP: linear, block, e2e, percall; one call each)"
NO_GPU_DEVICE = "none (no GPU available in this session)"
SMOKE_DEVICE = "none (CPU smoke run; no GPU timings taken)"
GROUPS = ("linear", "block", "e2e", "percall")
TARGET = {"case_prefix": "linear 28672x8192", "min_tokens": 2048, "dtype": "fp8", "speedup": 1.3}

# Llama-2-7B's architecture (hub config values); weights are random.
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 max_position_embeddings=4096, rms_norm_eps=1e-5, hidden_act="silu",
                 tie_word_embeddings=False)
TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False)

# The two comparisons: the dtype of the model around the linears, and how each arm runs them.
DTYPES = {
    "fp16": dict(model_dtype=torch.float16, dense="fp16 nn.Linear (cuBLAS)", sparse="to_semi_structured"),
    "fp8": dict(model_dtype=torch.bfloat16, dense="to_fp8 dense (torch._scaled_mm)", sparse="to_fp8 2:4"),
}

# Everything that differs between the real run and the smoke run.
PLANS = {
    "gpu": dict(config=LLAMA2_7B, model_label="7b",
                linear_shapes=[(4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192)],
                linear_tokens=[16, 64, 256, 1024, 2048, 4096, 16384],
                blocks=[("prefill", 1, 2048), ("prefill", 16, 2048), ("decode", 1, 1)],
                e2e_prompt=128, e2e_new_tokens=128, e2e_prefill=2048,
                percall_shape=(4096, 4096), percall_tokens=[16, 2048],
                rotate_bytes=256 * 2**20,
                timing=dict(warmup=5, target_ms=300.0, repeats=5, max_iters=500)),
    "smoke": dict(config=TINY, model_label="tiny",
                  linear_shapes=[(64, 128)], linear_tokens=[1, 16],
                  blocks=[("prefill", 1, 16), ("decode", 1, 1)],
                  e2e_prompt=8, e2e_new_tokens=4, e2e_prefill=16,
                  percall_shape=(64, 128), percall_tokens=[16],
                  rotate_bytes=64 * 2**10,
                  timing=dict(warmup=1, target_ms=1.0, repeats=1, max_iters=2)),
}


# ---------------------------------------------------------------- helpers

def make_24_(weight: torch.Tensor) -> None:
    """Zero all but the 2 largest magnitudes in every group of 4 inputs, in place."""
    with torch.no_grad():
        weight.mul_(nm_mask(weight.abs().float(), 2, 4))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float(), want.float()
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


def seeded_randn(*shape, seed: int, device, dtype) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, generator=generator, device=device, dtype=dtype)


class Timer:
    """Steady-state time of one call in ms: warm-up, then median over repeats of
    (time of `iters` back-to-back calls) / iters; CUDA events on GPU.

    Given a list of callables (copies of one workload on different memory), the
    calls cycle through them, so with enough copies every call starts with a cold L2.
    """

    def __init__(self, device: torch.device, warmup: int, target_ms: float, repeats: int, max_iters: int):
        self.cuda = device.type == "cuda"
        self.warmup, self.target_ms, self.repeats, self.max_iters = warmup, target_ms, repeats, max_iters

    def _elapsed_ms(self, fns, iters: int) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(iters):
                fns[i % len(fns)]()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        for i in range(iters):
            fns[i % len(fns)]()
        return (time.perf_counter() - begin) * 1e3

    def __call__(self, fns) -> float:
        fns = list(fns) if isinstance(fns, (list, tuple)) else [fns]
        for i in range(max(self.warmup, len(fns))):  # every copy at least once
            fns[i % len(fns)]()
        one = self._elapsed_ms(fns, len(fns)) / len(fns)
        iters = max(len(fns), min(self.max_iters, int(self.target_ms / max(one, 1e-3))))
        return statistics.median(self._elapsed_ms(fns, iters) / iters for _ in range(self.repeats))


def copies_for(bytes_per_copy: int, rotate_bytes: int) -> int:
    """Copies of a workload such that, between two uses of one copy, the others
    touch more than rotate_bytes (so the reused copy has left the L2)."""
    return 1 + math.ceil(rotate_bytes / max(1, bytes_per_copy))


def allocated_bytes(device: torch.device, tensors=()) -> int:
    """Bytes in use: the CUDA allocator's count on GPU, else the given tensors' sizes."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    return sum(t.numel() * t.element_size() for t in tensors)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def case_result(name: str, dense_ms: float, sparse_ms: float | None, unit: str, **extra) -> dict:
    result = {"case": name, "dense_ms": round(dense_ms, 4),
              "sparse_ms": None if sparse_ms is None else round(sparse_ms, 4),
              "speedup": None if not sparse_ms else round(dense_ms / sparse_ms, 3), "unit": unit}
    result.update(extra)
    return result


def llama_config(values: dict):
    from transformers import LlamaConfig
    # sdpa is what from_pretrained would pick; set it so a bare layer uses it too.
    return LlamaConfig(**values, attn_implementation="sdpa")


def convert_arm(dtype_name: str, arm: str, module: nn.Module, layer_names: list[str], check: bool) -> dict:
    """Make `module`'s linears run as the arm says; returns the conversion report
    ({"converted", "fell_back", "kernel"}). The fp16 dense arm is the module as it is."""
    if dtype_name == "fp16":
        if arm == "dense":
            return {"converted": list(layer_names), "fell_back": {}, "kernel": "cublas fp16"}
        report = to_semi_structured(module, layer_names=layer_names, check=check)
        return {**report, "kernel": f"{report['backend']} fp16 2:4"}
    return to_fp8(module, "dense" if arm == "dense" else "sparse", layer_names=layer_names, check=check)


def arm_error(report: dict) -> str | None:
    """Why an arm cannot be timed as itself (a layer stayed unconverted), or None."""
    if not report["fell_back"]:
        return None
    name, reason = next(iter(report["fell_back"].items()))
    return f"{len(report['fell_back'])} layer(s) not converted, e.g. {name}: {reason}"


class Holder(nn.Module):
    """One linear as a submodule named `linear`, so the model converters can swap it."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear


# ---------------------------------------------------------------- cases

def linear_cases(plan, pending, device, dtypes, timer) -> list[dict]:
    results = []
    for d_out, d_in in plan["linear_shapes"]:
        for dname in dtypes:
            names = {t: f"linear {d_out}x{d_in} t{t} {dname}" for t in plan["linear_tokens"]}
            if not any(name in pending for name in names.values()):
                continue
            dtype = DTYPES[dname]["model_dtype"]
            torch.manual_seed(0)
            base = torch.randn(d_out, d_in, device=device, dtype=dtype)
            make_24_(base)
            measured: dict[str, dict] = {}
            for arm in ("dense", "sparse"):
                measured[arm] = _time_linear_arm(plan, names, pending, dname, arm, base, device, timer)
            del base
            free_memory()
            for t, name in names.items():
                if name not in pending:
                    continue
                dense, sparse = measured["dense"], measured["sparse"]
                extra = {"dtype": dname, "tokens": t, "dense_kernel": dense["kernel"],
                         "sparse_kernel": sparse["kernel"]}
                if "error" in dense or "error" in sparse:
                    error = dense.get("error") or sparse.get("error")
                    dense_ms = dense.get(t, {}).get("ms", float("nan"))
                    results.append(case_result(name, dense_ms, None, "ms per call", error=error, **extra))
                    continue
                flops = 2.0 * t * d_in * d_out
                extra.update({
                    "max_rel_err": rel_err(sparse[t]["out"], dense[t]["out"]),
                    "dense_tflops": round(flops / dense[t]["ms"] / 1e9, 1),
                    "sparse_tflops_dense_equivalent": round(flops / sparse[t]["ms"] / 1e9, 1),
                    "l2": {"cold": True, "dense_copies": dense[t]["copies"], "sparse_copies": sparse[t]["copies"],
                           "rotated_mib": {"dense": dense[t]["rotated_mib"], "sparse": sparse[t]["rotated_mib"]}},
                })
                if "searched_alg_ms" in sparse[t]:
                    extra["sparse_ms_searched_alg"] = sparse[t]["searched_alg_ms"]
                results.append(case_result(name, dense[t]["ms"], sparse[t]["ms"], "ms per call", **extra))
    return results


def _time_linear_arm(plan, names, pending, dname, arm, base, device, timer) -> dict:
    """Time one arm of one linear at every pending token count, on rotated copies."""
    d_out, d_in = base.shape
    tokens = [t for t, name in names.items() if name in pending]
    dtype = base.dtype

    def build(check: bool):
        before = allocated_bytes(device)
        layer = nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype).eval()
        with torch.no_grad():
            layer.weight.copy_(base)
        holder = Holder(layer)
        del layer  # the converters replace it (FP8) or its weight (fp16 2:4): count only what remains
        report = convert_arm(dname, arm, holder, ["linear"], check)
        size = allocated_bytes(device) - before if device.type == "cuda" else base.numel() * base.element_size()
        return holder, report, size

    first, report, weight_bytes = build(check=True)
    out: dict = {"kernel": report["kernel"]}
    error = arm_error(report)
    if error is not None:
        return {**out, "error": f"{arm} arm: {error}"}
    input_bytes = {t: t * d_in * base.element_size() for t in tokens}
    most = max(copies_for(weight_bytes + input_bytes[t], plan["rotate_bytes"]) for t in tokens)
    holders = [first] + [build(check=False)[0] for _ in range(most - 1)]
    for t in tokens:
        k = copies_for(weight_bytes + input_bytes[t], plan["rotate_bytes"])
        xs = [seeded_randn(t, d_in, seed=i, device=device, dtype=dtype) for i in range(k)]
        with torch.inference_mode():
            fns = [lambda h=h, x=x: h.linear(x) for h, x in zip(holders, xs)]
            ms = timer(fns)
            result = holders[0].linear(xs[0])
            entry = {"ms": ms, "out": result, "copies": k,
                     "rotated_mib": round(k * (weight_bytes + input_bytes[t]) / 2**20, 1)}
            if dname == "fp16" and arm == "sparse":
                searched = _searched_alg_ms(holders, xs, fns, timer)
                if searched is not None:
                    entry["searched_alg_ms"] = searched
        out[t] = entry
        del xs, fns
    del holders, first
    free_memory()
    return out


def _searched_alg_ms(holders, xs, fns, timer) -> float | None:
    """cuSPARSELt only: time again with the algorithm torch._cslt_sparse_mm_search picks
    for this shape (the default alg_id 0 can be slow, pytorch issue 153825); None if
    that is not possible here. The holders keep the searched id afterwards."""
    weight = holders[0].linear.weight
    if not hasattr(torch, "_cslt_sparse_mm_search") or getattr(weight, "packed", None) is None \
            or not hasattr(weight, "alg_id_cusparselt"):
        return None
    try:
        alg_id = torch._cslt_sparse_mm_search(weight.packed, xs[0].t())
        alg_id = alg_id[0] if isinstance(alg_id, tuple) else alg_id
        for holder in holders:
            holder.linear.weight.alg_id_cusparselt = int(alg_id)
        return round(timer(fns), 4)
    except Exception:  # private API; its absence only costs the extra figure
        return None


def block_cases(plan, pending, device, dtypes, timer) -> list[dict]:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
    results = []
    config = llama_config(plan["config"])
    for dname in dtypes:
        names = {(kind, b, s): f"block {kind} {b}x{s} {dname}" for kind, b, s in plan["blocks"]}
        if not any(name in pending for name in names.values()):
            continue
        dtype = DTYPES[dname]["model_dtype"]
        torch.manual_seed(0)
        with torch.device(device):
            base = LlamaDecoderLayer(config, layer_idx=0).to(dtype).eval()
            rotary = LlamaRotaryEmbedding(config)
        linear_names = [n for n, m in base.named_modules() if isinstance(m, nn.Linear)]
        for name in linear_names:
            make_24_(base.get_submodule(name).weight)
        # Copies sized for the smallest arm (FP8 2:4 keeps ~1/4 of the 16-bit bytes), so
        # every arm rotates through more than rotate_bytes.
        weight_bytes = sum(p.numel() * p.element_size() for p in base.parameters()) // 4

        def workload(b, s, seed):
            hidden = seeded_randn(b, s, config.hidden_size, seed=seed, device=device, dtype=dtype)
            positions = torch.arange(s, device=device).unsqueeze(0).expand(b, -1)
            return hidden, positions, rotary(hidden, positions)

        measured: dict[str, dict] = {}
        for arm in ("dense", "sparse"):
            layers, reports = [], []
            shapes = [key for key, name in names.items() if name in pending]
            k = max(copies_for(weight_bytes + b * s * config.hidden_size * 2, plan["rotate_bytes"])
                    for _, b, s in shapes)
            for i in range(k):
                layer = copy.deepcopy(base)
                reports.append(convert_arm(dname, arm, layer, linear_names, check=(i == 0)))
                layers.append(layer)
            error = arm_error(reports[0])
            measured[arm] = {"kernel": reports[0]["kernel"], "copies": k}
            if error is not None:
                measured[arm]["error"] = f"{arm} arm: {error}"
                del layers
                continue
            for kind, b, s in shapes:
                works = [workload(b, s, seed=i) for i in range(k)]

                def forward(layer, hidden, positions, rope):
                    # No KV cache and no mask: sdpa runs causal attention over the given tokens.
                    out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rope)
                    return out[0] if isinstance(out, tuple) else out
                with torch.inference_mode():
                    fns = [lambda layer=layer, w=w: forward(layer, *w) for layer, w in zip(layers, works)]
                    measured[arm][(kind, b, s)] = (timer(fns), forward(layers[0], *works[0]))
                del works, fns
            del layers
            free_memory()
        del base
        free_memory()
        for key, name in names.items():
            if name not in pending:
                continue
            dense, sparse = measured["dense"], measured["sparse"]
            extra = {"dtype": dname, "dense_kernel": dense["kernel"], "sparse_kernel": sparse["kernel"],
                     "note": "decode step without KV cache" if key[0] == "decode" else "prefill, causal sdpa"}
            if "error" in dense or "error" in sparse:
                dense_ms = dense[key][0] if key in dense else float("nan")
                results.append(case_result(name, dense_ms, None, "ms per call",
                                           error=dense.get("error") or sparse.get("error"), **extra))
                continue
            extra["max_rel_err"] = rel_err(sparse[key][1], dense[key][1])
            extra["l2"] = {"cold": True, "dense_copies": dense["copies"], "sparse_copies": sparse["copies"]}
            results.append(case_result(name, dense[key][0], sparse[key][0], "ms per call", **extra))
    return results


def e2e_cases(plan, pending, device, dtypes, timer) -> list[dict]:
    from transformers import AutoModelForCausalLM
    label = plan["model_label"]
    config = llama_config(plan["config"])
    results = []
    for dname in dtypes:
        prefill_name = f"e2e {label} prefill 1x{plan['e2e_prefill']} {dname}"
        decode_name = f"e2e {label} decode {dname}"
        if prefill_name not in pending and decode_name not in pending:
            continue
        dtype = DTYPES[dname]["model_dtype"]
        prompt = torch.randint(3, config.vocab_size, (1, plan["e2e_prompt"]), device=device)
        long_input = torch.randint(3, config.vocab_size, (1, plan["e2e_prefill"]), device=device)
        new_tokens = plan["e2e_new_tokens"]
        measured = {}
        for arm in ("dense", "sparse"):
            torch.manual_seed(0)
            with torch.device(device):  # random weights straight on the GPU: no 13 GB host copy
                model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
            linear_names = prunable_linear_names(model)
            for name in linear_names:
                make_24_(model.get_submodule(name).weight)
            weight_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
            report = convert_arm(dname, arm, model, linear_names, check=True)
            measured[arm] = {"kernel": report["kernel"], "converted": len(report["converted"]),
                             "of": len(linear_names), "weight_gib": round(weight_gib, 2)}
            error = arm_error(report)
            if error is not None:
                measured[arm]["error"] = f"{arm} arm: {error}"
                del model
                free_memory()
                continue

            def generate(model=model):
                # min_new_tokens pins the length so an early EOS cannot shorten a run.
                return model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)

            with torch.inference_mode():
                if prefill_name in pending:
                    measured[arm][prefill_name] = timer(lambda: model(long_input, use_cache=False,
                                                                      logits_to_keep=1).logits)
                if decode_name in pending:
                    generated = generate()
                    assert generated.shape[1] == prompt.shape[1] + new_tokens, generated.shape
                    measured[arm][decode_name] = timer(generate) / new_tokens
                measured[arm]["logits"] = model(prompt, use_cache=False).logits
            del model
            free_memory()
        dense, sparse = measured["dense"], measured["sparse"]
        for name, unit in ((prefill_name, "ms per forward (batch 1, no cache, last-token logits)"),
                           (decode_name, "ms per generated token (greedy, batch 1, incl. prefill of the "
                                         f"{plan['e2e_prompt']}-token prompt, KV cache)")):
            if name not in pending:
                continue
            extra = {"dtype": dname, "dense_kernel": dense["kernel"], "sparse_kernel": sparse["kernel"],
                     "converted": sparse["converted"], "of": sparse["of"],
                     "l2": f"cold by size: {dense['weight_gib']} GiB of weights per forward"}
            if "error" in dense or "error" in sparse:
                results.append(case_result(name, dense.get(name, float("nan")), None, unit,
                                           error=dense.get("error") or sparse.get("error"), **extra))
                continue
            extra["max_rel_err_logits"] = rel_err(sparse["logits"], dense["logits"])
            if name == decode_name:
                extra["dense_tokens_per_s"] = round(1e3 / dense[name], 2)
                extra["sparse_tokens_per_s"] = round(1e3 / sparse[name], 2)
            results.append(case_result(name, dense[name], sparse[name], unit, **extra))
    return results


# Op names that, inside a steady-state call, mean work a 2:4 matmul should not repeat.
_RECOMPRESS = re.compile(r"compress|_to_sparse|sparse_semi_structured_tile|mm_search")
_PER_CALL_COPIES = re.compile(r"aten::(copy_|clone|contiguous|constant_pad_nd|pad|cat|narrow_copy)$")


def classify_ops(ops_per_call: dict[str, float]) -> dict:
    """Which per-call ops re-compress the weight or search an algorithm (never wanted
    per call), and which copy or pad tensors (a cost worth knowing)."""
    return {"recompresses_per_call": sorted(op for op in ops_per_call if _RECOMPRESS.search(op)),
            "copies_per_call": sorted(op for op in ops_per_call if _PER_CALL_COPIES.search(op))}


def profile_calls(fn, calls: int, device: torch.device) -> dict:
    """Run fn `calls` times under torch.profiler (after one warm-up call): operators
    and device kernels per call, and host/device time per call."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    ops, kernels, cpu_us, device_us = {}, {}, 0.0, 0.0
    for event in prof.key_averages():
        device_time = getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0))
        if getattr(event, "device_type", None) is not None and "CUDA" in str(event.device_type):
            kernels[event.key] = round(event.count / calls, 2)
            device_us += device_time
        else:
            ops[event.key] = round(event.count / calls, 2)
            cpu_us += event.self_cpu_time_total
    return {"ops_per_call": ops, "kernels_per_call": kernels,
            "host_ms_per_call": round(cpu_us / calls / 1e3, 4),
            "device_ms_per_call": round(device_us / calls / 1e3, 4) if kernels else None}


def percall_cases(plan, pending, device, dtypes, timer) -> list[dict]:
    """Per-call costs of each arm on one linear: what runs in every call."""
    d_out, d_in = plan["percall_shape"]
    results = []
    for dname in dtypes:
        dtype = DTYPES[dname]["model_dtype"]
        for arm in ("dense", "sparse"):
            names = {t: f"percall {dname} {arm} {d_out}x{d_in} t{t}" for t in plan["percall_tokens"]}
            if not any(name in pending for name in names.values()):
                continue
            torch.manual_seed(0)
            layer = nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype).eval()
            make_24_(layer.weight)
            holder = Holder(layer)
            report = convert_arm(dname, arm, holder, ["linear"], check=True)
            error = arm_error(report)
            for t, name in names.items():
                if name not in pending:
                    continue
                if error is not None:
                    results.append({"case": name, "kernel": report["kernel"], "error": error})
                    continue
                x = seeded_randn(t, d_in, seed=0, device=device, dtype=dtype)
                with torch.inference_mode():
                    profiled = profile_calls(lambda x=x: holder.linear(x), calls=10, device=device)
                results.append({"case": name, "kernel": report["kernel"], **classify_ops(profiled["ops_per_call"]),
                                **profiled})
            del holder, layer
            free_memory()
    return results


GROUP_FUNCTIONS = {"linear": linear_cases, "block": block_cases, "e2e": e2e_cases, "percall": percall_cases}


def all_case_names(plan, dtypes) -> set[str]:
    names = set()
    for dname in dtypes:
        names |= {f"linear {o}x{i} t{t} {dname}" for o, i in plan["linear_shapes"] for t in plan["linear_tokens"]}
        names |= {f"block {kind} {b}x{s} {dname}" for kind, b, s in plan["blocks"]}
        label = plan["model_label"]
        names |= {f"e2e {label} prefill 1x{plan['e2e_prefill']} {dname}", f"e2e {label} decode {dname}"}
        o, i = plan["percall_shape"]
        names |= {f"percall {dname} {arm} {o}x{i} t{t}" for arm in ("dense", "sparse") for t in plan["percall_tokens"]}
    return names


def target_verdict(cases: list[dict]) -> dict:
    """Did FP8 2:4 reach TARGET's speedup over dense FP8 on the big linear at >= 2048 tokens?"""
    relevant = [c for c in cases if c["case"].startswith(TARGET["case_prefix"]) and c.get("dtype") == TARGET["dtype"]
                and c.get("tokens", 0) >= TARGET["min_tokens"]]
    measured = [c for c in relevant if c.get("speedup") is not None]
    text = (f"FP8 2:4 >= {TARGET['speedup']}x over dense FP8 on {TARGET['case_prefix']} "
            f"at >= {TARGET['min_tokens']} tokens")
    if not measured:
        return {"target": text, "verdict": "not measured",
                "errors": sorted({c["error"] for c in relevant if "error" in c})}
    best = max(measured, key=lambda c: c["speedup"])
    return {"target": text, "verdict": "met" if best["speedup"] >= TARGET["speedup"] else "missed",
            "best": {"case": best["case"], "speedup": best["speedup"]},
            "speedups": {c["case"]: c["speedup"] for c in measured}}


# ---------------------------------------------------------------- size

def measure_size(kind: str) -> dict:
    """Packed vs dense bytes of random 2:4 fp16 weights, from real safetensors files,
    for the `packed` format and for `packed-fp8` (against the same fp16 dense bytes).

    kind '7b': the 7 linear weights of one Llama-2-7B decoder block; 'tiny': small
    shapes for tests. Weights are written one file each to bound memory.
    """
    from safetensors.torch import save_file
    if kind == "7b":
        h, f = LLAMA2_7B["hidden_size"], LLAMA2_7B["intermediate_size"]
        shapes = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
                  "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}
    else:
        shapes = {"q_proj": (64, 256), "gate_proj": (128, 256), "down_proj": (256, 128)}
    generator = torch.Generator().manual_seed(0)
    formats = {"packed": (pack_nm, "nm-packed v1"), "packed-fp8": (pack_nm_fp8, "nm-packed-fp8 v1")}
    totals = {fmt: {"packed_bytes": 0, "dense_bytes": 0, "packed_file_bytes": 0, "dense_file_bytes": 0}
              for fmt in formats}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, shape) in enumerate(shapes.items()):
            weight = torch.randn(shape, generator=generator).to(torch.float16)
            make_24_(weight)
            param = f"layers.0.{name}.weight"
            save_file({param: weight}, f"{tmp}/d{i}.safetensors")
            dense_file = Path(f"{tmp}/d{i}.safetensors").stat().st_size
            for fmt, (pack, _) in formats.items():
                packed = flatten_packed(param, pack(weight, 2, 4))
                report = packed_size_report(packed, dense_dtype=torch.float16)
                save_file(packed, f"{tmp}/p{i}.safetensors")
                totals[fmt]["packed_bytes"] += report["packed_bytes"]
                totals[fmt]["dense_bytes"] += report["dense_bytes"]
                totals[fmt]["packed_file_bytes"] += Path(f"{tmp}/p{i}.safetensors").stat().st_size
                totals[fmt]["dense_file_bytes"] += dense_file
                del packed
            del weight
    layers = (f"{'Llama-2-7B block' if kind == '7b' else 'tiny'}: "
              + ", ".join(f"{k} {v[0]}x{v[1]}" for k, v in shapes.items()))

    def summary(fmt):
        t = totals[fmt]
        return {**t, "size_ratio": round(t["packed_bytes"] / t["dense_bytes"], 6),
                "file_size_ratio": round(t["packed_file_bytes"] / t["dense_file_bytes"], 6),
                "layers": layers, "dense_dtype": "float16", "pattern": "2:4", "format": formats[fmt][1]}
    return {"size_ratio": summary("packed")["size_ratio"], "size": summary("packed"),
            "size_fp8": summary("packed-fp8")}


# ---------------------------------------------------------------- main

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shapes on CPU to exercise the code; records no timings")
    parser.add_argument("--size-shapes", choices=["7b", "tiny"], default="7b",
                        help="layer set for the size ratios (default: one Llama-2-7B block)")
    parser.add_argument("--only", choices=GROUPS, action="append",
                        help="run only these case groups (repeatable)")
    parser.add_argument("--dtypes", choices=list(DTYPES), action="append",
                        help="run only these comparisons (repeatable; default both)")
    parser.add_argument("--force", action="store_true", help="re-measure cases already in the JSON")
    return parser.parse_args(argv)


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _versions() -> dict:
    import transformers
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import torchao
        versions["torchao"] = torchao.__version__
    except Exception:
        versions["torchao"] = None
    return versions


def fp8_kernels(device: torch.device) -> dict:
    return {k: fp8_unavailable_reason(k, device) or "available" for k in FP8_KERNELS}


METHOD = ("random weights made 2:4 (top-2 magnitude per group of 4); fp16 arms in fp16, FP8 arms with "
          "e4m3 weights (per output channel) and e4m3 activations (per token) around bf16; conversion "
          "and output check before timing; cold L2: operands rotated through copies spanning more than "
          "rotate_bytes; warm-up calls discarded; CUDA events around a batch of calls; median of repeats. "
          "speedup = dense_ms / sparse_ms.")


def main(argv=None) -> dict:
    args = parse_args(argv)
    gpu = torch.cuda.is_available() and not args.cpu_smoke
    groups = args.only or list(GROUPS)
    dtypes = args.dtypes or list(DTYPES)
    existing = _load(args.out)

    if not gpu:
        # Exercise every code path on tiny shapes; nothing measured here is recorded.
        plan, device = PLANS["smoke"], torch.device("cpu")
        timer = Timer(device, **plan["timing"])
        exercised = []
        for group in groups:
            exercised += GROUP_FUNCTIONS[group](plan, all_case_names(plan, dtypes), device, dtypes, timer)
        if existing and existing.get("cases") and not args.force:
            print(f"{args.out} holds GPU results from {existing.get('device')!r}; not overwritten "
                  "by a run without GPU (use --force or another --out)")
            return existing
        data = {
            "benchmark": "dense vs 2:4 at the same dtype: fp16 vs fp16, FP8 vs dense FP8",
            "device": NO_GPU_DEVICE if not torch.cuda.is_available() else SMOKE_DEVICE,
            **_versions(),
            **measure_size(args.size_shapes),
            "fp8_kernels": fp8_kernels(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
            "cases": [],
            "target": target_verdict([]),
            "note": ("No GPU speed numbers exist yet: this file was written without a GPU, so it holds "
                     "only the measured sizes. Fill the cases from the repository root on a CUDA "
                     f"machine (sm_90 for the FP8 2:4 kernels) with `{FILL_COMMAND}`; "
                     "it resumes and skips cases already measured."),
            "cpu_smoke_exercised": sorted(c["case"] for c in exercised),
            "cpu_smoke_errors": {c["case"]: c["error"] for c in exercised if "error" in c},
        }
        _write(args.out, data)
        print(json.dumps({k: data[k] for k in ("device", "size_ratio", "fp8_kernels", "cases")}, indent=2))
        return data

    plan, device = PLANS["gpu"], torch.device("cuda")
    major, minor = torch.cuda.get_device_capability(device)
    device_name = f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    versions = _versions()
    same_setup = (existing is not None and existing.get("device") == device_name
                  and existing.get("torch") == versions["torch"] and not args.force)
    done = [c for c in existing.get("cases", []) if "error" not in c] if same_setup else []
    data = {
        "benchmark": "dense vs 2:4 at the same dtype: fp16 vs fp16, FP8 vs dense FP8",
        "device": device_name,
        "cuda": torch.version.cuda,
        "commit": git_commit(),
        **versions,
        **({k: existing[k] for k in ("size_ratio", "size", "size_fp8")}
           if same_setup and existing.get("size_fp8") else measure_size(args.size_shapes)),
        "fp8_kernels": fp8_kernels(device),
        "rotate_bytes": plan["rotate_bytes"],
        "cases": done,
        "method": METHOD,
        "note": f"Measured with `{FILL_COMMAND}`; speedup > 1 means the 2:4 kernels were faster.",
    }
    data["target"] = target_verdict(data["cases"])
    _write(args.out, data)
    timer = Timer(device, **plan["timing"])
    for group in groups:
        pending = all_case_names(plan, dtypes) - {c["case"] for c in data["cases"]}
        try:
            new = GROUP_FUNCTIONS[group](plan, pending, device, dtypes, timer)
        except Exception as exc:  # record and go on: one failing group must not lose the others
            new = [{"case": f"{group} failed", "error": f"{type(exc).__name__}: {exc}"}]
            free_memory()
        data["cases"] = [c for c in data["cases"] if c["case"] not in {n["case"] for n in new}] + new
        data["target"] = target_verdict(data["cases"])
        _write(args.out, data)
        for case in new:
            print(json.dumps(case))
    print(json.dumps(data["target"]))
    return data


if __name__ == "__main__":
    main()
