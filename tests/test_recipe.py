"""The ft-owl recipe's two settings (issue 13): prune.finetune fits a pruned block to
the dense block's outputs with its masks fixed; prune.owl sets per-block sparsities
that enter each block's settings, and so the block store's keys."""
from __future__ import annotations

import copy

import pytest
import torch

from pruning import PruneSpec, capture_block_inputs, decoder_layers, prunable_linear_names, prune_model
from pruning.finetune import block_output_error, finetune_block
from pruning.models import build_tiny_model
from pruning.owl import owl_block_overrides
from pruning.runner import block_linears, propagate
from pruning.settings import FINETUNE_SCHEDULES, PruneSettings, SettingsError
from stages.block_store import block_fingerprints


def calib(n=4, seqlen=48, seed=0):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def magnitude_prune(linears, sparsity):
    """Zero the smallest |w| of every linear in place; returns the masks (True = kept)."""
    masks = {}
    with torch.no_grad():
        for name, linear in linears.items():
            w = linear.weight
            k = round(sparsity * w.numel())
            threshold = w.abs().reshape(-1).kthvalue(k).values
            w.mul_(w.abs() > threshold)
            masks[name] = w != 0
    return masks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finetune_lowers_the_block_output_error_and_keeps_the_masks(dtype):
    """Red when the fine-tune does not move the kept weights towards the dense outputs,
    or lets a pruned weight come back (sparsity no longer exact), or leaves the block
    in another dtype."""
    model, _ = build_tiny_model("llama")
    model.to(dtype)
    inputs = capture_block_inputs(model, calib())
    block, call = decoder_layers(model)[0], inputs.calls[0]
    linears = block_linears(block)
    targets = propagate(block, inputs.hidden, call)
    masks = magnitude_prune(linears, 0.6)
    before = block_output_error(block, inputs.hidden, call, targets, batch_size=3)
    schedule = FINETUNE_SCHEDULES["standard"]
    finetune_block(block, linears, inputs.hidden, call, targets, steps=schedule.steps, lr=schedule.lr,
                   batch_size=3)
    after = block_output_error(block, inputs.hidden, call, targets, batch_size=3)
    assert after < 0.9 * before, (before, after)
    for name, linear in linears.items():
        assert linear.weight.dtype == dtype
        assert torch.equal(linear.weight != 0, masks[name]), name
    assert all(p.dtype == dtype for p in block.parameters())


def test_prune_model_with_finetune_keeps_the_exact_sparsity_and_changes_the_weights():
    """Red when prune_model ignores prune.finetune, or the fine-tune breaks the sparsity."""
    model, _ = build_tiny_model("llama")
    names = prunable_linear_names(model)
    plain, tuned = copy.deepcopy(model), copy.deepcopy(model)
    prune_model(plain, calib(), PruneSpec("admm-grad", 0.6), progress=False)
    result = prune_model(tuned, calib(), PruneSpec("admm-grad", 0.6, finetune="standard"), progress=False)
    modules_plain, modules_tuned = dict(plain.named_modules()), dict(tuned.named_modules())
    for name in names:
        w_tuned = modules_tuned[name].weight
        assert (w_tuned == 0).sum().item() == round(0.6 * w_tuned.numel()), name
    assert not torch.equal(modules_plain[names[-1]].weight, modules_tuned[names[-1]].weight)
    assert result.phase_seconds["finetune"] > 0


def _block_sparsities(spec, model):
    return [spec.block_settings(i, list(block_linears(block)))["layers"]["mlp.down_proj"]["sparsity"]
            for i, block in enumerate(decoder_layers(model))]


def test_owl_sets_the_block_settings_and_so_the_fingerprints():
    """Red when owl does not reach the per-block settings (the block store would then
    reuse blocks pruned at the uniform sparsity), or when it overrides a user's block."""
    model, _ = build_tiny_model("llama")
    inputs = capture_block_inputs(model, calib())
    plain = PruneSpec("admm-grad", 0.6)
    owl = PruneSpec("admm-grad", 0.6, owl=True, block_overrides={-1: {"sparsity": 0.5}})
    for spec in (plain, owl):
        spec.validate(model)
        spec.apply_owl(model, inputs)
    expected = [o["sparsity"] for o in owl_block_overrides(model, inputs, 0.6).values()]
    assert _block_sparsities(plain, model) == [0.6] * 4
    assert _block_sparsities(owl, model) == pytest.approx(expected[:3] + [0.5])   # the user's last block wins
    assert len(set(expected)) > 1

    base = {"model": "m", "calibration": "c", "code": "x"}
    settings = {id(spec): [spec.block_settings(i, list(block_linears(b))) for i, b in
                           enumerate(decoder_layers(model))] for spec in (plain, owl)}
    fp_plain, fp_owl = block_fingerprints(base, settings[id(plain)]), block_fingerprints(base, settings[id(owl)])
    assert fp_plain[0] != fp_owl[0]
    tuned = PruneSpec("admm-grad", 0.6, finetune="standard")
    tuned.validate(model)
    fp_tuned = block_fingerprints(base, [tuned.block_settings(i, list(block_linears(b)))
                                         for i, b in enumerate(decoder_layers(model))])
    assert fp_tuned[0] != fp_plain[0]


def test_owl_with_an_nm_pattern_changes_nothing():
    model, _ = build_tiny_model("llama")
    inputs = capture_block_inputs(model, calib())
    spec = PruneSpec("admm-grad", None, "2:4", owl=True)
    spec.validate(model)
    spec.apply_owl(model, inputs)
    assert spec.block_overrides == {}
    assert _block_sparsities(spec, model) == [0.5] * 4


@pytest.mark.parametrize("values, key, says", [
    ({"finetune": "fast"}, "finetune", "none, standard"),
    ({"finetune": "standrad"}, "finetune", "did you mean 'standard'"),
    ({"finetune": True}, "finetune", "none, standard"),
    ({"owl": "yes"}, "owl", "true or false"),
    ({"owl": True, "sparsity": 0.95}, "owl", "prune.sparsity in [0.08, 0.92)"),
    ({"owl": True, "sparsity": 0.05}, "owl", "prune.sparsity in [0.08, 0.92)"),
])
def test_settings_refuse_bad_finetune_and_owl_values(values, key, says):
    """Red when a bad value passes, or the error names another parameter."""
    with pytest.raises(SettingsError) as caught:
        PruneSettings.from_mapping({"method": "admm-grad", **values})
    err = caught.value.within("prune")
    assert err.key == f"prune.{key}"
    assert says in str(err)


def test_settings_accept_the_recipe_at_every_issue_setting():
    for sparsity, pattern in ((0.5, "unstructured"), (0.8, "unstructured"), (None, "2:4")):
        settings = PruneSettings.from_mapping({"method": "admm-grad", "sparsity": sparsity, "pattern": pattern,
                                               "finetune": "standard", "owl": True})
        assert (settings.finetune, settings.owl) == ("standard", True)


def test_block_store_with_owl_needs_the_captured_inputs():
    """OWL's sparsities key the block store, so they must be known before the store is
    built: a store without captured inputs is refused before anything is pruned."""
    from stages.pruner import prune

    model, _ = build_tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {"prune": {"method": "admm-grad", "sparsity": 0.6, "owl": True}}
    with pytest.raises(ValueError, match="block store with prune.owl"):
        prune(model, params, calib(), block_store=lambda spec, device: None, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
