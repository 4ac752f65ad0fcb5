"""DVC stages: one module per stage, each runnable as `python -m stages.<name>`.

A stage reads params.yaml and its input artifacts, calls the `pruning` library and
writes artifacts (safetensors for tensors, JSON for metadata) plus metrics/plots.
Stages never import prefect and never call each other: data passes through disk.
"""

import os

# Before torch loads OpenMP: worker threads that spin while waiting make every
# forward pass ~10x slower (SmolLM2, 256 tokens: 6.6 s instead of 0.68 s) as soon
# as another process wants one of the cores, e.g. on a shared 2-core machine.
# Passive waiting avoids that; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
