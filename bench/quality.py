#!/usr/bin/env python
"""Perplexity after pruning, every method on the same model, data and protocol.

    python bench/quality.py                      # paper profile with CUDA, cpu profile without
    python bench/quality.py --profile paper      # 128 x 2048 C4 calibration, full WikiText-2, 256 C4 windows
    python bench/quality.py --profile cpu        # the small CPU protocol (see PROFILES)
    python bench/quality.py --only admm-grad     # a subset of the grid (repeatable flag)
    python bench/quality.py --profile cpu --only admm-grad-fp8   # FP8 cost of the 2:4 model (issue 17)

Every record is written to bench/results/quality.json as soon as it is measured, and
a rerun skips records already there (same model, method, pattern, sparsity and
protocol), so a grid can be finished over several sittings. --force redoes them.

Block-0 inputs are captured once per run from the dense model and reused for every
method (capture depends only on the dense model and the calibration ids); each
method prunes a fresh deep copy of the dense model. Grams and solves are fp32 in
every profile (TF32 off) except the admm-grad-tf32 variant, whose solve GEMMs run in
TF32 (emulated on a CPU); the paper profile keeps the model itself in fp16.
`admm-grad-fp8` scores one pruned 2:4 model three times: unquantised, with its
linears stored as packed-fp8, and with FP8 activations too (see fp8_cost).

Imports only torch, transformers, pyarrow and `pruning` (runs on the GPU machine).
"""
from __future__ import annotations

import argparse
import copy
import gc
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from common import REPO, ResultFile, device_label, git_commit  # also puts REPO on sys.path

import torch  # noqa: E402

from pruning import PruneSpec, capture_block_inputs, perplexity, prune_model  # noqa: E402
from pruning.data import (c4_validation_ids, calibration_windows, read_documents,  # noqa: E402
                          split_windows, wikitext2_ids, window_bos_id)
from pruning.models import load_model  # noqa: E402
from pruning.owl import owl_block_overrides  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "quality.json"
KEY = ("model", "method", "pattern", "sparsity", "protocol")


@dataclass
class Profile:
    nsamples: int
    seqlen: int
    wikitext_windows: int | None      # None = all windows
    c4_windows: int
    dtype: str
    model: str = "smollm2-135m"

    def protocol(self, device: str) -> str:
        wiki = "all windows" if self.wikitext_windows is None else f"first{self.wikitext_windows} windows"
        text = (f"c4 {self.nsamples}x{self.seqlen} seed0; wikitext2 seqlen{self.seqlen} {wiki}; "
                f"c4val seqlen{self.seqlen} first{self.c4_windows} windows")
        return text if device.startswith("cuda") else "cpu: " + text


PROFILES = {
    # The papers' protocol (DESIGN.md section 4).
    "paper": Profile(nsamples=128, seqlen=2048, wikitext_windows=None, c4_windows=256, dtype="float16"),
    # Fits the whole grid in well under an hour on 2 shared CPU cores.
    "cpu": Profile(nsamples=16, seqlen=256, wikitext_windows=16, c4_windows=16, dtype="float32"),
    # For tests: seconds on tiny-random-llama.
    "tiny": Profile(nsamples=2, seqlen=32, wikitext_windows=2, c4_windows=2, dtype="float32",
                    model="tiny-random-llama"),
}


@dataclass
class Run:
    """One record of the grid: a method name (variants have their own) and how to run it."""
    name: str
    method: str
    pattern: str
    sparsity: float
    options: dict = field(default_factory=dict)
    true_sequential: bool = False
    owl: bool = False
    fp8: bool = False   # also score the pruned model with FP8-rounded weights (and activations)


