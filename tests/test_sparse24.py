"""bench/sparse24.py's logic on CPU with tiny shapes: the smoke run writes no GPU
claims, the timer cycles through cold-L2 copies, the per-call profile spots
re-compression, and the target verdict reads the cases honestly. CUDA parts skip."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_sparse24", REPO / "bench" / "sparse24.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_exercises_every_case_and_writes_no_gpu_claims(bench, tmp_path):
    """Breaks if a case group crashes on CPU, if a no-GPU run records timings, or if
    the unavailable FP8 2:4 kernels are not named with their reasons."""
    out = tmp_path / "sparse24.json"
    data = bench.main(["--cpu-smoke", "--size-shapes", "tiny", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written == data
    assert written["device"].startswith("none") and written["cases"] == []
    assert written["target"]["verdict"] == "not measured"
    assert "python bench/sparse24.py --only" in written["note"]
    exercised = set(written["cpu_smoke_exercised"])
    assert exercised == bench.all_case_names(bench.PLANS["smoke"], list(bench.DTYPES))
    # Dense arms run on CPU; every sparse arm says why it could not.
    assert all("sparse" not in name or name in written["cpu_smoke_errors"] for name in exercised
               if name.startswith("percall"))
    assert "no CUDA" in written["cpu_smoke_errors"]["linear 64x128 t16 fp16"]
    assert "no FP8 2:4 kernel here" in written["cpu_smoke_errors"]["linear 64x128 t16 fp8"]
    assert written["fp8_kernels"]["dense"] == "available"
    assert written["fp8_kernels"]["cusparselt"] != "available"
    assert 0.5 < written["size_ratio"] <= 0.57
    assert written["size_fp8"]["size_ratio"] <= 0.33 and written["size_fp8"]["format"] == "nm-packed-fp8 v1"


def test_smoke_keeps_existing_gpu_results(bench, tmp_path):
    out = tmp_path / "sparse24.json"
    gpu_results = {"device": "NVIDIA H100 (sm_90)", "size_ratio": 0.5625,
                   "cases": [{"case": "linear 4096x4096 t16 fp16", "dense_ms": 1.0, "sparse_ms": 0.8, "speedup": 1.25}]}
    out.write_text(json.dumps(gpu_results))
    bench.main(["--cpu-smoke", "--size-shapes", "tiny", "--only", "percall", "--dtypes", "fp16", "--out", str(out)])
    assert json.loads(out.read_text()) == gpu_results


def test_timer_cycles_through_every_copy(bench):
    """Breaks if the timed loop reuses one copy (a warm L2) instead of rotating."""
    calls = [0, 0, 0]
    fns = [lambda i=i: calls.__setitem__(i, calls[i] + 1) for i in range(3)]
    timer = bench.Timer(torch.device("cpu"), warmup=1, target_ms=0.01, repeats=2, max_iters=7)
    assert timer(fns) >= 0
    assert min(calls) >= 3 and max(calls) - min(calls) <= 3


def test_copies_span_the_rotation_bytes(bench):
    mib = 2**20
    assert bench.copies_for(32 * mib, 256 * mib) == 9    # 8 others = 256 MiB between two uses
    assert bench.copies_for(470 * mib, 256 * mib) == 2   # one big weight: still never the same twice in a row
    assert bench.copies_for(0, 256 * mib) > 2**20


def test_per_call_profile_flags_recompression_and_copies(bench):
    """The fp16 2:4 per-call check: a compression or algorithm search inside a call is
    flagged, and so are copies; a plain matmul is clean."""
    assert bench.classify_ops({"aten::_cslt_compress": 1, "aten::mm": 1})["recompresses_per_call"] == [
        "aten::_cslt_compress"]
    assert bench.classify_ops({"aten::_cslt_sparse_mm_search": 1})["recompresses_per_call"]
    assert bench.classify_ops({"aten::mm": 1, "aten::linear": 1}) == {"recompresses_per_call": [],
                                                                     "copies_per_call": []}
    w, x = torch.randn(32, 16), torch.randn(8, 32)
    clean = bench.profile_calls(lambda: x @ w, calls=3, device=torch.device("cpu"))
    assert clean["ops_per_call"]["aten::matmul"] == 1 and not bench.classify_ops(clean["ops_per_call"])["copies_per_call"]
    copying = bench.profile_calls(lambda: x.t().contiguous().t() @ w, calls=3, device=torch.device("cpu"))
    assert bench.classify_ops(copying["ops_per_call"])["copies_per_call"]


def test_target_verdict_reads_only_fp8_big_linear_at_2048_tokens_or_more(bench):
    def case(tokens, speedup, dtype="fp8", shape="28672x8192"):
        return {"case": f"linear {shape} t{tokens} {dtype}", "tokens": tokens, "dtype": dtype, "speedup": speedup}
    assert bench.target_verdict([case(1024, 2.0), case(2048, 1.2, dtype="fp16")])["verdict"] == "not measured"
    missed = bench.target_verdict([case(2048, 1.1), case(4096, 1.25), case(2048, 2.0, shape="4096x4096")])
    assert missed["verdict"] == "missed" and missed["best"]["speedup"] == 1.25
    assert bench.target_verdict([case(2048, 1.1), case(16384, 1.31)])["verdict"] == "met"
    failed = bench.target_verdict([{"case": "linear 28672x8192 t2048 fp8", "tokens": 2048, "dtype": "fp8",
                                    "speedup": None, "error": "sparse arm: no kernel"}])
    assert failed["verdict"] == "not measured" and failed["errors"] == ["sparse arm: no kernel"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_sparse_linear_does_not_recompress_per_call(bench):
    from pruning.sparse_exec import convert_linear
    layer = torch.nn.Linear(512, 512, bias=False, device="cuda", dtype=torch.float16)
    bench.make_24_(layer.weight)
    assert convert_linear(layer) is None
    x = torch.randn(64, 512, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        profiled = bench.profile_calls(lambda: layer(x), calls=5, device=torch.device("cuda"))
    assert bench.classify_ops(profiled["ops_per_call"])["recompresses_per_call"] == []
