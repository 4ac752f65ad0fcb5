"""Benchmark scripts on tiny profiles (seconds): they write their JSON, and a rerun
skips what is already there. Also: OWL's per-block sparsities average to s."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import quality  # noqa: E402
import report  # noqa: E402
import speed  # noqa: E402

from pruning import capture_block_inputs  # noqa: E402
from pruning.models import load_model  # noqa: E402
from pruning.owl import block_outlier_ratios, owl_block_overrides, owl_sparsities  # noqa: E402


def _write_data(data_dir: Path) -> None:
    """Small stand-ins for the three data files (same names and formats)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    words = "pruning keeps the weights that matter and drops the rest of every layer".split()

    def text(n):
        return " ".join(rng.choice(words) for _ in range(n))

    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "c4-train-first1000.jsonl", "w", encoding="utf-8") as f:
        for _ in range(10):
            f.write(json.dumps({"text": text(40)}) + "\n")
    (data_dir / "wikitext2-raw-test.txt").write_text("\n".join(text(20) for _ in range(10)), encoding="utf-8")
    pq.write_table(pa.table({"text": [text(30) for _ in range(10)]}), data_dir / "c4_validation_2k.parquet")


def test_quality_tiny_writes_records_and_resumes(tmp_path, capsys):
    _write_data(tmp_path / "data")
    out = tmp_path / "quality.json"
    only = ["dense", "wanda", "admm-grad-owl"]
    records = quality.run_grid("tiny", out=out, data_dir=tmp_path / "data", device="cpu", only=only)
    saved = json.loads(out.read_text())
    assert saved == records
    # dense once; wanda at 4 unstructured sparsities and 2 N:M patterns; OWL at 0.5, 0.7, 0.8
    assert len(saved) == 1 + 6 + 3
    for r in saved:
        for field in ("model", "method", "pattern", "sparsity", "wikitext2_ppl", "c4_ppl", "protocol",
                      "prune_seconds", "commit"):
            assert field in r
        assert r["pattern"] in ("unstructured", "2:4", "4:8")
        assert r["wikitext2_ppl"] > 1 and r["c4_ppl"] > 1
        assert r["protocol"].startswith("cpu: c4 2x32 seed0")
    nm = [r for r in saved if r["pattern"] != "unstructured"]
    assert nm and all(r["sparsity"] == 0.5 for r in nm)
    owl = [r for r in saved if r["method"] == "admm-grad-owl"]
    assert all(abs(sum(r["owl_block_sparsity"]) / len(r["owl_block_sparsity"]) - r["sparsity"]) < 1e-3
               for r in owl)
    capsys.readouterr()
    # Resume: nothing left to do, file unchanged.
    again = quality.run_grid("tiny", out=out, data_dir=tmp_path / "data", device="cpu", only=only)
    assert "0 record(s) to measure" in capsys.readouterr().out
    assert again == saved and json.loads(out.read_text()) == saved
    assert "| wanda |" in report.quality_tables(saved)


