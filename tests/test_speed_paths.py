"""Issue 9's speed work keeps results: the sync-free mask path, solves shared by layers
with one input, and batched block walks all agree with the plain computations."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from pruning import PruneSpec, capture_block_inputs, decoder_layers, prunable_linear_names, prune_model
from pruning.admm import AdmmSystem, MaskRule, admm_solve, admm_solve_group
from pruning.gram import GramCollector, add_gram
from pruning.layer import LayerJob, prune_layer, prune_layers
from pruning.masks import gradual_nm_mask, nm_mask, unstructured_mask
from pruning.models import build_tiny_model
from pruning.perplexity import perplexity
from pruning.runner import block_linears
from pruning.walk import propagate, walk_block

HOST_SYNC_OPS = ("kthvalue", "nonzero", "_local_scalar_dense", "masked_select", "unique")


def gram_and_weight(d_out=48, d_in=64, tokens=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=gen) * torch.exp(torch.randn(d_in, generator=gen))
    return x.T @ x, torch.randn(d_out, d_in, generator=gen)


def sort_oracle_mask(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Independent oracle: a stable sort prunes the n lowest, earlier index first on ties."""
    flat = scores.reshape(-1)
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[torch.argsort(flat, stable=True)[:n_prune]] = False
    return keep.view_as(scores)


