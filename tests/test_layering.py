"""Dependencies point one way: flows -> stages -> pruning. The library must run on the
GPU machine, which has neither prefect, dvc nor datasets."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "pruning": {"prefect", "prefect_dask", "dvc", "datasets", "stages", "flows"},
    "stages": {"prefect", "prefect_dask", "flows"},
    "bench": {"prefect", "prefect_dask", "dvc", "datasets", "stages", "flows"},
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_imports_against_the_grain(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no Python files"
    for path in files:
        bad = imported_roots(path) & FORBIDDEN[package]
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