def test_quality_heldout_writes_seed_records_and_their_mean(tmp_path, capsys):
    """The held-out protocol (issue 13): one record per seed in quality-seeds.json, and
    in quality.json their mean, with the spread and a protocol naming `heldout` and the
    seeds. Red when the mean is not the seeds' mean, a seed is skipped, the protocol
    loses its words, or a rerun measures again."""
    _write_data(tmp_path / "data")
    out = tmp_path / "quality.json"
    only = ["admm-grad", "admm-grad-ft-owl"]
    records = quality.run_grid("heldout-tiny", out=out, data_dir=tmp_path / "data", device="cpu", only=only,
                               settings=["unstructured:0.6"])
    seeds = json.loads((tmp_path / "quality-seeds.json").read_text())
    assert sorted((r["method"], r["seed"]) for r in seeds) == [(m, s) for m in sorted(only) for s in (0, 1, 2)]
    assert len(records) == 2 and json.loads(out.read_text()) == records
    for r in records:
        assert "heldout" in r["protocol"] and "seeds 0,1,2" in r["protocol"]
        mine = [s for s in seeds if s["method"] == r["method"]]
        assert r["wikitext2_ppl"] == pytest.approx(sum(s["wikitext2_ppl"] for s in mine) / 3)
        assert r["c4_ppl"] == pytest.approx(sum(s["c4_ppl"] for s in mine) / 3)
        assert r["wikitext2_ppl_min"] <= r["wikitext2_ppl"] <= r["wikitext2_ppl_max"]
        assert r["wikitext2_ppl_std"] > 0 and r["seeds"] == [0, 1, 2]
    recipe = next(r for r in records if r["method"] == "admm-grad-ft-owl")
    assert (recipe["finetune"], recipe["owl"]) == ("standard", True)
    capsys.readouterr()
    assert quality.run_grid("heldout-tiny", out=out, data_dir=tmp_path / "data", device="cpu", only=only,
                            settings=["unstructured:0.6"]) == records
    assert "0 seed record(s) to measure" in capsys.readouterr().out
    table = report.heldout_tables(records)
    assert "| 60% | recipe: + OWL + fine-tune |" in table and "heldout" not in report.quality_tables(records)
    # The recipe is judged only against plain admm-grad measured at the same commit.
    moved = [{**r, "commit": "other"} if r is recipe else r for r in records]
    assert "not judged: commit other" in report.heldout_tables(moved)


def test_merge_folds_a_second_run_into_the_results(tmp_path, capsys):
    """Two processes get their own --out; --merge folds the second one's means and
    per-seed records in, replacing records with the same key and keeping the rest."""
    def rec(method, ppl, **more):
        return dict(model="m", method=method, pattern="unstructured", sparsity=0.5, protocol="heldout",
                    wikitext2_ppl=ppl, **more)

    main, other = tmp_path / "quality.json", tmp_path / "quality-x.json"
    main.write_text(json.dumps([rec("admm-grad", 10.0), rec("admm-grad-owl", 99.0)]))
    other.write_text(json.dumps([rec("admm-grad-owl", 9.0), rec("admm-grad-ft", 8.0)]))
    (tmp_path / "quality-x-seeds.json").write_text(json.dumps([rec("admm-grad-ft", 8.5, seed=0)]))
    quality.main(["--out", str(main), "--merge", str(other)])
    records = json.loads(main.read_text())
    merged = {r["method"]: r["wikitext2_ppl"] for r in records}
    assert merged == {"admm-grad": 10.0, "admm-grad-owl": 9.0, "admm-grad-ft": 8.0} and len(records) == 3
    seeds = json.loads((tmp_path / "quality-seeds.json").read_text())
    assert [(r["method"], r["seed"]) for r in seeds] == [("admm-grad-ft", 0)]


def test_speed_tiny_writes_records_and_resumes(tmp_path, capsys):
    out = tmp_path / "speed.json"
    records = speed.run("tiny", out=out, device="cpu")
    saved = json.loads(out.read_text())
    assert saved == records
    layer = [r for r in saved if r["scope"] == "layer"]
    model = [r for r in saved if r["scope"] == "model"]
    assert {r["method"] for r in model} == set(speed.METHODS) | {speed.METHODS[0] + "+offload"}
    for r in model:
        assert set(r["phase_seconds"]) == {"capture", "gram", "solve", "propagate"}
        assert r["host_peak_gib"] > 0
    assert {r["method"] for r in layer} == set(speed.METHODS) | set(speed.LAYER_EXTRA)
    assert len(layer) == 4 * (len(speed.PROFILES["tiny"].shapes) + len(speed.PROFILES["tiny"].sweep_d_in))
    for r in saved:
        for field in ("method", "scope", "shape", "seconds", "peak_gib", "device", "commit"):
            assert field in r
        assert r["seconds"] > 0 and r["peak_gib"] > 0
    capsys.readouterr()
    assert speed.run("tiny", out=out, device="cpu") == saved
    assert capsys.readouterr().out == ""   # nothing re-measured
    assert "Whole-model prune" in report.speed_tables(saved)


