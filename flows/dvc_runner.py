"""Running DVC from Python: one stage at a time, with its output streamed live and
parsed for what DVC decided.

DVC prints one of three lines per stage, and they are how we tell a stage that ran
from one that was skipped or restored from the run-cache:
  Running stage 'prune':
  Stage 'prune' didn't change, skipping
  Stage 'prune' is cached - skipping run, checking out outputs
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

STAGES = ("model", "calibrate", "prune", "convert", "evaluate", "report")

RAN, SKIPPED, RESTORED = "ran", "skipped", "restored"
_OUTCOME_PATTERNS = (
    (re.compile(r"Running stage '([^']+)'"), RAN),
    (re.compile(r"Stage '([^']+)' didn't change, skipping"), SKIPPED),
    (re.compile(r"Stage '([^']+)' is cached - skipping run, checking out outputs"), RESTORED),
)


class StageFailed(RuntimeError):
    def __init__(self, stage: str, returncode: int, tail: str):
        super().__init__(f"stage {stage!r} failed (exit {returncode}):\n{tail}")
        self.stage, self.returncode, self.tail = stage, returncode, tail


@dataclass
class StageRun:
    stage: str
    outcome: str          # ran | skipped | restored
    seconds: float
    output: str = field(default="", repr=False)  # what DVC and the stage printed

    @property
    def cached(self) -> bool:
        return self.outcome in (SKIPPED, RESTORED)

    def as_dict(self) -> dict:
        return {"stage": self.stage, "outcome": self.outcome, "seconds": self.seconds, "cached": self.cached}


def dvc_executable() -> list[str]:
    """The dvc of this interpreter's environment, whatever PATH says."""
    return [sys.executable, "-m", "dvc"]


def stage_env(extra: dict | None = None) -> dict:
    """Environment for DVC and the stage commands it spawns: `python` in dvc.yaml must
    be this interpreter (with torch), even when the venv is not activated."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def parse_outcomes(text: str) -> dict[str, str]:
    outcomes: dict[str, str] = {}
    for line in text.splitlines():
        for pattern, outcome in _OUTCOME_PATTERNS:
            match = pattern.search(line)
            if match and match.group(1) not in outcomes:
                outcomes[match.group(1)] = outcome
    return outcomes


def run_dvc(args: list[str], workspace: str | Path, env: dict | None = None, echo: bool = True) -> tuple[int, str]:
    """Run `dvc <args>` in the workspace; stream its output (progress bars included)
    to our stdout as it comes, and return (exit code, full output)."""
    proc = subprocess.Popen([*dvc_executable(), *args], cwd=workspace, env=stage_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    chunks, pending = [], b""
    assert proc.stdout is not None
    while chunk := proc.stdout.read1(65536):  # whatever is there: keeps \r progress bars live
        chunks.append(chunk)
        if echo:
            pending = _echo_complete(pending + chunk)
    if echo and pending:
        _echo(pending)
    proc.wait()
    return proc.returncode, b"".join(chunks).decode("utf-8", errors="replace")


# DVC's advice after every stage (git add dvc.lock, autostage, dvc push) would be
# printed six times per run; the pipeline prints its own summary instead.
_HINTS = (b"To track the changes with git, run:", b"git add ", b"To enable auto staging, run:",
          b"dvc config core.autostage true", b"Use `dvc push` to send your updates to remote storage.",
          b"Updating lock file 'dvc.lock'", b"Generating lock file 'dvc.lock'",
          b"Data and pipelines are up to date.")


def _echo_complete(data: bytes) -> bytes:
    """Echo everything up to the last line end (a newline, or the carriage return of a
    progress bar) minus DVC's hint lines and blank lines; return the unfinished rest."""
    cut = max(data.rfind(b"\n"), data.rfind(b"\r"))
    if cut < 0:
        return data
    kept = [line for line in data[:cut + 1].splitlines(keepends=True)
            if not (line.endswith(b"\n") and (not line.strip() or line.strip().startswith(_HINTS)))]
    _echo(b"".join(kept))
    return data[cut + 1:]


def readable_output(output: str) -> list[str]:
    """The lines worth keeping in a log: each progress bar in its final state (the
    text after its last carriage return), without DVC's hints and blank lines."""
    lines = [line.rstrip("\r").rsplit("\r", 1)[-1].rstrip() for line in output.split("\n")]
    hints = tuple(hint.decode() for hint in _HINTS)
    return [line for line in lines if line.strip() and not line.strip().startswith(hints)]


def _echo(chunk: bytes) -> None:
    out = sys.stdout
    if hasattr(out, "buffer"):
        out.flush()
        out.buffer.write(chunk)
        out.buffer.flush()
    else:  # a replaced stdout (some loggers, notebooks) takes text only
        out.write(chunk.decode("utf-8", errors="replace"))
        out.flush()


def repro_stage(workspace: str | Path, stage: str, env: dict | None = None, echo: bool = True,
                force: bool = False) -> StageRun:
    """`dvc repro --single-item <stage>`: DVC skips it, restores it or runs it."""
    start = time.perf_counter()
    args = ["repro", "--single-item", stage] + (["--force"] if force else [])
    code, output = run_dvc(args, workspace, env, echo)
    if code != 0:
        raise StageFailed(stage, code, "\n".join(output.strip().splitlines()[-25:]))
    outcome = parse_outcomes(output).get(stage)
    if outcome is None:
        raise StageFailed(stage, code, "DVC said neither 'Running stage', 'didn't change' nor "
                                       f"'is cached' for this stage:\n{output[-2000:]}")
    return StageRun(stage, outcome, round(time.perf_counter() - start, 2), output)
