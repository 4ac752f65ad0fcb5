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


# ---------------------------------------------------------------- what each stage's code is

def _module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return base.with_suffix(".py") if base.with_suffix(".py").is_file() else None


def _project_imports(path: Path, module: str) -> set[str]:
    """Every stages.* / pruning.* module that `path` imports, at any depth of the
    code (a function-level import counts: the stage runs that function)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}  # `from p import m`: m may be a module
    return {name for name in found if name.split(".")[0] in ("stages", "pruning")}


def import_closure(module: str) -> set[str]:
    """The project files that running `python -m <module>` can execute: the module,
    everything it imports transitively, and the __init__ of every package on the way."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        parts = todo.pop().split(".")
        for depth in range(1, len(parts) + 1):
            name = ".".join(parts[:depth])
            path = _module_file(name)
            if path is not None and path not in seen:
                seen.add(path)
                todo.extend(_project_imports(path, name))
    return {path.relative_to(ROOT).as_posix() for path in seen}


STAGES = ("model", "calibrate", "prune", "convert", "evaluate", "report")


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_imports_only_code_its_dvc_deps_declare(stage):
    """DVC reruns a stage when a declared dep changes: code the stage runs but does not
    declare would change results without a rerun. Red when e.g. stages/paths.py is
    dropped from a stage's deps, or a stage starts importing a module nobody declared."""
    from stages.paths import declared

    missing = import_closure(f"stages.{stage}") - set(declared(stage, "deps"))
    assert not missing, f"dvc.yaml: stage {stage} runs {sorted(missing)} but does not list them in its deps"


def test_the_block_store_keys_on_the_code_the_prune_stage_declares(tmp_path, monkeypatch):
    """One definition of the prune stage's library code: its dvc.yaml deps. Red when
    library_fingerprint hashes another set (e.g. all of pruning/ again, so an edit to a
    module prune never runs invalidates every stored block, or a subset that misses one)."""
    import shutil

    from stages import hashing, paths

    code = {p.as_posix() for p in paths.stage_code("prune")}
    assert code == {p for p in import_closure("stages.prune") if p.startswith("pruning/")}
    shutil.copytree(ROOT / "pruning", tmp_path / "pruning")
    monkeypatch.setattr(paths, "ROOT", tmp_path)
    before = hashing.library_fingerprint("prune")
    unused = next(p for p in sorted((tmp_path / "pruning").glob("*.py")) if f"pruning/{p.name}" not in code)
    unused.write_text(unused.read_text() + "\n# an edit prune never runs\n")
    assert hashing.library_fingerprint("prune") == before
    used = tmp_path / "pruning" / "settings.py"
    used.write_text(used.read_text() + "\n# an edit prune runs\n")
    assert hashing.library_fingerprint("prune") != before


def test_settings_checks_import_neither_torch_nor_transformers():
    """The static params check runs before anything heavy is loaded, so a bad setting
    is refused in well under two seconds. Red when pruning/__init__ imports its
    submodules eagerly again, or stages/params pulls in torch."""
    import subprocess
    import sys

    code = ("import sys, pruning, pruning.settings, pruning.data, stages.params, flows.cli\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'datasets', 'prefect') if m in sys.modules)\n"
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