def test_owl_sparsities_mean_and_range():
    rng = random.Random(1)
    for s, lam in ((0.5, 0.08), (0.7, 0.08), (0.8, 0.15), (0.1, 0.1)):
        for n in (3, 12, 30):
            ratios = [rng.random() ** 3 for _ in range(n)]
            out = owl_sparsities(ratios, s, lam)
            assert abs(sum(out) / n - s) < 1e-9
            assert all(s - lam - 1e-12 <= v <= s + lam + 1e-12 for v in out)
            # more outliers -> lower sparsity
            order = sorted(range(n), key=lambda i: ratios[i])
            assert all(out[a] >= out[b] - 1e-12 for a, b in zip(order, order[1:]))
    assert owl_sparsities([0.2, 0.2, 0.2], 0.6) == pytest.approx([0.6] * 3)
    with pytest.raises(ValueError, match="lam"):
        owl_sparsities([0.1, 0.2], 0.95, 0.08)


def test_owl_block_overrides_on_a_model():
    model, _ = load_model("tiny-random-llama")
    calib = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(model, calib)
    ratios = block_outlier_ratios(model, inputs)
    assert len(ratios) == 4 and all(0 <= r < 1 for r in ratios)
    overrides = owl_block_overrides(model, inputs, 0.6)
    values = [overrides[i]["sparsity"] for i in range(4)]
    assert abs(sum(values) / 4 - 0.6) < 1e-9
    assert all(0.52 - 1e-12 <= v <= 0.68 + 1e-12 for v in values)


def test_tf32_rounding_keeps_ten_mantissa_bits():
    x = torch.tensor([1.0, 1.0 + 2 ** -10, 1.0 + 2 ** -11 + 2 ** -12, 1.0 + 2 ** -12, -3.0000001])
    out = quality.round_to_tf32(x)
    assert out.tolist() == [1.0, 1.0 + 2 ** -10, 1.0 + 2 ** -10, 1.0, -3.0]


def test_evaluate_and_bench_score_the_same_token_stream(tmp_path, monkeypatch):
    """One reader for local text (pruning.data.read_documents): the evaluate stage and
    bench/quality.py cut the same windows from the same files. Red when the stage reads
    local files another way again (at b295bc5, datasets' text builder kept the blank
    lines that read_documents drops, so the WikiText-2 streams differed)."""
    from pruning.models import byte_level_tokenizer
    from stages.evaluate import eval_windows

    _write_data(tmp_path / "data")
    wiki = tmp_path / "data" / "wikitext2-raw-test.txt"
    wiki.write_text("\n \n" + wiki.read_text().replace("\n", "\n\n", 3), encoding="utf-8")  # blank lines
    tokenizer = byte_level_tokenizer()
    profile = quality.PROFILES["tiny"]
    _, bench_wiki, bench_c4 = quality.load_eval_data(tmp_path / "data", tokenizer, profile)
    spec = {"name": None, "data_files": None, "split": "test", "text_field": "text"}
    e = {"seqlen": profile.seqlen, "max_windows": profile.wikitext_windows, "c4_windows": profile.c4_windows,
         "wikitext2": {**spec, "path": "data/wikitext2-raw-test.txt"},
         "c4": {**spec, "path": "data/c4_validation_2k.parquet"}}
    assert profile.wikitext_windows == profile.c4_windows  # so max_windows caps both the same way
    monkeypatch.chdir(tmp_path)
    stage = eval_windows(e, tokenizer)
    assert torch.equal(stage["wikitext2"], bench_wiki) and torch.equal(stage["c4"], bench_c4)
