#!/usr/bin/env python
"""Perplexity after pruning, every method on the same model, data and protocol.

    python bench/quality.py                      # paper profile with CUDA, cpu profile without
    python bench/quality.py --profile paper      # 128 x 2048 C4 calibration, full WikiText-2, 256 C4 windows
    python bench/quality.py --profile cpu        # the small CPU protocol (see PROFILES)
    python bench/quality.py --only admm-grad     # a subset of the grid (repeatable flag)
    python bench/quality.py --profile cpu --only admm-grad-fp8   # FP8 cost of the 2:4 model (issue 17)
    python bench/quality.py --profile heldout --setting unstructured:0.6   # the recipe vs admm-grad (issue 13)

Every record is written to bench/results/quality.json as soon as it is measured, and
a rerun skips records already there (same model, method, pattern, sparsity and
protocol), so a grid can be finished over several sittings. --force redoes them.
Two processes must not share one --out (each rewrites the whole file): give a second
one its own --out, then fold its records in with `--merge thatfile.json` (per-seed
records included).

Block-0 inputs are captured once per run from the dense model and reused for every
method (capture depends only on the dense model and the calibration ids); each
method prunes a fresh deep copy of the dense model. Grams and solves are fp32 in
every profile (TF32 off) except the admm-grad-tf32 variant, whose solve GEMMs run in
TF32 (emulated on a CPU); the paper profile keeps the model itself in fp16.
`admm-grad-fp8` scores one pruned 2:4 model three times: unquantised, with its
linears stored as packed-fp8, and with FP8 activations too (see fp8_cost).

The `heldout` profile (issue 13) judges the ft-owl recipe (prune.finetune: standard
with prune.owl: true) and its parts against plain admm-grad on text the CPU profile
never scores: C4 calibration with seeds 0, 1 and 2, WikiText-2 and C4 validation on
windows 16..79. Each seed's record goes to bench/results/quality-seeds.json; once
every seed of a method is there, their mean (wikitext2_ppl, c4_ppl, prune_seconds)
and spread (sample standard deviation, min, max) go to quality.json.

Imports only torch, transformers, pyarrow and `pruning` (runs on the GPU machine).
"""
from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from common import REPO, ResultFile, device_label, git_commit, load_records  # also puts REPO on sys.path

import torch  # noqa: E402

from pruning import PruneSpec, capture_block_inputs, perplexity, prune_model  # noqa: E402
from pruning.data import (c4_validation_ids, calibration_windows, read_documents,  # noqa: E402
                          split_windows, wikitext2_ids, window_bos_id)
from pruning.models import load_model  # noqa: E402

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
    seeds: tuple[int, ...] = (0,)     # calibration seeds; with several, records are their mean
    first_window: int = 0             # evaluation windows skipped (held out: those the cpu profile scores)

    @property
    def heldout(self) -> bool:
        return len(self.seeds) > 1 or self.first_window > 0

    def protocol(self, device: str) -> str:
        if self.heldout:
            last = self.first_window + self.c4_windows - 1
            text = (f"heldout: c4 {self.nsamples}x{self.seqlen} seeds {','.join(map(str, self.seeds))} (mean); "
                    f"wikitext2 seqlen{self.seqlen} windows {self.first_window}..{last}; "
                    f"c4val seqlen{self.seqlen} windows {self.first_window}..{last}")
        else:
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
    # Issue 13: the cpu profile's calibration with three seeds, scored on 64 windows
    # of each data set that the cpu profile never scores (16..79).
    "heldout": Profile(nsamples=16, seqlen=256, wikitext_windows=64, c4_windows=64, dtype="float32",
                       seeds=(0, 1, 2), first_window=16),
    "heldout-tiny": Profile(nsamples=2, seqlen=32, wikitext_windows=2, c4_windows=2, dtype="float32",
                            model="tiny-random-llama", seeds=(0, 1, 2), first_window=1),
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
    finetune: str = "none"
    fp8: bool = False   # also score the pruned model with FP8-rounded weights (and activations)


