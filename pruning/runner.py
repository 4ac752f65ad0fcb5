"""Block-sequential pruning of a whole decoder model.

1. Capture the inputs of decoder block 0 for every calibration sample, and the
   keyword arguments (masks, RoPE position embeddings, ...) the model hands each block.
2. For each block: walk it over all samples with a Gram tap, prune its linear
   layers (layers that share an input are solved together), optionally fit the
   pruned block to the dense block's outputs (prune.finetune, pruning/finetune.py),
   then walk the pruned block to turn its inputs into the next block's, in place.

With owl, the per-block sparsities come from the dense model before step 2
(PruneSpec.apply_owl).

Samples go through the model and each block in batches (`batch_size`), into one
preallocated activation buffer (pruning/walk.py).

Calibration forwards never use or pass a KV cache: a cache carried from one sample
to the next makes each sample attend to earlier samples' keys and corrupts every Gram.
"""
from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from .finetune import finetune_block
from .finite import located, require_finite
from .discovery import (block_linears, decoder_layers, layer_weight, layers_prefix,  # noqa: F401 (re-exported)
                        prunable_linear_names, set_layer_weight, to_out_in)
from .gram import GramCollector, exact_fp32_matmul
from .layer import LayerJob, prune_layers, require_finite_gram, require_finite_weight
from .settings import FINETUNE_SCHEDULES, LayerSettings, PruneSettings, parse_pattern
from .walk import DEFAULT_BATCH_SIZE, BlockCall, batch_slices, propagate, run_block, walk_block

_CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past")


