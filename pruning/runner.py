"""Block-sequential pruning of a whole decoder model.

1. Capture the inputs of decoder block 0 for every calibration sample, and the
   keyword arguments (masks, RoPE position embeddings, ...) the model hands each block.
2. For each block: run it on all samples with Gram hooks, prune its linear layers,
   then run the pruned block to make the next block's inputs.

Calibration forwards never use or pass a KV cache: a cache carried from one sample
to the next makes each sample attend to earlier samples' keys and corrupts every Gram.
"""
from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from .gram import GramCollector, exact_fp32_matmul
from .layer import admm_update, prune_layer
from .settings import LayerSettings, PruneSettings

_CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past")
_LAYER_PATHS = ("model.layers", "model.decoder.layers", "model.language_model.layers",
                "transformer.h", "gpt_neox.layers")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    for path in _LAYER_PATHS:
        obj = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"model: cannot find its decoder blocks (looked for {', '.join(_LAYER_PATHS)})")


def layers_prefix(model: nn.Module) -> str:
    layers = decoder_layers(model)
    return next(name for name, module in model.named_modules() if module is layers)


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def prunable_linear_names(model: nn.Module) -> list[str]:
    """Full module names of the linears inside decoder blocks (never embeddings or lm_head)."""
    prefix = layers_prefix(model)
    return [f"{prefix}.{i}.{name}" for i, block in enumerate(decoder_layers(model))
            for name in block_linears(block)]


# ---------------------------------------------------------------------------- capture

@dataclass
class BlockCall:
    """How the model calls one block, minus the hidden states."""
    args: tuple
    kwargs: dict


@dataclass
class BlockInputs:
    hidden: torch.Tensor            # (N, seqlen, hidden): block-0 inputs, one row per sample
    calls: list[BlockCall]          # per block


class _StopForward(Exception):
    pass


def _split_call(args, kwargs) -> tuple[torch.Tensor, BlockCall]:
    kwargs = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS}
    kwargs["use_cache"] = False
    if args:
        return args[0], BlockCall(tuple(args[1:]), kwargs)
    hidden = kwargs.pop("hidden_states")
    return hidden, BlockCall((), kwargs)


@contextmanager
def _blocks_visit(layers: nn.ModuleList, device):
    """Offloading: each block comes to `device` only while it runs, then goes home."""
    def arrive(module, args):
        module.to(device)

    def leave(module, args, output):
        module.to("cpu")

    handles = [h for layer in layers for h in (layer.register_forward_pre_hook(arrive),
                                               layer.register_forward_hook(leave))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _place(model: nn.Module, device, offload: bool) -> None:
    """All of the model on `device`, or (offload) all but the decoder blocks, which stay on the CPU."""
    if not offload:
        model.to(device)
        return
    layers = decoder_layers(model)
    parent_name, _, attr = layers_prefix(model).rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, attr, nn.ModuleList())   # hide the blocks while the rest moves
    try:
        model.to(device)
    finally:
        setattr(parent, attr, layers)
    layers.to("cpu")