BASE = ("magnitude", "wanda", "sparsegpt", "admm", "admm-grad")
VARIANTS = {  # admm-grad beyond the paper, each measured against plain admm-grad
    "admm-grad-constant": dict(options={"schedule": "constant"}),
    "admm-grad-tseq": dict(true_sequential=True),
    "admm-grad-fp64": dict(options={"solve_dtype": "float64"}),
    # TF32 GEMMs in the solve; on the CPU emulated (see emulated_tf32).
    "admm-grad-tf32": dict(options={"matmul": "tf32"}),
    "admm-grad-owl": dict(owl=True),
    # Issue 13: the ft-owl recipe (params-ft-owl.yaml) and its block fine-tune alone.
    "admm-grad-ft-owl": dict(finetune="standard", owl=True),
    "admm-grad-ft": dict(finetune="standard"),
}
RECIPE = "admm-grad-ft-owl"


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


HELDOUT_SETTINGS = ("unstructured:0.6", "unstructured:0.7", "2:4:0.5", "unstructured:0.5", "unstructured:0.8")
ABLATED = ("unstructured:0.6", "unstructured:0.7")  # where the recipe's parts are measured alone too


def setting_of(run: Run) -> str:
    return f"{run.pattern}:{run.sparsity:g}"


def heldout_grid(settings: list[str] | None = None) -> list[Run]:
    """Plain admm-grad and the recipe at every setting (in the order given), and the
    recipe's parts alone (OWL, fine-tune) where ABLATED says. With an N:M pattern OWL
    does nothing, so there the recipe is the fine-tune alone and the parts are not run."""
    runs = []
    for setting in settings or HELDOUT_SETTINGS:
        pattern, _, sparsity = setting.rpartition(":")
        if not pattern or pattern != "unstructured" and pattern.count(":") != 1:
            raise SystemExit(f"--setting: expected pattern:sparsity such as unstructured:0.6 or 2:4:0.5, "
                             f"got {setting!r}")
        names = ["admm-grad", RECIPE]
        if setting in ABLATED:
            names += ["admm-grad-owl", "admm-grad-ft"]
        runs += [Run(n, "admm-grad", pattern, float(sparsity), **VARIANTS.get(n, {})) for n in names]
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


def load_calibration(data_dir: Path, tokenizer, profile: Profile, seed: int = 0,
                     bos_id: int | None = None) -> torch.Tensor:
    calib_docs = read_documents(data_dir / "c4-train-first1000.jsonl")
    return calibration_windows(calib_docs, tokenizer, profile.nsamples, profile.seqlen, seed=seed, bos_id=bos_id)


def _held_windows(ids: torch.Tensor, profile: Profile, count: int | None, bos_id: int | None) -> torch.Tensor:
    """Windows first_window .. first_window + count - 1 (all from first_window when count is None)."""
    first = profile.first_window
    windows = split_windows(ids, profile.seqlen, None if count is None else first + count, bos_id=bos_id)[first:]
    if profile.heldout and count is not None and windows.shape[0] < count:
        raise SystemExit(f"the text has {first + windows.shape[0]} windows of {profile.seqlen} tokens; "
                         f"profile needs {first + count}")
    return windows


def load_eval_data(data_dir: Path, tokenizer, profile: Profile, bos_id: int | None = None):
    """The pipeline's windows; bos_id as pruning.data.window_bos_id gives it."""
    calib = load_calibration(data_dir, tokenizer, profile, seed=profile.seeds[0], bos_id=bos_id)
    wiki = _held_windows(wikitext2_ids(read_documents(data_dir / "wikitext2-raw-test.txt"), tokenizer),
                         profile, profile.wikitext_windows, bos_id)
    c4val = c4_validation_ids(read_documents(data_dir / "c4_validation_2k.parquet"), tokenizer,
                              profile.seqlen, profile.first_window + profile.c4_windows, bos_id=bos_id)
    return calib, wiki, _held_windows(c4val, profile, profile.c4_windows, bos_id)


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


