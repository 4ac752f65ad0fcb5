"""The block-sequential runner on tiny random models of real architectures."""
import pytest
import torch

from pruning import PruneSpec, capture_block_inputs, decoder_layers, prunable_linear_names, prune_model
from pruning.gram import GramCollector
from pruning.masks import is_nm_valid
from pruning.models import build_tiny_model
from pruning.runner import block_linears, propagate
from pruning.walk import walk_block

ARCHS = ["llama", "qwen2", "mistral", "gemma3", "opt"]


def calib(n=4, seqlen=48, seed=0):
    # seqlen 48 > Gemma3's tiny sliding window (32): local and global layers differ.
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def weights_of(model, names):
    modules = dict(model.named_modules())
    return {n: modules[n].weight.detach().clone() for n in names}


@pytest.mark.parametrize("arch", ARCHS)
def test_runner_prunes_every_block_linear_and_nothing_else(arch):
    model, _ = build_tiny_model(arch)
    names = prunable_linear_names(model)
    untouched_before = {k: v.clone() for k, v in model.state_dict().items()
                        if not any(k.startswith(n + ".") for n in names)}
    result = prune_model(model, calib(), PruneSpec("admm-grad", 0.6), progress=False)
    for name, weight in weights_of(model, names).items():
        assert (weight == 0).sum().item() == round(0.6 * weight.numel()), name
    for key, value in model.state_dict().items():
        if key in untouched_before:
            assert torch.equal(value, untouched_before[key]), f"{key} changed"
    assert any("embed" in k for k in untouched_before) and any("lm_head" in k or "embed" in k
                                                                for k in untouched_before)
    assert {s["name"] for s in result.layers} == set(names)
    logits = model(calib(1)).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ARCHS + ["gpt2"])
def test_captured_inputs_match_clean_forward_of_each_sample(arch):
    """No KV cache (or anything else) leaks between calibration samples: the inputs the
    runner builds for every block equal those of a clean forward of that sample alone."""
    model, _ = build_tiny_model(arch)
    ids = calib(n=3)
    inputs = capture_block_inputs(model, ids)
    hidden = inputs.hidden
    with torch.no_grad():
        clean = [model(ids[i:i + 1], output_hidden_states=True, use_cache=False).hidden_states
                 for i in range(len(ids))]
    for b, block in enumerate(decoder_layers(model)):
        for i in range(len(ids)):
            torch.testing.assert_close(hidden[i], clean[i][b][0], rtol=1e-5, atol=1e-5,
                                       msg=f"block {b} sample {i}")
        hidden = propagate(block, hidden, inputs.calls[b])


def test_capture_is_independent_of_sample_order():
    model, _ = build_tiny_model("llama")
    ids = calib(n=3)
    forward = capture_block_inputs(model, ids).hidden
    backward = capture_block_inputs(model, ids.flip(0)).hidden.flip(0)
    torch.testing.assert_close(forward, backward)


def test_shared_input_layers_share_one_gram():
    model, _ = build_tiny_model("llama")
    inputs = capture_block_inputs(model, calib())
    block = decoder_layers(model)[0]
    collector = GramCollector(block_linears(block))
    walk_block(block, inputs.hidden, inputs.calls[0], batch_size=3, taps=[collector])
    assert collector.groups() == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                  ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    assert len(collector.grams) == 4
    with torch.no_grad():  # q/k/v read the normalised block input
        x = block.input_layernorm(inputs.hidden).reshape(-1, inputs.hidden.shape[-1])
    torch.testing.assert_close(collector.gram_of("self_attn.k_proj"), x.T @ x, rtol=1e-4, atol=1e-3)


def test_true_sequential_sees_pruned_earlier_layers():
    ids = calib()
    plain, _ = build_tiny_model("llama")
    tseq, _ = build_tiny_model("llama")
    r_plain = prune_model(plain, ids, PruneSpec("sparsegpt", 0.5), progress=False)
    r_tseq = prune_model(tseq, ids, PruneSpec("sparsegpt", 0.5, true_sequential=True), progress=False)
    names = prunable_linear_names(plain)
    wp, wt = weights_of(plain, names), weights_of(tseq, names)
    first_q = names[0]
    assert torch.equal(wp[first_q], wt[first_q])           # the first group sees the same inputs
    assert not torch.equal(wp[names[3]], wt[names[3]])     # o_proj sees pruned q/k/v
    assert len(r_tseq.layers) == len(r_plain.layers)


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("4:8", 4, 8)])
def test_runner_nm_patterns(pattern, n, m):
    model, _ = build_tiny_model("llama")
    prune_model(model, calib(), PruneSpec("admm-grad", None, pattern), progress=False)
    for name, w in weights_of(model, prunable_linear_names(model)).items():
        assert is_nm_valid(w != 0, n, m), name