@pytest.mark.parametrize("path", ["kthvalue", "sort"])
def test_mask_paths_match_a_stable_sort_oracle_even_with_ties(path):
    """Catches: a threshold that keeps every tie (too many kept), ties cut in another order."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (16, 32), generator=gen).float()   # many ties
    for sparsity in (0.1, 0.37, 0.5, 0.9):
        n = round(sparsity * scores.numel())
        assert torch.equal(unstructured_mask(scores, sparsity, "layer", path), sort_oracle_mask(scores, n))
        rows = unstructured_mask(scores, sparsity, "row", path)
        n_row = round(sparsity * scores.shape[1])
        for r in range(scores.shape[0]):
            assert torch.equal(rows[r], sort_oracle_mask(scores[r], n_row))
    assert torch.equal(nm_mask(scores, 2, 4, path), nm_mask(scores, 2, 4, "sort"))
    gradual = gradual_nm_mask(scores, 2, 4, 0.3, path)
    assert int((~gradual).sum()) == round(0.3 * scores.numel())
    assert torch.equal(gradual, gradual_nm_mask(scores, 2, 4, 0.3, "kthvalue"))


def test_sort_path_of_the_admm_loop_has_no_host_sync_ops():
    """The CUDA selection path, run on CPU tensors under the profiler: none of the ops
    that force a host sync on CUDA (kthvalue is the slow one there)."""
    gram, weight = gram_and_weight()
    system = AdmmSystem.from_gram(gram)
    for rule in (dict(sparsity=0.6), dict(sparsity=0.6, group="row"), dict(nm=(2, 4))):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            admm_solve(weight, system, select_path="sort", iters=6, mask_steps=4, **rule)
        names = {event.key for event in prof.key_averages()}
        bad = sorted(n for n in names if any(op in n for op in HOST_SYNC_OPS))
        assert not bad, f"{rule}: {bad}"


def test_both_selection_paths_give_the_same_admm_grad_result():
    gram, weight = gram_and_weight()
    system = AdmmSystem.from_gram(gram)
    a = admm_solve(weight, system, sparsity=0.5, select_path="kthvalue")
    b = admm_solve(weight, system, sparsity=0.5, select_path="sort")
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])


def test_group_solve_equals_solving_layers_one_by_one():
    """q/k/v-like layers with different rules in one shared solve give what each gets alone.
    Catches: a layer-wide mask chosen across the concatenation instead of per layer."""
    gram, _ = gram_and_weight()
    gen = torch.Generator().manual_seed(3)
    weights = [torch.randn(48, 64, generator=gen), torch.randn(16, 64, generator=gen) * 5,
               torch.randn(16, 64, generator=gen)]
    fixed = torch.rand(16, 64, generator=gen) > 0.5
    rules = [MaskRule(sparsity=0.5), MaskRule(sparsity=0.7, schedule="constant"), MaskRule(fixed=fixed)]
    system = AdmmSystem.from_gram(gram)
    together = admm_solve_group(weights, system, rules)
    for w, rule, (new, mask) in zip(weights, rules, together):
        alone_new, alone_mask = admm_solve_group([w], system, [rule])[0]
        assert torch.equal(mask, alone_mask) and new.is_contiguous()  # save_pretrained needs it
        torch.testing.assert_close(new, alone_new, rtol=1e-5, atol=1e-6)
    assert int((~together[1][1]).sum()) == round(0.7 * 16 * 64)   # its own layer-wide count


def test_prune_layers_groups_admm_layers_and_keeps_the_others_apart():
    gram, w = gram_and_weight()
    jobs = {"q": LayerJob(w, "admm-grad", 0.5), "k": LayerJob(w[:16], "admm", 0.5),
            "v": LayerJob(w[:16], "wanda", 0.5), "u": LayerJob(w[:8], "sparsegpt", 0.5, user_mask=w[:8] > 0)}
    out = prune_layers(jobs, gram)
    assert list(out) == ["q", "k", "v", "u"]
    torch.testing.assert_close(out["q"][0], prune_layer(w, gram, method="admm-grad", sparsity=0.5)[0],
                               rtol=1e-5, atol=1e-6)
    assert torch.equal(out["v"][1], prune_layer(w[:16], gram, method="wanda", sparsity=0.5)[1])
    assert torch.equal(out["u"][0] != 0, (w[:8] > 0))   # sparsegpt's options never reach ADMM


def test_half_precision_gram_sums_exact_products_in_fp32():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=gen).half()
    gram = torch.zeros(32, 32)
    add_gram(gram, x)
    exact = x.double().T @ x.double()
    torch.testing.assert_close(gram.double(), exact, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma3", "opt"])
def test_batched_walks_match_batch_one(arch):
    """Capture, Grams and propagation in batches of 3 equal batch 1 up to fp32 rounding
    (the block calls recorded at batch 1 broadcast over a batch)."""
    model, _ = build_tiny_model(arch)
    ids = torch.randint(0, 256, (5, 48), generator=torch.Generator().manual_seed(0))
    one = capture_block_inputs(model, ids, batch_size=1)
    three = capture_block_inputs(model, ids, batch_size=3)
    torch.testing.assert_close(one.hidden, three.hidden, rtol=1e-5, atol=1e-5)
    hidden1, hidden3 = one.hidden, three.hidden
    for b, block in enumerate(decoder_layers(model)):
        grams = []
        for bs, hidden in ((1, hidden1), (3, hidden3)):
            collector = GramCollector(block_linears(block))
            walk_block(block, hidden, one.calls[b], batch_size=bs, taps=[collector])
            grams.append(collector.grams)
        for name in grams[0]:
            torch.testing.assert_close(grams[0][name], grams[1][name], rtol=1e-4, atol=1e-3)
        hidden1 = propagate(block, hidden1, one.calls[b], batch_size=1)
        hidden3 = propagate(block, hidden3, one.calls[b], batch_size=3)
        torch.testing.assert_close(hidden1, hidden3, rtol=1e-4, atol=1e-4, msg=f"block {b}")


def test_batched_prune_and_perplexity_match_batch_one():
    ids = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(0))
    models = {bs: build_tiny_model("llama")[0] for bs in (1, 4)}
    results = {bs: prune_model(m, ids, PruneSpec("admm-grad", 0.5), batch_size=bs, progress=False)
               for bs, m in models.items()}
    assert set(results[4].phase_seconds) == {"capture", "gram", "solve", "propagate"}
    names = prunable_linear_names(models[1])
    agree = [(models[1].get_submodule(n).weight != 0).eq(models[4].get_submodule(n).weight != 0).float().mean()
             for n in names]
    assert min(agree) > 0.99
    windows = torch.randint(0, 256, (5, 32), generator=torch.Generator().manual_seed(1))
    ppl = [perplexity(models[1], windows, batch_size=bs, progress=False) for bs in (1, 2, 5)]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-5) and ppl[0] == pytest.approx(ppl[2], rel=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_solver_never_syncs_with_the_host():
    gram, weight = gram_and_weight(256, 512)
    system = AdmmSystem.from_gram(gram.cuda())
    torch.cuda.set_sync_debug_mode("error")
    try:
        for rule in (dict(sparsity=0.6), dict(sparsity=0.6, group="row"), dict(nm=(2, 4))):
            admm_solve(weight.cuda(), system, **rule)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_gram_walk_stops_each_batch_after_the_last_input_it_needs():
    """The Gram pass never runs down_proj (its output is unused), yet its Grams equal a
    full forward's. Catches: stopping before the last layer's input was recorded."""
    model, _ = build_tiny_model("llama")
    ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(model, ids)
    block = decoder_layers(model)[0]
    calls = []
    handle = block.mlp.down_proj.register_forward_hook(lambda *a: calls.append(1))
    try:
        collector = GramCollector(block_linears(block))
        walk_block(block, inputs.hidden, inputs.calls[0], batch_size=2, taps=[collector])
    finally:
        handle.remove()
    assert calls == []
    with torch.no_grad():
        h = inputs.hidden
        attn = block.self_attn(block.input_layernorm(h), position_embeddings=inputs.calls[0].kwargs.get(
            "position_embeddings"), attention_mask=inputs.calls[0].kwargs.get("attention_mask"))[0]
        mid = h + attn
        x = block.post_attention_layernorm(mid)
        act = block.mlp.act_fn(block.mlp.gate_proj(x)) * block.mlp.up_proj(x)
        act = act.reshape(-1, act.shape[-1])
    torch.testing.assert_close(collector.gram_of("mlp.down_proj"), act.T @ act, rtol=1e-4, atol=1e-3)