def measure(run: Run, dense, inputs, wiki, c4val, *, device: str, progress: bool) -> dict:
    """Prune a fresh copy of `dense` as `run` says (dense: no pruning) and score it: the
    measured fields of a record."""
    stats, prune_seconds, extra = [], 0.0, {}
    if run.method == "dense":
        model = dense
    else:
        spec = PruneSpec(run.method, run.sparsity, run.pattern, dict(run.options),
                         true_sequential=run.true_sequential, finetune=run.finetune, owl=run.owl)
        model = copy.deepcopy(dense)
        emulate = run.options.get("matmul") == "tf32" and not device.startswith("cuda")
        if emulate:
            extra["matmul"] = "tf32 emulated on the CPU (operands rounded to a 10-bit mantissa)"
        with emulated_tf32() if emulate else nullcontext():
            # prune_model counts OWL's outlier scoring (phase "owl") in its seconds.
            result = prune_model(model, None, spec, device=device, progress=progress, inputs=inputs)
        prune_seconds = result.seconds
        stats = result.layers
        extra["phase_seconds"] = {k: round(v, 3) for k, v in result.phase_seconds.items()}
        if run.owl and spec.block_overrides:
            extra["owl_block_sparsity"] = [round(spec.block_overrides[i]["sparsity"], 4)
                                           for i in sorted(spec.block_overrides)]
    if run.fp8:
        extra.update(fp8_cost(model, wiki, c4val, run.pattern, device=device, progress=progress))
    wiki_ppl = perplexity(model, wiki, device=device, progress=progress, desc="wikitext2")
    c4_ppl = perplexity(model, c4val, device=device, progress=progress, desc="c4")
    if model is not dense:
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return {"wikitext2_ppl": wiki_ppl, "c4_ppl": c4_ppl, "prune_seconds": prune_seconds,
            "mean_rel_error": (sum(s["rel_error"] for s in stats) / len(stats)) if stats else 0.0,
            "measured_sparsity": (sum(s["sparsity"] for s in stats) / len(stats)) if stats else 0.0, **extra}


def describe(run: Run, profile_name: str, profile: Profile, protocol: str, device: str, commit: str) -> dict:
    """The fields of a record that say what was measured, where and at which commit."""
    return {"model": profile.model, "method": run.name, "pattern": run.pattern, "sparsity": run.sparsity,
            "protocol": protocol, "commit": commit, "profile": profile_name, "device": device_label(device),
            "model_dtype": profile.dtype, "base_method": run.method, "options": run.options,
            "true_sequential": run.true_sequential, "owl": run.owl, "finetune": run.finetune,
            "torch": torch.__version__}


def run_grid(profile_name: str, *, out: Path, data_dir: Path, device: str, only: list[str] | None = None,
             force: bool = False, progress: bool = False, cache_dir: str | None = None,
             settings: list[str] | None = None) -> list[dict]:
    profile = PROFILES[profile_name]
    if profile.heldout:
        return run_heldout(profile_name, out=out, data_dir=data_dir, device=device, only=only, force=force,
                           progress=progress, cache_dir=cache_dir, settings=settings)
    protocol = profile.protocol(device)
    results = ResultFile(out, KEY)
    todo = [r for r in grid() if (not only or r.name in only)
            and (not settings or r.method == "dense" or setting_of(r) in settings)]
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

    for run in todo:
        t0 = time.perf_counter()
        measured = measure(run, dense, inputs, wiki, c4val, device=device, progress=progress)
        record = {**describe(run, profile_name, profile, protocol, device, commit), **measured,
                  "capture_seconds": capture_seconds, "record_seconds": time.perf_counter() - t0}
        if run.fp8:
            record.update(fp8_changes(record))
            print(f"{run.name}: unquantised wikitext2 {record['unquantised_wikitext2_ppl']:.3f}, fp8 weights "
                  f"{record['wikitext2_ppl']:.3f} ({record['fp8_wikitext2_change']:+.2%}), fp8 "
                  f"weights+activations {record['fp8_act_wikitext2_ppl']:.3f} "
                  f"({record['fp8_act_wikitext2_change']:+.2%})", flush=True)
        results.add(record)
        print(f"{run.name:20s} {run.pattern:12s} {run.sparsity:.2f}  wikitext2 {record['wikitext2_ppl']:10.3f}  "
              f"c4 {record['c4_ppl']:10.3f}  prune {record['prune_seconds']:7.1f}s", flush=True)
    return results.records


def seeds_file(out: Path) -> Path:
    """Where the per-seed records of a held-out run go: quality.json -> quality-seeds.json."""
    return out.with_name(f"{out.stem}-seeds{out.suffix}")


def merge(out: Path, sources: list[Path]) -> None:
    """Fold the records of other runs' result files (and their per-seed files) into
    out; a record with the same key replaces the one there."""
    for source in sources:
        for src, dst, key in ((source, out, KEY), (seeds_file(source), seeds_file(out), KEY + ("seed",))):
            records = load_records(src)
            if records:
                ResultFile(dst, key).extend(records)
                print(f"{src}: {len(records)} record(s) -> {dst}")


