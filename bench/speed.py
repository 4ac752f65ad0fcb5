#!/usr/bin/env python
"""Pruning cost: per-layer solve time and whole-model prune time, methods side by side.

    python bench/speed.py                        # gpu profile with CUDA, cpu profile without
    python bench/speed.py --profile gpu          # Llama-2-7B shapes and a random 7B model
    python bench/speed.py --profile gpu --scope model --method sparsegpt   # one piece at a time
    python bench/speed.py --profile cpu          # small shapes, a 4-block model (testable anywhere)

What is measured (all weights random, built on the device from a config; nothing
is downloaded):

- scope "layer": prune_layer on one (d_out, d_in) weight at 50 % unstructured, from
  its Gram, with no shared cache (so the time includes the method's own
  normalisation / factorisation of the Gram). Median of `repeats` calls after one
  warm-up; the methods take turns within each repeat. Series "shapes": the
  model's layer shapes; series "d_in sweep": d_out fixed, d_in growing. The Gram
  comes from Gaussian inputs with log-normal per-channel scales (real activations
  have outlier channels).
- scope "model": whole-model prune at 50 % unstructured = wall time from the start of
  calibration capture to the last block's propagation (pruning.prune_model from token
  ids; model building is not timed), split into phase_seconds (capture, gram, solve,
  propagate). Each method runs in its own process with a time limit (--limit), so
  its host-memory peak (host_peak_gib) is its own and a slow method cannot stall the
  rest; one more run of the first method uses offload (blocks on the host, one at a
  time on the GPU). The same capture, Gram and propagation code serves every method;
  only the per-layer solver differs.

peak_gib: on CUDA torch.cuda.max_memory_allocated (reset before each measurement;
it includes the model, calibration activations and everything live). On CPU the
peak resident set of the whole process (VmHWM from /proc/self/status, reset via
/proc/self/clear_refs after malloc_trim before each measurement), so it includes
the interpreter, torch and the model: compare methods, not absolute values.

Every record goes to bench/results/speed.json as soon as it is measured; a rerun
skips records already there (same method, scope, series, shape, profile, device)
unless --force. Imports only torch, transformers and `pruning`.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common import REPO, ResultFile, device_label, git_commit  # also puts REPO on sys.path

import torch  # noqa: E402

from pruning import PruneSpec, prune_layer, prune_model  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "speed.json"
KEY = ("method", "scope", "series", "shape", "profile", "device")
METHODS = ("wanda", "sparsegpt", "admm-grad")
# Solve precision (beyond the paper): the same solver in fp64, layer scope only.
LAYER_EXTRA = {"admm-grad-fp64": ("admm-grad", {"solve_dtype": "float64"})}

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False)


@dataclass
class Profile:
    shapes: list[tuple[int, int]]        # (d_out, d_in)
    sweep_d_out: int
    sweep_d_in: list[int]
    gram_tokens: int
    repeats: int
    config: dict
    model_label: str
    nsamples: int
    seqlen: int
    dtype: torch.dtype


PROFILES = {
    "gpu": Profile(shapes=[(4096, 4096), (11008, 4096), (4096, 11008)], sweep_d_out=4096,
                   sweep_d_in=[1024, 2048, 4096, 8192, 16384], gram_tokens=128 * 2048, repeats=3,
                   config=LLAMA2_7B, model_label="llama-2-7b-shaped (32 blocks, 4096/11008)",
                   nsamples=128, seqlen=2048, dtype=torch.float16),
    "cpu": Profile(shapes=[(512, 512), (1376, 512), (512, 1376)], sweep_d_out=512,
                   sweep_d_in=[256, 512, 1024, 2048], gram_tokens=16 * 256, repeats=5,
                   config={**LLAMA2_7B, "hidden_size": 512, "intermediate_size": 1376,
                           "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8},
                   model_label="llama-shaped (4 blocks, 512/1376)", nsamples=16, seqlen=256,
                   dtype=torch.float32),
    "tiny": Profile(shapes=[(64, 64)], sweep_d_out=32, sweep_d_in=[32, 64], gram_tokens=64, repeats=1,
                    config={**LLAMA2_7B, "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
                            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4},
                    model_label="llama-shaped (2 blocks, 64/128)", nsamples=2, seqlen=16,
                    dtype=torch.float32),
}


# ------------------------------------------------------------------ timing and memory

def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory of one measurement, in GiB (see the module docstring for what)."""

    def __init__(self, device: str):
        self.device = device
        self.kind = ("torch.cuda.max_memory_allocated" if device.startswith("cuda")
                     else "cpu process VmHWM (peak RSS, reset per measurement)")

    def __enter__(self):
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            try:  # give freed heap back to the OS, so the reset peak starts low
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except OSError:
                pass
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.kind = "cpu process ru_maxrss (not resettable: max over the whole run)"
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            self.gib = torch.cuda.max_memory_allocated() / 2**30
            return
        try:
            line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM"))
            self.gib = int(line.split()[1]) / 2**20
        except (OSError, StopIteration):
            import resource
            self.gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def random_gram(d_in: int, tokens: int, device: str, seed: int) -> torch.Tensor:
    """XᵀX of Gaussian inputs with log-normal channel scales, accumulated in chunks
    so that 128 x 2048 tokens at d_in 16384 never sit in memory at once."""
    gen = torch.Generator(device=device).manual_seed(seed)
    scale = torch.exp(torch.randn(d_in, generator=gen, device=device))
    gram = torch.zeros(d_in, d_in, device=device)
    chunk = max(1, min(tokens, 2**27 // d_in))
    for start in range(0, tokens, chunk):
        x = torch.randn(min(chunk, tokens - start), d_in, generator=gen, device=device) * scale
        gram.addmm_(x.T, x)
    return gram


# ------------------------------------------------------------------ the two scopes

def _method_settings(name: str) -> tuple[str, dict]:
    return LAYER_EXTRA.get(name, (name, {}))


def time_layers(names: list[str], d_out: int, d_in: int, profile: Profile,
                device: str) -> dict[str, tuple[float, PeakMemory]]:
    """{method: (median seconds, peak)} of prune_layer on one shape.

    The methods take turns within each repeat (round robin), so that a change of
    machine load hits all of them alike; peak memory comes from one more call each.
    """
    from pruning.gram import exact_fp32_matmul

    gram = random_gram(d_in, profile.gram_tokens, device, seed=d_in)
    gen = torch.Generator(device=device).manual_seed(d_out * 7 + d_in)
    weight = (torch.randn(d_out, d_in, generator=gen, device=device) * 0.02).to(profile.dtype)
    times: dict[str, list[float]] = {n: [] for n in names}
    peaks = {}
    with exact_fp32_matmul():
        for rep in range(profile.repeats + 1):          # repeat 0 is the warm-up
            for name in names:
                method, opts = _method_settings(name)
                _sync(device)
                t0 = time.perf_counter()
                prune_layer(weight, gram, method=method, sparsity=0.5, **opts)
                _sync(device)
                if rep > 0:
                    times[name].append(time.perf_counter() - t0)
        for name in names:
            method, opts = _method_settings(name)
            with PeakMemory(device) as peak:
                prune_layer(weight, gram, method=method, sparsity=0.5, **opts)
            peaks[name] = peak
    return {n: (statistics.median(times[n]), peaks[n]) for n in names}


def build_model(profile: Profile, device: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**profile.config), dtype=profile.dtype)
    return model.eval()


def prune_whole_model(method: str, profile: Profile, device: str, offload: bool, batch_size: int) -> dict:
    """One whole-model prune from the token ids: capture, then every block's Grams,
    solve and propagation (model building is not timed). Runs in its own process
    (see time_models), so the host-memory peak is this method's alone."""
    model = build_model(profile, "cpu" if offload else device)
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, profile.config["vocab_size"], (profile.nsamples, profile.seqlen), generator=gen)
    with PeakMemory(device) as peak:
        _sync(device)
        t0 = time.perf_counter()
        result = prune_model(model, calib, PruneSpec(method, 0.5, "unstructured"), device=device,
                             progress=False, offload=offload, batch_size=batch_size)
        _sync(device)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_gib": peak.gib, "peak_kind": peak.kind,
            "host_peak_gib": host_peak_gib(), "phase_seconds": result.phase_seconds,
            "tokens": profile.nsamples * profile.seqlen, "offload": offload, "batch_size": batch_size}