BASE = ("magnitude", "wanda", "sparsegpt", "admm", "admm-grad")
VARIANTS = {  # admm-grad beyond the paper, each measured against plain admm-grad
    "admm-grad-constant": dict(options={"schedule": "constant"}),
    "admm-grad-tseq": dict(true_sequential=True),
    "admm-grad-fp64": dict(options={"solve_dtype": "float64"}),
    # TF32 GEMMs in the solve; on the CPU emulated (see emulated_tf32).
    "admm-grad-tf32": dict(options={"matmul": "tf32"}),
    "admm-grad-owl": dict(owl=True),
}


def grid() -> list[Run]:
    """Most important first, so that an interrupted grid still says the most."""
    def base(pattern, sparsity):
        return [Run(m, m, pattern, sparsity) for m in BASE]

    def variants(pattern, sparsity, names):
        return [Run(n, "admm-grad", pattern, sparsity, **VARIANTS[n]) for n in names]

    runs = [Run("dense", "dense", "unstructured", 0.0)]
    runs += base("unstructured", 0.5) + base("2:4", 0.5)
    runs += variants("unstructured", 0.5, ["admm-grad-constant", "admm-grad-tseq", "admm-grad-owl",
                                           "admm-grad-fp64", "admm-grad-tf32"])
    for s in (0.6, 0.7, 0.8):
        runs += base("unstructured", s)
    runs += base("4:8", 0.5)
    runs += variants("unstructured", 0.7, ["admm-grad-owl", "admm-grad-tseq", "admm-grad-constant"])
    runs += variants("2:4", 0.5, ["admm-grad-tseq", "admm-grad-constant"])
    runs += [Run("admm-grad-fp8", "admm-grad", "2:4", 0.5, fp8=True)]
    runs += [Run("wanda-owl", "wanda", "unstructured", 0.7, owl=True),
             Run("sparsegpt-owl", "sparsegpt", "unstructured", 0.7, owl=True)]
    runs += variants("unstructured", 0.8, ["admm-grad-owl", "admm-grad-tseq"])
    return runs


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> the nearest value with TF32's 10-bit mantissa (ties away from zero)."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


@contextmanager
def emulated_tf32():
    """On a CPU, the solve's GEMMs as TF32 tensor cores compute them: operands rounded
    to TF32, products summed in fp32. Patches AdmmSystem.start/step for the duration."""
    from pruning.admm import AdmmSystem

    start, step = AdmmSystem.start, AdmmSystem.step

    def tf32_start(self, w_hat):
        return round_to_tf32(self.inverse) @ round_to_tf32(round_to_tf32(self.gram_hat) @ round_to_tf32(w_hat))

    def tf32_step(self, c, z_minus_u, out):
        torch.addmm(c, round_to_tf32(self.inverse), round_to_tf32(z_minus_u), alpha=self.rho, out=out)

    AdmmSystem.start, AdmmSystem.step = tf32_start, tf32_step
    try:
        yield
    finally:
        AdmmSystem.start, AdmmSystem.step = start, step


def load_eval_data(data_dir: Path, tokenizer, profile: Profile, bos_id: int | None = None):
    """The pipeline's windows; bos_id as pruning.data.window_bos_id gives it."""
    calib_docs = read_documents(data_dir / "c4-train-first1000.jsonl")
    calib = calibration_windows(calib_docs, tokenizer, profile.nsamples, profile.seqlen, seed=0, bos_id=bos_id)
    wiki = split_windows(wikitext2_ids(read_documents(data_dir / "wikitext2-raw-test.txt"), tokenizer),
                         profile.seqlen, profile.wikitext_windows, bos_id=bos_id)
    c4val = c4_validation_ids(read_documents(data_dir / "c4_validation_2k.parquet"), tokenizer,
                              profile.seqlen, profile.c4_windows, bos_id=bos_id)
    return calib, wiki, split_windows(c4val, profile.seqlen, profile.c4_windows, bos_id=bos_id)