# ---------------------------------------------------------------------------- capture

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
                         progress: bool = False, offload: bool = False,
                         batch_size: int = DEFAULT_BATCH_SIZE) -> BlockInputs:
    """Block-0 inputs for each calibration sample (clean forwards in batches, no
    cache), and the call arguments of every block (taken from a full forward of
    sample 0: they depend on positions only, and e.g. Gemma3 gives each layer type
    its own)."""
    layers = decoder_layers(model)
    calls: list[BlockCall | None] = [None] * len(layers)

    def record_call(index, module, args, kwargs):
        calls[index] = _split_call(args, kwargs)[1]

    handles = [layer.register_forward_pre_hook(lambda m, a, k, i=i: record_call(i, m, a, k), with_kwargs=True)
               for i, layer in enumerate(layers)]
    try:
        with _blocks_visit(layers, device) if offload else nullcontext():
            model(calib_ids[:1].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()

    hidden: torch.Tensor | None = None
    rows = slice(0, 0)

    def record_first(module, args, kwargs):
        nonlocal hidden
        x = _split_call(args, kwargs)[0]
        if hidden is None:  # the buffer for all samples, allocated once
            hidden = x.new_empty((calib_ids.shape[0], *x.shape[1:]))
        hidden[rows] = x
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(record_first, with_kwargs=True)
    try:
        for rows in tqdm(batch_slices(calib_ids.shape[0], batch_size), desc="capture",
                         disable=not progress, unit="batch"):
            try:
                model(calib_ids[rows].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return BlockInputs(hidden=hidden, calls=calls)


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
        self._owl_applied = False

    def apply_owl(self, model: nn.Module, inputs: BlockInputs, *, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        """With owl: set each block's sparsity from the dense model's outlier ratios
        (pruning.owl), under the user's block overrides: a block whose override sets a
        sparsity or a pattern keeps it. Call it on the dense model after validate() and
        before block_settings() (the block store keys blocks on those); prune_model
        calls it when the caller has not. Without owl, or with an N:M default pattern
        (the pattern fixes the sparsity), it changes nothing."""
        if not self.owl or self._owl_applied:
            return
        self._owl_applied = True
        if parse_pattern(self.pattern) is not None:
            return
        from .owl import owl_block_overrides  # pruning.owl builds on this module

        users = {index: override for index, (_, override) in self._block_levels(self._n_blocks).items()}
        merged = {}
        for index, owl in owl_block_overrides(model, inputs, self.sparsity, batch_size=batch_size).items():
            user = users.pop(index, {})
            merged[index] = dict(user) if "sparsity" in user or "pattern" in user else {**owl, **user}
        self.block_overrides = {**merged, **users}

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
        return {"true_sequential": self.true_sequential, "finetune": self.finetune, "owl": self.owl,
                "layers": out}

    def validate(self, model: nn.Module, mask_path: tuple = ("masks",)) -> dict[str, LayerSettings]:
        """Check every layer's settings and the user masks against the model before
        any heavy work (errors are SettingsErrors; a bad mask's path is `mask_path`);
        return the resolved settings by full layer name."""
        from .shapes import describe_linears

        layers = describe_linears(model)
        modules = dict(model.named_modules())

        def out_in_shape(name, mask):  # masks are laid out like the weight (Conv1D: transposed)
            module = modules.get(name.removesuffix(".weight"))
            return tuple((to_out_in(module, mask) if module is not None else mask).shape)

        plan = self.plan(layers, {name: out_in_shape(name, mask) for name, mask in (self.masks or {}).items()},
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
    phase_seconds: dict[str, float] = field(default_factory=dict)  # capture, gram, solve, finetune, propagate


def _relative_error(old: torch.Tensor, new: torch.Tensor, gram: torch.Tensor) -> float:
    """‖X(W−W0)ᵀ‖² / ‖X W0ᵀ‖², from the Gram alone."""
    old, new = old.float(), new.float()
    diff = new - old
    num = ((diff @ gram) * diff).sum()
    den = ((old @ gram) * old).sum().clamp_min(1e-30)
    return float(num / den)


class _PhaseClock:
    """Wall time per phase (capture, owl, gram, solve, finetune, propagate). On CUDA it
    waits for the device at phase boundaries only (a few times per block), never inside a solve."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str):
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[phase] += time.perf_counter() - start


def _collect_grams(block, linears, hidden, call, batch_size, active=None) -> GramCollector:
    collector = GramCollector(linears, active)
    walk_block(block, hidden, call, batch_size=batch_size, taps=[collector])
    return collector


def _prune_group(index, prefix, names, linears, gram, spec: PruneSpec) -> list[dict]:
    """Prune layers that share one input (and so one Gram); one stats row per layer."""
    start = time.perf_counter()
    jobs = {}
    for name in names:
        s = spec.settings_for(index, name)
        mask = spec.mask_for(f"{prefix}{index}.{name}")
        jobs[name] = LayerJob(layer_weight(linears[name]), s.method, s.sparsity, s.pattern, s.options,
                              user_mask=None if mask is None else to_out_in(linears[name], mask))
    results = prune_layers(jobs, gram)
    seconds = (time.perf_counter() - start) / len(names)  # the shared solve, split evenly
    stats = []
    for name, (new, _) in results.items():
        job = jobs[name]
        stats.append({"block": index, "name": f"{prefix}{index}.{name}",
                      "method": "admm (user mask)" if job.user_mask is not None else job.method,
                      "pattern": job.pattern, "sparsity": float((new == 0).float().mean()),
                      "rel_error": _relative_error(job.weight, new, gram), "seconds": seconds})
        set_layer_weight(linears[name], new)
    return stats


def _where(index: int, prefix: str) -> str:
    return f"block {index} ({prefix}{index})"


def _require_finite_weights(model: nn.Module) -> None:
    """Every prunable weight, before any block is pruned: a damaged layer deep in the
    model is refused at once, not after hours of solves."""
    prefix = layers_prefix(model) + "."
    for i, block in enumerate(decoder_layers(model)):
        with located(_where(i, prefix)):
            for name, linear in block_linears(block).items():
                require_finite_weight(name, linear.weight)


def _require_finite_block_inputs(where: str, hidden: torch.Tensor, collector: GramCollector) -> None:
    """The block's input activations, then every Gram of the block, before its first solve."""
    with located(where):
        require_finite(hidden, "input activations (the previous block's outputs, or the embeddings "
                               "for block 0)", "they overflow or are damaged; load the model in "
                                               "bfloat16 or float32")
        for group in collector.groups():
            require_finite_gram(group, collector.gram_of(group[0]))


def _prune_block(block, index, prefix, hidden, call, spec: PruneSpec, batch_size, clock) -> list[dict]:
    linears = block_linears(block)
    schedule = FINETUNE_SCHEDULES[spec.finetune]
    if schedule is not None:
        with clock("finetune"):
            targets = propagate(block, hidden, call, batch_size=batch_size)  # the dense block's outputs
    with clock("gram"):
        collector = _collect_grams(block, linears, hidden, call, batch_size)  # every Gram, from the dense block
    _require_finite_block_inputs(_where(index, prefix), hidden, collector)
    stats = []
    for k, group in enumerate(collector.groups()):
        if spec.true_sequential and k > 0:
            # Later groups see the outputs of the groups already pruned in this block.
            with clock("gram"):
                collector = _collect_grams(block, linears, hidden, call, batch_size, active={group[0]})
        with clock("solve"), located(_where(index, prefix)):
            stats.extend(_prune_group(index, prefix, group, linears, collector.gram_of(group[0]), spec))
    if schedule is not None:
        with clock("finetune"), located(_where(index, prefix)):
            finetune_block(block, linears, hidden, call, targets, steps=schedule.steps, lr=schedule.lr,
                           batch_size=batch_size)
    return stats


@torch.no_grad()
def prune_model(model: nn.Module, calib_ids: torch.Tensor | None, spec: PruneSpec, *,
                device: str | torch.device | None = None, store: BlockStore | None = None,
                progress: bool = True, inputs: BlockInputs | None = None,
                offload: bool = False, batch_size: int = DEFAULT_BATCH_SIZE) -> PruneResult:
    """Prune every decoder block in place, block by block.

    `store` (optional) makes the run resumable: a block it can load is not pruned
    again, only propagated; every newly pruned block is saved to it.
    `offload` keeps the decoder blocks on the CPU and brings one at a time to
    `device`, so device memory holds one block plus the activations.
    `batch_size` samples go through a block at a time. Results match batch 1 up to
    fp32 rounding, not bit for bit, so callers that cache results key on it.
    """
    start = time.perf_counter()
    device = device or next(model.parameters()).device
    batch_slices(1, batch_size)  # refuse a bad batch size before any work
    spec.validate(model)
    _require_finite_weights(model)
    model.eval()
    _place(model, device, offload)
    clock = _PhaseClock(device)
    if inputs is None:
        with clock("capture"):
            inputs = capture_block_inputs(model, calib_ids, device=device, progress=progress,
                                          offload=offload, batch_size=batch_size)
    if spec.owl:
        with clock("owl"):
            spec.apply_owl(model, BlockInputs(inputs.hidden.to(device), inputs.calls), batch_size=batch_size)
    hidden = inputs.hidden.to(device).clone()  # walked in place, block after block
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
                block_stats = _prune_block(block, i, prefix, hidden, call, spec, batch_size, clock)
                computed.append(i)
                if store is not None:
                    store.save(i, {n: m.weight.data.detach().cpu() for n, m in linears.items()}, block_stats)
                bar.set_postfix_str(f"block {i}: pruned")
            stats.extend(block_stats)
            with clock("propagate"):
                walk_block(block, hidden, call, batch_size=batch_size, write_back=True)
            if offload:
                block.to("cpu")
    return PruneResult(stats, time.perf_counter() - start, reused, computed, dict(clock.seconds))