def host_peak_gib() -> float:
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM"))
    return int(line.split()[1]) / 2**20


def time_models(cases: list[tuple[str, bool]], profile_name: str, device: str, limit_s: float,
                batch_size: int, record) -> None:
    """Each (method, offload) case in a child process with a time limit: a case that
    runs out of time is recorded as such and the next one starts."""
    for method, offload in cases:
        cmd = [sys.executable, __file__, "--child-model", method, "--profile", profile_name, "--device", device,
               "--batch-size", str(batch_size)] + (["--offload"] if offload else [])
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit_s)
        except subprocess.TimeoutExpired:
            record(method, offload, {"seconds": None, "timed_out": True, "limit_s": limit_s})
            continue
        if proc.returncode:
            record(method, offload, {"seconds": None, "failed": proc.stderr[-2000:]})
            continue
        record(method, offload, json.loads(proc.stdout.strip().splitlines()[-1]))


# ------------------------------------------------------------------ driver

def run(profile_name: str, *, out: Path, device: str, scopes=("layer", "model"), methods=None,
        force: bool = False, limit_s: float = 600, batch_size: int = 8, offload_run: bool = True) -> list[dict]:
    profile = PROFILES[profile_name]
    results = ResultFile(out, KEY)
    label, commit = device_label(device), git_commit()
    methods = list(methods or METHODS)
    layer_methods = methods + [m for m in LAYER_EXTRA if m not in methods and _method_settings(m)[0] in methods]

    def todo(name, scope, series, shape) -> bool:
        return force or not results.has(method=name, scope=scope, series=series, shape=shape,
                                        profile=profile_name, device=label)

    def make_record(name, scope, series, shape, seconds, peak, **extra):
        rec = {"method": name, "scope": scope, "series": series, "shape": shape, "seconds": seconds,
               "peak_gib": peak.gib, "peak_kind": peak.kind, "device": label, "commit": commit,
               "profile": profile_name, "sparsity": 0.5, "pattern": "unstructured",
               "torch": torch.__version__, **extra}
        results.add(rec)
        print(f"{scope:5s} {series:10s} {shape:44s} {name:16s} {seconds:9.3f}s  peak {peak.gib:6.2f} GiB",
              flush=True)

    if "layer" in scopes:
        cases = [("shapes", d_out, d_in) for d_out, d_in in profile.shapes]
        cases += [("d_in sweep", profile.sweep_d_out, d_in) for d_in in profile.sweep_d_in]
        for series, d_out, d_in in cases:
            shape = f"{d_out}x{d_in}"
            pending = [n for n in layer_methods if todo(n, "layer", series, shape)]
            if pending:
                for name, (seconds, peak) in time_layers(pending, d_out, d_in, profile, device).items():
                    make_record(name, "layer", series, shape, seconds, peak, repeats=profile.repeats,
                                gram_tokens=profile.gram_tokens, weight_dtype=str(profile.dtype))
    if "model" in scopes:
        shape = profile.model_label
        cases = [(m, False) for m in methods] + ([(methods[0], True)] if offload_run else [])
        pending = [(m, off) for m, off in cases
                   if todo(m + ("+offload" if off else ""), "model", "whole model", shape)]

        def record_model(method, offload, fields):
            name = method + ("+offload" if offload else "")
            rec = {"method": name, "scope": "model", "series": "whole model", "shape": shape, "device": label,
                   "commit": commit, "profile": profile_name, "sparsity": 0.5, "pattern": "unstructured",
                   "torch": torch.__version__, "weight_dtype": str(profile.dtype), **fields}
            results.add(rec)
            seconds = "timed out" if fields.get("timed_out") else ("failed" if fields.get("failed")
                                                                   else f"{fields['seconds']:.2f}s")
            print(f"model {shape:44s} {name:22s} {seconds}  {fields.get('phase_seconds', '')}", flush=True)

        time_models(pending, profile_name, device, limit_s, batch_size, record_model)
    return results.records


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default=None,
                        help="default: gpu with CUDA, cpu without")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--device", default=None)
    parser.add_argument("--scope", action="append", choices=["layer", "model"])
    parser.add_argument("--method", action="append", choices=list(METHODS))
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--limit", type=float, default=600, help="seconds per whole-model case")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per block forward")
    parser.add_argument("--no-offload-run", action="store_true",
                        help="skip the extra whole-model run with offload (first method)")
    parser.add_argument("--child-model", help=argparse.SUPPRESS)
    parser.add_argument("--offload", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    profile = args.profile or ("gpu" if device.startswith("cuda") else "cpu")
    if args.child_model:
        fields = prune_whole_model(args.child_model, PROFILES[profile], device, args.offload, args.batch_size)
        print(json.dumps(fields))
        return
    run(profile, out=args.out, device=device, scopes=tuple(args.scope or ("layer", "model")),
        methods=args.method, force=args.force, limit_s=args.limit, batch_size=args.batch_size,
        offload_run=not args.no_offload_run)


if __name__ == "__main__":
    main()