def fp8_cost(model, wiki, c4val, pattern: str, *, device: str, progress: bool) -> dict:
    """The quality cost of storing the pruned linears as packed-fp8 (pruning.packing).

    Scores the model unquantised, then (in place) with every decoder linear replaced
    by its packed-fp8 round trip (e4m3 values, one scale per output channel; the
    activations stay in the model's dtype), then additionally with each linear's
    input rounded to e4m3 per token, as the FP8 GPU kernels do
    (pruning.sparse_exec.Fp8Linear). The caller then scores the model as it is left:
    FP8 weights, unrounded activations. Returns the extra fields of the record.
    """
    from pruning.fp8 import round_rows
    from pruning.masks import parse_pattern
    from pruning.packing import pack_nm_fp8, unpack_nm
    from pruning.runner import prunable_linear_names

    def score(desc):
        return (perplexity(model, wiki, device=device, progress=progress, desc=f"wikitext2 {desc}"),
                perplexity(model, c4val, device=device, progress=progress, desc=f"c4 {desc}"))

    fields = {}
    fields["unquantised_wikitext2_ppl"], fields["unquantised_c4_ppl"] = score("unquantised")
    n, m = parse_pattern(pattern)
    names = prunable_linear_names(model)
    with torch.no_grad():
        for name in names:
            weight = model.get_submodule(name).weight
            weight.copy_(unpack_nm(pack_nm_fp8(weight, n, m), dtype=weight.dtype))
    hooks = [model.get_submodule(name).register_forward_pre_hook(lambda _, args: (round_rows(args[0]),))
             for name in names]
    try:
        fields["fp8_act_wikitext2_ppl"], fields["fp8_act_c4_ppl"] = score("fp8 weights+activations")
    finally:
        for hook in hooks:
            hook.remove()
    fields["fp8"] = ("weights: packed-fp8 round trip (e4m3, per output channel); fp8_act_*: also each "
                     "decoder linear's input rounded to e4m3 per token; unquantised_*: the same pruned model "
                     "before rounding")
    return fields


FP8_TOLERANCE = 0.02  # issue 17: FP8 may cost at most 2 % of the unquantised 2:4 perplexity


def fp8_changes(record: dict) -> dict:
    """Relative WikiText-2 perplexity change of FP8 weights (and activations) over the
    unquantised model, and whether both stay within FP8_TOLERANCE."""
    base = record["unquantised_wikitext2_ppl"]
    weights = record["wikitext2_ppl"] / base - 1
    both = record["fp8_act_wikitext2_ppl"] / base - 1
    return {"fp8_wikitext2_change": weights, "fp8_act_wikitext2_change": both,
            "fp8_within_2pct": abs(weights) <= FP8_TOLERANCE and abs(both) <= FP8_TOLERANCE}


