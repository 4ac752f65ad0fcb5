#!/usr/bin/env python
"""Dense vs 2:4 sparse (PyTorch semi-structured) fp16, side by side in one run.

    python bench/sparse24.py                 # on a CUDA machine (Ampere or newer)
    python bench/sparse24.py --cpu-smoke     # tiny shapes, exercises the code only

Cases (GPU): single linears of Llama-2-7B shapes (weight d_out x d_in) at 1 and
2048 tokens; one LlamaDecoderLayer built from the Llama-2-7B config at batch x
seqlen 1x1 (decode step, no KV cache), 1x2048 and 16x2048; a whole random 7B-shaped
model: greedy decode tokens/s ("e2e 7b") and a 1x2048 prefill. Weights are random,
made 2:4 by keeping the 2 largest magnitudes of every group of 4, and built directly
on the GPU (no download). Only steady state is timed: conversion happens before,
warm-up calls are discarded, CUDA events time a batch of calls, the median of
several repeats is reported. speedup = dense_ms / sparse_ms (> 1: sparse faster).

Also measures `size_ratio`: packed / dense bytes of a 7B decoder block's linear
weights in the project's nm-packed format (pruning/packing.py).

Writes bench/results/sparse24.json after every case group; a rerun skips cases
already measured on the same device and torch version (--force redoes them).
Without CUDA (or with --cpu-smoke) it runs tiny shapes and writes no timings:
`cases: []` and a note naming the command that fills them.

Imports only torch, transformers, safetensors and the project's `pruning` package,
so it runs on the GPU machine as it is (no prefect/dvc/datasets there).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python bench/sparse24.py` without installing
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from pruning.masks import nm_mask  # noqa: E402
from pruning.packing import flatten_packed, pack_nm, packed_size_report  # noqa: E402
from pruning.discovery import layer_weight, prunable_linear_names  # noqa: E402
from pruning.sparse_exec import convert_linear, to_semi_structured  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "sparse24.json"
FILL_COMMAND = "python bench/sparse24.py"
NO_GPU_DEVICE = "none (no GPU available in this session)"
SMOKE_DEVICE = "none (CPU smoke run; no GPU timings taken)"

# Llama-2-7B's architecture (hub config values); weights are random.
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 max_position_embeddings=4096, rms_norm_eps=1e-5, hidden_act="silu",
                 tie_word_embeddings=False)
TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False)

# Everything that differs between the real run and the smoke run.
PLANS = {
    "gpu": dict(config=LLAMA2_7B, model_label="7b",
                linear_shapes=[(4096, 4096), (11008, 4096), (4096, 11008)],
                linear_tokens=[1, 2048],
                blocks=[("decode", 1, 1), ("prefill", 1, 2048), ("prefill", 16, 2048)],
                e2e_prompt=128, e2e_new_tokens=128, e2e_prefill=2048,
                timing=dict(warmup=5, target_ms=300.0, repeats=5, max_iters=500)),
    "smoke": dict(config=TINY, model_label="tiny",
                  linear_shapes=[(64, 128)], linear_tokens=[1, 8],
                  blocks=[("decode", 1, 1), ("prefill", 1, 16), ("prefill", 2, 16)],
                  e2e_prompt=8, e2e_new_tokens=4, e2e_prefill=16,
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


class Timer:
    """Steady-state time of one call in ms: warm-up, then median over repeats of
    (time of `iters` back-to-back calls) / iters; CUDA events on GPU."""

    def __init__(self, device: torch.device, warmup: int, target_ms: float, repeats: int, max_iters: int):
        self.cuda = device.type == "cuda"
        self.warmup, self.target_ms, self.repeats, self.max_iters = warmup, target_ms, repeats, max_iters

    def _elapsed_ms(self, fn, iters: int) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - begin) * 1e3

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        one = self._elapsed_ms(fn, 1)
        iters = max(1, min(self.max_iters, int(self.target_ms / max(one, 1e-3))))
        return statistics.median(self._elapsed_ms(fn, iters) / iters for _ in range(self.repeats))


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


# ---------------------------------------------------------------- cases

def linear_cases(plan, pending, device, dtype, timer) -> list[dict]:
    results = []
    for d_out, d_in in plan["linear_shapes"]:
        names = [f"linear {d_out}x{d_in} t{t}" for t in plan["linear_tokens"]]
        if not any(name in pending for name in names):
            continue
        torch.manual_seed(0)
        layer = nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype).eval()
        make_24_(layer.weight)
        inputs = {t: torch.randn(t, d_in, device=device, dtype=dtype) for t in plan["linear_tokens"]}
        with torch.inference_mode():
            dense = {t: (timer(lambda x=x: layer(x)), layer(x)) for t, x in inputs.items()}
        reason = convert_linear(layer)  # conversion + output check, not timed
        for (t, x), name in zip(inputs.items(), names):
            if name not in pending:
                continue
            dense_ms, want = dense[t]
            if reason is not None:
                results.append(case_result(name, dense_ms, None, "ms per call", error=f"stayed dense: {reason}"))
                continue
            with torch.inference_mode():
                sparse_ms = timer(lambda x=x: layer(x))
                err = rel_err(layer(x), want)
            results.append(case_result(name, dense_ms, sparse_ms, "ms per call", max_rel_err=err))
        del layer, inputs, dense
        free_memory()
    return results


def block_cases(plan, pending, device, dtype, timer) -> list[dict]:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
    names = [f"block {kind} {b}x{s}" for kind, b, s in plan["blocks"]]
    if not any(name in pending for name in names):
        return []
    config = llama_config(plan["config"])
    torch.manual_seed(0)
    with torch.device(device):
        layer = LlamaDecoderLayer(config, layer_idx=0).to(dtype).eval()
        rotary = LlamaRotaryEmbedding(config)
    linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
    for linear in linears:
        make_24_(linear.weight)

    def forward(hidden, positions, rope):
        # No KV cache and no mask: sdpa runs causal attention over the given tokens.
        out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rope)
        return out[0] if isinstance(out, tuple) else out

    workloads = {}
    for (kind, b, s), name in zip(plan["blocks"], names):
        if name in pending:
            hidden = torch.randn(b, s, config.hidden_size, device=device, dtype=dtype)
            positions = torch.arange(s, device=device).unsqueeze(0).expand(b, -1)
            rope = rotary(hidden, positions)
            workloads[name] = (hidden, positions, rope)
    with torch.inference_mode():
        dense = {name: (timer(lambda w=w: forward(*w)), forward(*w)) for name, w in workloads.items()}
    report = to_semi_structured(layer, layer_names=[n for n, m in layer.named_modules() if isinstance(m, nn.Linear)])
    results = []
    for name, work in workloads.items():
        dense_ms, want = dense[name]
        if not report["converted"]:
            results.append(case_result(name, dense_ms, None, "ms per call",
                                       error="no layer converted", fell_back=report["fell_back"]))
            continue
        with torch.inference_mode():
            sparse_ms = timer(lambda w=work: forward(*w))
            err = rel_err(forward(*work), want)
        extra = {"max_rel_err": err, "converted": len(report["converted"]), "backend": report["backend"]}
        if report["fell_back"]:
            extra["fell_back"] = report["fell_back"]
        extra["note"] = "decode step without KV cache" if name.startswith("block decode") else "prefill, causal sdpa"
        results.append(case_result(name, dense_ms, sparse_ms, "ms per call", **extra))
    del layer, workloads, dense
    free_memory()
    return results


def e2e_cases(plan, pending, device, dtype, timer) -> list[dict]:
    from transformers import AutoModelForCausalLM
    label = plan["model_label"]
    decode_name, prefill_name = f"e2e {label}", f"e2e {label} prefill 1x{plan['e2e_prefill']}"
    if decode_name not in pending and prefill_name not in pending:
        return []
    config = llama_config(plan["config"])
    torch.manual_seed(0)
    with torch.device(device):  # random weights straight on the GPU: no 13 GB host copy
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    linear_names = prunable_linear_names(model)
    for name in linear_names:
        make_24_(layer_weight(model.get_submodule(name)))

    new_tokens = plan["e2e_new_tokens"]
    prompt = torch.randint(3, config.vocab_size, (1, plan["e2e_prompt"]), device=device)
    long_input = torch.randint(3, config.vocab_size, (1, plan["e2e_prefill"]), device=device)

    def generate():
        # min_new_tokens pins the length so an early EOS cannot shorten a run.
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)

    def prefill():
        return model(long_input, use_cache=False, logits_to_keep=1).logits

    def measure():
        out = {}
        with torch.inference_mode():
            if decode_name in pending:
                generated = generate()
                assert generated.shape[1] == prompt.shape[1] + new_tokens, generated.shape
                out[decode_name] = timer(generate) / new_tokens
            if prefill_name in pending:
                out[prefill_name] = timer(prefill)
            out["logits"] = model(prompt, use_cache=False).logits
        return out

    dense = measure()
    report = to_semi_structured(model)
    results = []
    sparse = measure() if report["converted"] else None
    for name, unit in ((decode_name, "ms per generated token (greedy, batch 1, incl. prefill of the "
                                     f"{plan['e2e_prompt']}-token prompt, KV cache)"),
                       (prefill_name, "ms per forward (batch 1, no cache, last-token logits)")):
        if name not in pending:
            continue
        if sparse is None:
            results.append(case_result(name, dense[name], None, unit, error="no layer converted",
                                       fell_back=dict(list(report["fell_back"].items())[:5])))
            continue
        extra = {"converted": len(report["converted"]), "of": len(linear_names),
                 "backend": report["backend"], "max_rel_err_logits": rel_err(sparse["logits"], dense["logits"])}
        if name == decode_name:
            extra["dense_tokens_per_s"] = round(1e3 / dense[name], 2)
            extra["sparse_tokens_per_s"] = round(1e3 / sparse[name], 2)
        if report["fell_back"]:
            extra["fell_back"] = report["fell_back"]
        results.append(case_result(name, dense[name], sparse[name], unit, **extra))
    del model, dense, sparse
    free_memory()
    return results


# ---------------------------------------------------------------- size

def measure_size(kind: str) -> dict:
    """Packed vs dense bytes of random 2:4 fp16 weights, from real safetensors files.

    kind '7b': the 7 linear weights of one Llama-2-7B decoder block; 'tiny': small
    shapes for tests. Weights are written one file each to bound memory.
    """
    from safetensors.torch import save_file
    if kind == "7b":
        h, f = LLAMA2_7B["hidden_size"], LLAMA2_7B["intermediate_size"]
        shapes = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
                  "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}
    else:
        shapes = {"q_proj": (64, 64), "gate_proj": (128, 64), "down_proj": (64, 128)}
    generator = torch.Generator().manual_seed(0)
    totals = {"packed_bytes": 0, "dense_bytes": 0, "packed_file_bytes": 0, "dense_file_bytes": 0}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, shape) in enumerate(shapes.items()):
            weight = torch.randn(shape, generator=generator).to(torch.float16)
            make_24_(weight)
            param = f"layers.0.{name}.weight"
            packed = flatten_packed(param, pack_nm(weight, 2, 4))
            report = packed_size_report(packed)
            totals["packed_bytes"] += report["packed_bytes"]
            totals["dense_bytes"] += report["dense_bytes"]
            save_file(packed, f"{tmp}/p{i}.safetensors")
            save_file({param: weight}, f"{tmp}/d{i}.safetensors")
            totals["packed_file_bytes"] += Path(f"{tmp}/p{i}.safetensors").stat().st_size
            totals["dense_file_bytes"] += Path(f"{tmp}/d{i}.safetensors").stat().st_size
            del weight, packed
    return {
        "size_ratio": round(totals["packed_bytes"] / totals["dense_bytes"], 6),
        "size": {**totals,
                 "file_size_ratio": round(totals["packed_file_bytes"] / totals["dense_file_bytes"], 6),
                 "layers": f"{'Llama-2-7B block' if kind == '7b' else 'tiny'}: "
                           + ", ".join(f"{k} {v[0]}x{v[1]}" for k, v in shapes.items()),
                 "dtype": "float16", "pattern": "2:4", "format": "nm-packed v1"},
    }


# ---------------------------------------------------------------- main

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shapes on CPU to exercise the code; records no timings")
    parser.add_argument("--size-shapes", choices=["7b", "tiny"], default="7b",
                        help="layer set for size_ratio (default: one Llama-2-7B block)")
    parser.add_argument("--only", choices=["linear", "block", "e2e"], action="append",
                        help="run only these case groups (repeatable)")
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
    return {"torch": torch.__version__, "transformers": transformers.__version__}


def main(argv=None) -> dict:
    args = parse_args(argv)
    gpu = torch.cuda.is_available() and not args.cpu_smoke
    groups = {"linear": linear_cases, "block": block_cases, "e2e": e2e_cases}
    selected = [groups[g] for g in (args.only or list(groups))]
    existing = _load(args.out)

    if not gpu:
        # Exercise every code path on tiny shapes; nothing measured here is recorded.
        plan, device = PLANS["smoke"], torch.device("cpu")
        timer = Timer(device, **plan["timing"])
        exercised = []
        for group in selected:
            exercised += [c["case"] for c in group(plan, _all_case_names(plan), device, torch.float16, timer)]
        if existing and existing.get("cases") and not args.force:
            print(f"{args.out} holds GPU results from {existing.get('device')!r}; not overwritten "
                  "by a run without GPU (use --force or another --out)")
            return existing
        data = {
            "benchmark": "dense vs 2:4 semi-structured sparse (fp16), PyTorch kernels",
            "device": NO_GPU_DEVICE if not torch.cuda.is_available() else SMOKE_DEVICE,
            **_versions(),
            **measure_size(args.size_shapes),
            "cases": [],
            "note": ("No GPU speed numbers exist yet: this file was written without a GPU, so it holds "
                     "only the measured size_ratio. Fill the cases by running "
                     f"`{FILL_COMMAND}` from the repository root on a CUDA machine "
                     "(compute capability >= 8.0); it resumes and skips cases already measured."),
            "cpu_smoke_exercised": exercised,
        }
        _write(args.out, data)
        print(json.dumps({k: data[k] for k in ("device", "size_ratio", "cases")}, indent=2))
        return data

    plan, device = PLANS["gpu"], torch.device("cuda")
    major, minor = torch.cuda.get_device_capability(device)
    device_name = f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    versions = _versions()
    same_setup = (existing is not None and existing.get("device") == device_name
                  and existing.get("torch") == versions["torch"] and not args.force)
    done = [c for c in existing.get("cases", []) if "error" not in c] if same_setup else []
    data = {
        "benchmark": "dense vs 2:4 semi-structured sparse (fp16), PyTorch kernels",
        "device": device_name,
        "cuda": torch.version.cuda,
        **versions,
        **(({"size_ratio": existing["size_ratio"], "size": existing.get("size")}
            if same_setup and existing.get("size_ratio") else measure_size(args.size_shapes))),
        "cases": done,
        "method": ("random weights made 2:4 (top-2 magnitude per group of 4), fp16; conversion and "
                   "output check before timing; warm-up calls discarded; CUDA events around a batch "
                   "of calls; median of repeats. speedup = dense_ms / sparse_ms."),
        "note": f"Measured with `{FILL_COMMAND}`; speedup > 1 means the 2:4 kernels were faster.",
    }
    _write(args.out, data)
    timer = Timer(device, **plan["timing"])
    for group in selected:
        pending = _all_case_names(plan) - {c["case"] for c in data["cases"]}
        try:
            new = group(plan, pending, device, torch.float16, timer)
        except Exception as exc:  # record and go on: one failing group must not lose the others
            new = [{"case": f"{group.__name__} failed", "error": f"{type(exc).__name__}: {exc}"}]
            free_memory()
        data["cases"] = [c for c in data["cases"] if c["case"] not in {n["case"] for n in new}] + new
        _write(args.out, data)
        for case in new:
            print(json.dumps(case))
    return data


def _all_case_names(plan) -> set[str]:
    names = {f"linear {o}x{i} t{t}" for o, i in plan["linear_shapes"] for t in plan["linear_tokens"]}
    names |= {f"block {kind} {b}x{s}" for kind, b, s in plan["blocks"]}
    label = plan["model_label"]
    names |= {f"e2e {label}", f"e2e {label} prefill 1x{plan['e2e_prefill']}"}
    return names


if __name__ == "__main__":
    main()