@torch.no_grad()
def capture_block_inputs(model: nn.Module, calib_ids: torch.Tensor, *, device: str | torch.device = "cpu",
                         progress: bool = False, offload: bool = False) -> BlockInputs:
    """Block-0 inputs for each calibration sample (one clean forward each, no cache),
    and the call arguments of every block (taken from a full forward of sample 0:
    they depend on positions only, and e.g. Gemma3 gives each layer type its own)."""
    layers = decoder_layers(model)
    calls: list[BlockCall | None] = [None] * len(layers)
    hidden: list[torch.Tensor] = []

    def record_all(index, module, args, kwargs):
        h, call = _split_call(args, kwargs)
        calls[index] = call
        if index == 0:
            hidden.append(h.detach())

    def record_first(module, args, kwargs):
        hidden.append(_split_call(args, kwargs)[0].detach())
        raise _StopForward

    handles = [layer.register_forward_pre_hook(lambda m, a, k, i=i: record_all(i, m, a, k), with_kwargs=True)
               for i, layer in enumerate(layers)]
    try:
        with _blocks_visit(layers, device) if offload else nullcontext():
            model(calib_ids[:1].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    handle = layers[0].register_forward_pre_hook(record_first, with_kwargs=True)
    try:
        for ids in tqdm(calib_ids[1:], desc="capture", disable=not progress, unit="sample"):
            try:
                model(ids[None].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return BlockInputs(hidden=torch.cat(hidden, dim=0), calls=calls)


def run_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
    """One block on one sample (hidden: (seqlen, d) or (1, seqlen, d))."""
    out = block(hidden if hidden.dim() == 3 else hidden[None], *call.args, **call.kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def propagate(block: nn.Module, inputs: torch.Tensor, call: BlockCall) -> torch.Tensor:
    return torch.cat([run_block(block, x[None], call) for x in inputs], dim=0)


# ---------------------------------------------------------------------------- what to do

@dataclass
class PruneSpec(PruneSettings):
    """PruneSettings (pruning.settings: the default, per-block and per-layer
    overrides, and the one resolver) plus the masks a user brings:

    masks: {full module name: bool mask} — an ADMM update on a mask the user
           brings replaces mask selection for that layer.
    """
    masks: dict[str, torch.Tensor] | None = None

    def __post_init__(self):
        self._n_blocks: int | None = None  # known once validate(model) has seen the model

    def _has_mask(self, block_index: int, layer_name: str) -> bool:
        # Mask keys are full names (prefix.i.name), checked against the model by validate().
        tail = f"{block_index}.{layer_name}"
        return any(key.removesuffix(".weight") == tail or key.removesuffix(".weight").endswith("." + tail)
                   for key in self.masks or {})

    def settings_for(self, block_index: int, layer_name: str) -> LayerSettings:
        """The resolved settings of one layer (see pruning.settings.PruneSettings.resolve)."""
        return self.resolve(block_index, layer_name, n_blocks=self._n_blocks,
                            user_mask=self._has_mask(block_index, layer_name))

    def mask_for(self, full_name: str) -> torch.Tensor | None:
        if not self.masks:
            return None
        return self.masks.get(full_name, self.masks.get(full_name + ".weight"))

    def block_settings(self, block_index: int, layer_names: list[str], prefix: str = "") -> dict:
        """JSON-able settings of one block, with a digest of any user mask: the
        material for a fingerprint of the block's result."""
        out = {}
        for name in layer_names:
            entry = self.settings_for(block_index, name).as_dict()
            mask = self.mask_for(f"{prefix}{block_index}.{name}")
            if mask is not None:
                entry["mask_sha256"] = hashlib.sha256(mask.to(torch.uint8).cpu().numpy().tobytes()).hexdigest()
            out[name] = entry
        return {"true_sequential": self.true_sequential, "layers": out}

    def validate(self, model: nn.Module, mask_path: tuple = ("masks",)) -> dict[str, LayerSettings]:
        """Check every layer's settings and the user masks against the model before
        any heavy work (errors are SettingsErrors; a bad mask's path is `mask_path`);
        return the resolved settings by full layer name."""
        from .shapes import describe_linears

        layers = describe_linears(model)
        plan = self.plan(layers, {name: tuple(mask.shape) for name, mask in (self.masks or {}).items()},
                         mask_path=mask_path)
        self._n_blocks = max(layer.block for layer in layers) + 1
        return plan


# ---------------------------------------------------------------------------- runner

class BlockStore(Protocol):
    def load(self, index: int) -> tuple[dict[str, torch.Tensor], list[dict]] | None: ...
    def save(self, index: int, state: dict[str, torch.Tensor], stats: list[dict]) -> None: ...


@dataclass
class PruneResult:
    layers: list[dict]
    seconds: float
    reused_blocks: list[int]
    computed_blocks: list[int]


def _relative_error(old: torch.Tensor, new: torch.Tensor, gram: torch.Tensor) -> float:
    """‖X(W−W0)ᵀ‖² / ‖X W0ᵀ‖², from the Gram alone."""
    old, new = old.float(), new.float()
    diff = new - old
    num = ((diff @ gram) * diff).sum()
    den = ((old @ gram) * old).sum().clamp_min(1e-30)
    return float(num / den)


def _prune_one(full_name, linear, gram, settings: LayerSettings, spec: PruneSpec, cache: dict) -> dict:
    start = time.perf_counter()
    old = linear.weight.data
    mask = spec.mask_for(full_name)
    if mask is not None:
        new = admm_update(old, gram, mask.to(old.device), cache=cache,
                          **{k: v for k, v in settings.options.items() if k != "mask_steps"})
        method = "admm (user mask)"
    else:
        new, mask = prune_layer(old, gram, method=settings.method, sparsity=settings.sparsity,
                                pattern=settings.pattern, cache=cache, **settings.options)
        method = settings.method
    error = _relative_error(old, new, gram)
    linear.weight.data = new
    return {"name": full_name, "method": method, "pattern": settings.pattern,
            "sparsity": float((new == 0).float().mean()), "rel_error": error,
            "seconds": time.perf_counter() - start}


def _collect_grams(block, linears, inputs, call, active=None) -> GramCollector:
    collector = GramCollector(linears, active)
    with collector.attached():
        for x in inputs:
            collector.new_forward()
            run_block(block, x[None], call)
    return collector


def _prune_block(block, index, prefix, inputs, call, spec: PruneSpec) -> list[dict]:
    linears = block_linears(block)
    collector = _collect_grams(block, linears, inputs, call)  # every Gram, from the dense block
    stats = []
    for k, group in enumerate(collector.groups()):
        if spec.true_sequential and k > 0:
            # Later groups see the outputs of the groups already pruned in this block.
            collector = _collect_grams(block, linears, inputs, call, active={group[0]})
        cache: dict = {}  # layers of one group share the Gram's factorisation
        for name in group:
            stat = _prune_one(f"{prefix}{index}.{name}", linears[name], collector.gram_of(name),
                              spec.settings_for(index, name), spec, cache)
            stats.append({"block": index, **stat})
    return stats


@torch.no_grad()
def prune_model(model: nn.Module, calib_ids: torch.Tensor | None, spec: PruneSpec, *,
                device: str | torch.device | None = None, store: BlockStore | None = None,
                progress: bool = True, inputs: BlockInputs | None = None,
                offload: bool = False) -> PruneResult:
    """Prune every decoder block in place, block by block.

    `store` (optional) makes the run resumable: a block it can load is not pruned
    again, only propagated; every newly pruned block is saved to it.
    `offload` keeps the decoder blocks on the CPU and brings one at a time to
    `device`, so device memory holds one block plus the activations.
    """
    start = time.perf_counter()
    device = device or next(model.parameters()).device
    spec.validate(model)
    model.eval()
    _place(model, device, offload)
    if inputs is None:
        inputs = capture_block_inputs(model, calib_ids, device=device, progress=progress, offload=offload)
    hidden = inputs.hidden
    prefix = layers_prefix(model) + "."
    stats, reused, computed = [], [], []
    layers = decoder_layers(model)
    with exact_fp32_matmul():
        bar = tqdm(range(len(layers)), desc="prune", disable=not progress, unit="block")
        for i in bar:
            block, call = layers[i], inputs.calls[i]
            block.to(device)
            linears = block_linears(block)
            stored = store.load(i) if store is not None else None
            if stored is not None:
                state, block_stats = stored
                for name, weight in state.items():
                    linears[name].weight.data = weight.to(linears[name].weight)
                reused.append(i)
                bar.set_postfix_str(f"block {i}: restored")
            else:
                block_stats = _prune_block(block, i, prefix, hidden, call, spec)
                computed.append(i)
                if store is not None:
                    store.save(i, {n: m.weight.data.detach().cpu() for n, m in linears.items()}, block_stats)
                bar.set_postfix_str(f"block {i}: pruned")
            stats.extend(block_stats)
            hidden = propagate(block, hidden, call)
            if offload:
                block.to("cpu")
    return PruneResult(stats, time.perf_counter() - start, reused, computed)
