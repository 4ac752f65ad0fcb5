"""What every stage does around its real work: start-up checks, messages, device, memory."""
from __future__ import annotations

import resource
import sys
import time

from .params import ParamError

# Set by the pipeline for its stages: the DVC experiment the run is saved as.
EXPERIMENT_ENV = "ADMM_PRUNE_EXPERIMENT"


def say(stage: str, message: str) -> None:
    # stderr, unbuffered: DVC and the flow stream it live next to the progress bars.
    print(f"[{stage}] {message}", file=sys.stderr, flush=True)


def resolve_device(device: str) -> str:
    from pruning.models import resolve_device as resolve
    from pruning.settings import SettingsError
    try:
        return resolve(device)
    except SettingsError as err:
        raise err.within("model") from None


def peak_memory_mib(device: str) -> dict:
    """Peak resident memory of this process and, on CUDA, peak allocated GPU memory."""
    out = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.startswith("cuda"):
        import torch
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def main_wrapper(stage: str, body) -> None:
    """Run a stage body; a bad parameter exits with its message and status 2, no traceback."""
    from .workspace_lock import PipelineBusy, guard_stage

    start = time.perf_counter()
    try:
        guard_stage(stage)
        body()
    except (ParamError, PipelineBusy) as err:
        say(stage, f"error: {err}")
        sys.exit(2)
    say(stage, f"done in {time.perf_counter() - start:.1f} s")
