"""Independent oracles for what the per-layer tests cannot see: block-to-block
propagation, the sparsity schedule, rel_error and OWL's outlier ratio. Each oracle
is computed here from explicit tensors (plain model forwards, hand-written
formulas), never by the code under test.

Each test names the deliberate breakage it catches; each was applied by hand, seen
to turn the test red, and reverted:
1. propagation through a deepcopy of the dense block -> next_block_inputs red
   ("block 1 sample 0" differs);
2. sparsity_schedule's cubic made linear, s·(k+1)/K -> both schedule tests red;
3. `_relative_error` returning num without / den -> rel_error test red;
4. OWL's score |W| without ‖X‖ -> owl test red (4 of 4 blocks mismatch).
"""
from fractions import Fraction

import pytest
import torch

import pruning.admm as admm
from pruning import PruneSpec, capture_block_inputs, decoder_layers, prune_model
from pruning.admm import AdmmSystem, admm_solve, sparsity_schedule
from pruning.models import build_tiny_model
from pruning.owl import block_outlier_ratios
from pruning.runner import block_linears


def calib(n=3, seqlen=24, seed=0):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def first_input_of_each(modules: dict, store: dict):
    """Forward pre-hooks that keep the first input each module sees."""
    def keep(name):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            store.setdefault(name, x.detach().clone())
        return hook
    return [m.register_forward_pre_hook(keep(name), with_kwargs=True) for name, m in modules.items()]


def test_next_block_inputs_are_the_pruned_blocks_outputs():
    """Block i+1's inputs during pruning equal pruned block i's outputs on the same
    samples, from plain forwards of the pruned model (output_hidden_states).
    Breakage caught: propagating through the dense block instead of the pruned one
    (e.g. walking a deepcopy of the block taken before `_prune_block`)."""
    model, _ = build_tiny_model("llama")
    ids = calib()
    inputs = capture_block_inputs(model, ids)
    seen: dict[int, torch.Tensor] = {}
    handles = first_input_of_each(dict(enumerate(decoder_layers(model))), seen)
    try:  # one batch holds every sample: each block's first call is its Gram walk
        prune_model(model, None, PruneSpec("wanda", 0.6), inputs=inputs, batch_size=len(ids), progress=False)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        oracle = [model(ids[s:s + 1], output_hidden_states=True, use_cache=False).hidden_states
                  for s in range(len(ids))]
    for b in range(1, len(decoder_layers(model))):
        for s in range(len(ids)):
            torch.testing.assert_close(seen[b][s], oracle[s][b][0], rtol=1e-5, atol=1e-5,
                                       msg=f"block {b} sample {s}")


def cubic(step: int, steps: int, sparsity: Fraction) -> Fraction:
    """s·(1 − (1 − (k+1)/K)³), in exact rational arithmetic."""
    return sparsity * (1 - (1 - Fraction(step + 1, steps)) ** 3)


def test_cubic_schedule_values():
    """Breakage caught: the cubic schedule replaced by a linear one."""
    # By hand for K = 4, s = 1/2: 1/2 · (1 − (3/4)³, 1 − (1/2)³, 1 − (1/4)³, 1).
    assert [cubic(k, 4, Fraction(1, 2)) for k in range(4)] == [Fraction(37, 128), Fraction(7, 16),
                                                               Fraction(63, 128), Fraction(1, 2)]
    for steps in (1, 4, 15):
        for s in (Fraction(1, 2), Fraction(7, 10)):
            for k in range(steps):
                assert sparsity_schedule(k, steps, float(s), "cubic") == pytest.approx(float(cubic(k, steps, s)),
                                                                                        abs=1e-12)


def test_admm_grad_prunes_on_the_cubic_schedule(monkeypatch):
    """The number of pruned entries at each mask step of an ADMM-Grad solve is
    round(s_k · numel) with s_k from the oracle above, then stays at the final count.
    Breakage caught: the cubic schedule replaced by a linear one (in sparsity_schedule
    or in MaskRule.target)."""
    pruned_per_step = []
    choose = admm._choose_mask

    def counting(score_t, rule, step, path):
        mask = choose(score_t, rule, step, path)
        pruned_per_step.append(int((~mask.bool()).sum()))
        return mask

    monkeypatch.setattr(admm, "_choose_mask", counting)
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    _, mask = admm_solve(weight, AdmmSystem.from_gram(x.T @ x), sparsity=0.5, iters=6, mask_steps=4)
    expected = [round(float(cubic(k, 4, Fraction(1, 2))) * weight.numel()) for k in range(4)]
    assert expected == [592, 896, 1008, 1024]
    assert pruned_per_step == expected
    assert int((~mask).sum()) == 1024


def test_rel_error_matches_explicit_output_error():
    """rel_error in the runner's stats equals ‖X(W−W0)ᵀ‖² / ‖X W0ᵀ‖², with X the
    layer's recorded calibration inputs and W0, W its weights before and after.
    Breakage caught: `_relative_error` without its denominator."""
    model, _ = build_tiny_model("llama")
    ids = calib()
    inputs = capture_block_inputs(model, ids)
    block = decoder_layers(model)[0]
    linears = block_linears(block)
    dense = {name: lin.weight.detach().clone() for name, lin in linears.items()}
    xs: dict[str, torch.Tensor] = {}
    handles = first_input_of_each(linears, xs)
    try:  # one batch: each linear's first call is the Gram walk over the dense block
        result = prune_model(model, None, PruneSpec("admm-grad", 0.5, options={"iters": 4, "mask_steps": 2}),
                             inputs=inputs, batch_size=len(ids), progress=False)
    finally:
        for h in handles:
            h.remove()
    stats = {row["name"]: row["rel_error"] for row in result.layers}
    for name, lin in linears.items():
        x = xs[name].reshape(-1, xs[name].shape[-1]).double()
        w0, w = dense[name].double(), lin.weight.detach().double()
        oracle = (x @ (w - w0).T).square().sum() / (x @ w0.T).square().sum()
        assert 0 < oracle < 1
        assert stats[f"model.layers.0.{name}"] == pytest.approx(float(oracle), rel=1e-4), name


def test_owl_outlier_ratio_matches_one_computed_by_hand():
    """D_i = fraction of the block's scores |W_jk|·‖X_k‖ above M·mean, with X every
    linear's inputs recorded from a plain forward of the dense model.
    Breakage caught: OWL's score without the activation norm (|W| alone)."""
    model, _ = build_tiny_model("llama")
    with torch.no_grad():  # outlier channels, as real LLMs have: they make the norm matter
        for block in decoder_layers(model):
            block.input_layernorm.weight[:4] *= 30
            block.post_attention_layernorm.weight[-4:] *= 30
    ids = calib()
    linears = {(b, name): lin for b, block in enumerate(decoder_layers(model))
               for name, lin in block_linears(block).items()}
    xs: dict = {}
    handles = first_input_of_each(linears, xs)
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    m = 5.0
    oracle = []
    for b in range(len(decoder_layers(model))):
        scores = []
        for (block, name), lin in linears.items():
            if block == b:
                x = xs[(block, name)].reshape(-1, lin.in_features).double()
                scores.append((lin.weight.double().abs() * x.square().sum(0).sqrt()[None, :]).flatten())
        scores = torch.cat(scores)
        oracle.append(float((scores > m * scores.mean()).double().mean()))
    got = block_outlier_ratios(model, capture_block_inputs(model, ids), m=m)
    assert min(oracle) > 0.005, oracle  # the outliers exist, so the norm matters
    assert got == pytest.approx(oracle, abs=2 / scores.numel())