def test_overrides_and_user_masks():
    model, _ = build_tiny_model("llama")
    names = prunable_linear_names(model)
    user_mask = torch.rand(dict(model.named_modules())[names[0]].weight.shape,
                           generator=torch.Generator().manual_seed(1)) > 0.25
    spec = PruneSpec("wanda", 0.5, block_overrides={3: {"sparsity": 0.7}},
                     layer_overrides={"mlp.down_proj": {"method": "admm", "sparsity": 0.3}},
                     masks={names[0]: user_mask})
    result = prune_model(model, calib(), spec, progress=False)
    by_name = {s["name"]: s for s in result.layers}
    w = weights_of(model, names)
    assert torch.equal(w[names[0]] != 0, user_mask)
    assert by_name[names[0]]["method"] == "admm (user mask)"
    assert by_name["model.layers.1.mlp.down_proj"]["sparsity"] == pytest.approx(0.3, abs=1e-3)
    assert by_name["model.layers.3.self_attn.q_proj"]["sparsity"] == pytest.approx(0.7, abs=0.01)
    assert by_name["model.layers.2.self_attn.q_proj"]["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_override_to_another_method_drops_inherited_options():
    spec = PruneSpec("admm-grad", 0.5, options={"iters": 30, "mask_steps": 10},
                     layer_overrides={"mlp.down_proj": {"method": "wanda"}},
                     block_overrides={1: {"options": {"rho": 2.0}}})
    assert spec.settings_for(0, "mlp.down_proj").options == {"group": "row"}  # wanda's own defaults
    options = spec.settings_for(1, "self_attn.q_proj").options
    assert {k: options[k] for k in ("iters", "mask_steps", "rho", "damping")} == {"iters": 30, "mask_steps": 10,
                                                                                 "rho": 2.0, "damping": 0.1}
    model, _ = build_tiny_model("llama")
    spec.validate(model)


def test_bad_spec_fails_before_work():
    model, _ = build_tiny_model("llama")
    with pytest.raises(ValueError, match="sparsity"):
        prune_model(model, calib(), PruneSpec("admm", 1.5), progress=False)
    with pytest.raises(ValueError, match="pattern"):
        prune_model(model, calib(), PruneSpec("admm", 0.5, block_overrides={2: {"pattern": "3:2"}}),
                    progress=False)


class MemoryStore:
    def __init__(self):
        self.blocks, self.saved = {}, []

    def load(self, index):
        return self.blocks.get(index)

    def save(self, index, state, stats):
        self.blocks[index] = ({k: v.clone() for k, v in state.items()}, stats)
        self.saved.append(index)


def test_store_resumes_to_identical_weights():
    ids = calib()
    full, _ = build_tiny_model("llama")
    store = MemoryStore()
    prune_model(full, ids, PruneSpec("admm-grad", 0.5), store=store, progress=False)
    assert store.saved == [0, 1, 2, 3]
    # A run that "died" after block 1: only blocks 0-1 in the store.
    partial = MemoryStore()
    partial.blocks = {i: store.blocks[i] for i in (0, 1)}
    resumed, _ = build_tiny_model("llama")
    result = prune_model(resumed, ids, PruneSpec("admm-grad", 0.5), store=partial, progress=False)
    assert result.reused_blocks == [0, 1] and result.computed_blocks == [2, 3]
    names = prunable_linear_names(full)
    for name, w in weights_of(full, names).items():
        assert torch.equal(w, weights_of(resumed, [name])[name]), name


def test_offload_gives_the_same_weights():
    # On a CPU-only machine this exercises the offload bookkeeping (blocks hidden while
    # the rest moves, per-block visits); on CUDA it also moves blocks for real.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids = calib()
    plain, _ = build_tiny_model("llama")
    offloaded, _ = build_tiny_model("llama")
    prune_model(plain, ids, PruneSpec("admm-grad", 0.5), device=device, progress=False)
    prune_model(offloaded, ids, PruneSpec("admm-grad", 0.5), device=device, offload=True, progress=False)
    assert all(p.device.type == "cpu" for p in decoder_layers(offloaded).parameters())
    names = prunable_linear_names(plain)
    for name, w in weights_of(plain, names).items():
        torch.testing.assert_close(w.cpu(), weights_of(offloaded, [name])[name].cpu())
