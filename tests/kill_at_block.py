"""Test-only fault injection: run the prune stage and SIGKILL it (no cleanup, like an
OOM kill) when it is about to compute block N, i.e. when the block store has no
entry for N. Production code knows nothing of this.

Usage, in a workspace that holds stages/ and pruning/:  python tests/kill_at_block.py N
"""
import os
import runpy
import signal
import sys


def main() -> None:
    kill_at = int(sys.argv[1])
    sys.path.insert(0, os.getcwd())  # the workspace's stages/ and pruning/, as `python -m` would see them
    from stages.block_store import FingerprintBlockStore

    load = FingerprintBlockStore.load

    def load_or_die(self, index):
        found = load(self, index)
        if found is None and index == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return found

    FingerprintBlockStore.load = load_or_die
    sys.argv = ["stages.prune"]
    runpy.run_module("stages.prune", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