def run_grid(profile_name: str, *, out: Path, data_dir: Path, device: str, only: list[str] | None = None,
             force: bool = False, progress: bool = False, cache_dir: str | None = None,
             settings: list[str] | None = None) -> list[dict]:
    profile = PROFILES[profile_name]
    protocol = profile.protocol(device)
    results = ResultFile(out, KEY)
    todo = [r for r in grid() if (not only or r.name in only)
            and (not settings or r.method == "dense" or f"{r.pattern}:{r.sparsity:g}" in settings)]
    todo = [r for r in todo if force or not results.has(model=profile.model, method=r.name, pattern=r.pattern,
                                                           sparsity=r.sparsity, protocol=protocol)]
    print(f"{len(todo)} record(s) to measure ({protocol}) -> {out}", flush=True)
    if not todo:
        return results.records

    dense, tokenizer = load_model(profile.model, dtype=profile.dtype, device=device, cache_dir=cache_dir)
    calib, wiki, c4val = load_eval_data(data_dir, tokenizer, profile, window_bos_id(dense.config, tokenizer))
    t0 = time.perf_counter()
    inputs = capture_block_inputs(dense, calib, device=device)
    capture_seconds = time.perf_counter() - t0
    commit = git_commit()
    owl_cache: dict[float, tuple[dict, float]] = {}   # sparsity -> (overrides, seconds)

    for run in todo:
        t0 = time.perf_counter()
        stats, prune_seconds, extra = [], 0.0, {}
        if run.method == "dense":
            model = dense
        else:
            spec = PruneSpec(run.method, run.sparsity, run.pattern, dict(run.options),
                             true_sequential=run.true_sequential)
            if run.owl:
                if run.sparsity not in owl_cache:
                    t1 = time.perf_counter()
                    overrides = owl_block_overrides(dense, inputs, run.sparsity)
                    owl_cache[run.sparsity] = (overrides, time.perf_counter() - t1)
                spec.block_overrides, owl_seconds = owl_cache[run.sparsity]
                # The outlier scoring is part of the method's cost.
                prune_seconds += owl_seconds
                extra["owl_block_sparsity"] = [round(o["sparsity"], 4) for o in spec.block_overrides.values()]
            model = copy.deepcopy(dense)
            emulate = run.options.get("matmul") == "tf32" and not device.startswith("cuda")
            if emulate:
                extra["matmul"] = "tf32 emulated on the CPU (operands rounded to a 10-bit mantissa)"
            with emulated_tf32() if emulate else nullcontext():
                result = prune_model(model, None, spec, device=device, progress=progress, inputs=inputs)
            prune_seconds += result.seconds
            stats = result.layers
        if run.fp8:
            extra.update(fp8_cost(model, wiki, c4val, run.pattern, device=device, progress=progress))
        wiki_ppl = perplexity(model, wiki, device=device, progress=progress, desc="wikitext2")
        c4_ppl = perplexity(model, c4val, device=device, progress=progress, desc="c4")
        record = {
            "model": profile.model, "method": run.name, "pattern": run.pattern, "sparsity": run.sparsity,
            "wikitext2_ppl": wiki_ppl, "c4_ppl": c4_ppl, "protocol": protocol,
            "prune_seconds": prune_seconds, "commit": commit,
            "profile": profile_name, "device": device_label(device), "model_dtype": profile.dtype,
            "base_method": run.method, "options": run.options, "true_sequential": run.true_sequential,
            "owl": run.owl, "capture_seconds": capture_seconds,
            "mean_rel_error": (sum(s["rel_error"] for s in stats) / len(stats)) if stats else 0.0,
            "measured_sparsity": (sum(s["sparsity"] for s in stats) / len(stats)) if stats else 0.0,
            "torch": torch.__version__, "record_seconds": time.perf_counter() - t0, **extra,
        }
        if run.fp8:
            record.update(fp8_changes(record))
            print(f"{run.name}: unquantised wikitext2 {record['unquantised_wikitext2_ppl']:.3f}, fp8 weights "
                  f"{wiki_ppl:.3f} ({record['fp8_wikitext2_change']:+.2%}), fp8 weights+activations "
                  f"{record['fp8_act_wikitext2_ppl']:.3f} ({record['fp8_act_wikitext2_change']:+.2%})", flush=True)
        results.add(record)
        print(f"{run.name:20s} {run.pattern:12s} {run.sparsity:.2f}  wikitext2 {wiki_ppl:10.3f}  "
              f"c4 {c4_ppl:10.3f}  prune {prune_seconds:7.1f}s", flush=True)
        if model is not dense:
            del model
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return results.records


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default=None,
                        help="default: paper with CUDA, cpu without")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--data-dir", type=Path, default=REPO / "data")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--only", action="append", help="method name(s) of the grid to run")
    parser.add_argument("--setting", action="append",
                        help="pattern:sparsity of the grid to run, e.g. unstructured:0.5 (repeatable)")
    parser.add_argument("--cache-dir", default=None, help="where the converted model is cached")
    parser.add_argument("--force", action="store_true", help="redo records already in the JSON")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    profile = args.profile or ("paper" if device.startswith("cuda") else "cpu")
    run_grid(profile, out=args.out, data_dir=args.data_dir, device=device, only=args.only,
             force=args.force, progress=args.progress, cache_dir=args.cache_dir, settings=args.setting)


if __name__ == "__main__":
    main()
