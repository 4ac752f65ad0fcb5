"""Does the thread count change the result? The default pipeline, pruned once at 1
and once at 2 torch threads, each in a private workspace (flows/experiment.py) that
shares this repository's DVC cache, with the prune stage forced (DVC's run-cache
does not know the thread count). Issue 11's target: pruned WikiText-2 within 1 %.

    python bench/threads.py            # both, about 6 minutes on 2 idle cores
    python bench/threads.py --threads 1,2,4

Writes bench/results/threads.json (one record per thread count, resumable by
deleting it) and prints the spread. The same thread count gives bitwise-identical
weights (tests/test_pipeline_units.py checks that); different counts sum in a
different order, and ADMM-Grad's mask choices follow the rounding.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import git_commit  # noqa: E402
from flows.dvc_runner import active_session  # noqa: E402
from flows.experiment import experiment_workspace, work_env  # noqa: E402
from flows.workspace import run_pipeline  # noqa: E402
from stages.paths import EVAL_METRICS, PRUNE_METRICS  # noqa: E402

OUT = REPO / "bench" / "results" / "threads.json"


def prune_with_threads(threads: int) -> dict:
    env = {**work_env(REPO), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with experiment_workspace(REPO) as ws:
        run_pipeline(ws, [], None, lambda stage, w, forced: active_session(w).repro(stage, force=forced).as_dict(),
                     force=("prune",), env=env)
        ev = json.loads((ws / EVAL_METRICS).read_text())
        pr = json.loads((ws / PRUNE_METRICS).read_text())
        params = (ws / "params.yaml").read_text()
    return {"threads": threads, "torch_threads": pr["torch_threads"], "wikitext2_ppl": ev["wikitext2_ppl"],
            "c4_ppl": ev["c4_ppl"], "prune_seconds": pr["prune_seconds"], "commit": git_commit(),
            "params_sha": __import__("hashlib").sha256(params.encode()).hexdigest()[:12]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    args = parser.parse_args(argv)
    records = json.loads(OUT.read_text()) if OUT.is_file() else []
    for threads in [int(t) for t in args.threads.split(",")]:
        if any(r["threads"] == threads and r["commit"] == git_commit() for r in records):
            continue
        records.append(prune_with_threads(threads))
        OUT.write_text(json.dumps(records, indent=1) + "\n")
    current = [r for r in records if r["commit"] == git_commit()]
    for r in current:
        print(f"{r['threads']} thread(s): WikiText-2 {r['wikitext2_ppl']:.3f}, C4 {r['c4_ppl']:.3f}, "
              f"prune {r['prune_seconds']:.0f} s")
    ppl = [r["wikitext2_ppl"] for r in current]
    if len(ppl) > 1:
        print(f"WikiText-2 spread: {100 * (max(ppl) - min(ppl)) / min(ppl):.2f} % (target: within 1 %)")


if __name__ == "__main__":
    main()