def mean_record(per_seed: list[dict]) -> dict:
    """One record from a method's per-seed records: the mean of each measured number,
    and the spread (sample standard deviation, min, max) of the perplexities."""
    first = per_seed[0]
    record = {k: v for k, v in first.items() if k not in ("seed", "record_seconds", "phase_seconds",
                                                          "owl_block_sparsity", "capture_seconds")}
    for key in ("wikitext2_ppl", "c4_ppl", "prune_seconds", "mean_rel_error", "measured_sparsity"):
        values = [r[key] for r in per_seed]
        record[key] = statistics.fmean(values)
        if key.endswith("_ppl"):
            record[f"{key}_seeds"] = values
            record[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            record[f"{key}_min"], record[f"{key}_max"] = min(values), max(values)
    record["seeds"] = [r["seed"] for r in per_seed]
    record["commit"] = ",".join(sorted({r["commit"] for r in per_seed}))
    return record


def run_heldout(profile_name: str, *, out: Path, data_dir: Path, device: str, only: list[str] | None = None,
                force: bool = False, progress: bool = False, cache_dir: str | None = None,
                settings: list[str] | None = None) -> list[dict]:
    """The held-out protocol (issue 13): every run of heldout_grid once per seed, each
    seed's record written at once (a rerun skips it), the mean written when the last
    seed of a run is in."""
    profile = PROFILES[profile_name]
    protocol = profile.protocol(device)
    results, seeded = ResultFile(out, KEY), ResultFile(seeds_file(out), KEY + ("seed",))
    runs = [r for r in heldout_grid(settings) if not only or r.name in only]

    def key(run, **more):
        return dict(model=profile.model, method=run.name, pattern=run.pattern, sparsity=run.sparsity,
                    protocol=protocol, **more)

    todo = [(run, seed) for run in runs for seed in profile.seeds
            if force or not (results.has(**key(run)) or seeded.has(**key(run, seed=seed)))]
    print(f"{len(todo)} seed record(s) to measure ({protocol}) -> {seeded.path}, means -> {out}", flush=True)
    if todo:
        dense, tokenizer = load_model(profile.model, dtype=profile.dtype, device=device, cache_dir=cache_dir)
        bos_id = window_bos_id(dense.config, tokenizer)
        _, wiki, c4val = load_eval_data(data_dir, tokenizer, profile, bos_id)
        commit = git_commit()
        inputs_of: dict[int, tuple] = {}   # seed -> (block inputs, capture seconds)
        for run, seed in todo:
            if seed not in inputs_of:
                t0 = time.perf_counter()
                calib = load_calibration(data_dir, tokenizer, profile, seed, bos_id)
                inputs_of[seed] = (capture_block_inputs(dense, calib, device=device), time.perf_counter() - t0)
            inputs, capture_seconds = inputs_of[seed]
            t0 = time.perf_counter()
            measured = measure(run, dense, inputs, wiki, c4val, device=device, progress=progress)
            seeded.add({**describe(run, profile_name, profile, protocol, device, commit), "seed": seed,
                        **measured, "capture_seconds": capture_seconds,
                        "record_seconds": time.perf_counter() - t0})
            print(f"{run.name:20s} {setting_of(run):18s} seed {seed}  wikitext2 {measured['wikitext2_ppl']:10.3f}  "
                  f"c4 {measured['c4_ppl']:10.3f}  prune {measured['prune_seconds']:7.1f}s", flush=True)
            if force or not results.has(**key(run)):
                per_seed = [r for r in seeded.records if seeded.key(r)[:len(KEY)] == seeded.key(key(run))[:len(KEY)]]
                if sorted(r["seed"] for r in per_seed) == sorted(profile.seeds):
                    results.add(mean_record(sorted(per_seed, key=lambda r: r["seed"])))
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
                        help="pattern:sparsity of the grid to run, e.g. unstructured:0.5 or 2:4:0.5 (repeatable; "
                             "heldout runs them in the order given)")
    parser.add_argument("--cache-dir", default=None, help="where the converted model is cached")
    parser.add_argument("--force", action="store_true", help="redo records already in the JSON")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="FILE",
                        help="measure nothing: fold these result files (and their -seeds files) into --out")
    args = parser.parse_args(argv)
    if args.merge:
        merge(args.out, args.merge)
        return
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    profile = args.profile or ("paper" if device.startswith("cuda") else "cpu")
    run_grid(profile, out=args.out, data_dir=args.data_dir, device=device, only=args.only,
             force=args.force, progress=args.progress, cache_dir=args.cache_dir, settings=args.setting)


if __name__ == "__main__":
    main()
