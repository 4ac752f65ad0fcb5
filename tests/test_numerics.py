"""NaN and inf are refused before any solve, with the block, the layer and what was
non-finite named; a failed Cholesky names its block and layers too.

Breakages that turn these red: dropping `_require_finite_weights` from prune_model
(the weight cases reach a solve, and magnitude/wanda finish silently), dropping the
Gram loop of `_require_finite_block_inputs` (the Gram case names prune_layers' own
check only after block 1's first groups are solved: block 1's q_proj changes), dropping
its activation check (the activation case is reported as a Gram), dropping
`located` around the solve (the Cholesky error names no block), and dropping
`require_finite_layers` from prune_layers (prune_layer accepts NaN). Each was applied
by hand and turned its tests red (5, 5, 5, 3 and 10 failures), then reverted.
"""
import pytest
import torch

from pruning import PruneSpec, capture_block_inputs, decoder_layers, prune_model
from pruning.finite import FactorisationError, NonFiniteError
from pruning.layer import METHODS, prune_layer
from pruning.models import build_tiny_model

FAST = {"admm": {"iters": 2}, "admm-grad": {"iters": 2, "mask_steps": 2}}


def calib(n=2, seqlen=16):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(0))


def spec(method):
    return PruneSpec(method, 0.5, options=FAST.get(method, {}))


def block_weights(model, index):
    return {n: p.detach().clone() for n, p in decoder_layers(model)[index].named_parameters()}


def assert_unchanged(model, index, before):
    for name, value in block_weights(model, index).items():
        assert torch.equal(value, before[name]), f"block {index} {name} changed: a solve ran"


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_weight_named_before_any_solve(method):
    model, _ = build_tiny_model("llama")
    with torch.no_grad():
        decoder_layers(model)[2].mlp.up_proj.weight[3, 5] = float("nan")
    before = block_weights(model, 0)
    with pytest.raises(NonFiniteError) as err:
        prune_model(model, calib(), spec(method), progress=False)
    message = str(err.value)
    assert "block 2 (model.layers.2)" in message and "weight of layer mlp.up_proj" in message, message
    assert "1 NaN and 0 inf" in message, message
    assert_unchanged(model, 0, before)  # refused before block 0 was pruned


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_gram_named_before_the_blocks_first_solve(method):
    model, _ = build_tiny_model("llama")
    with torch.no_grad():  # block 1's MLP input overflows: its Gram holds inf, its own input is fine
        decoder_layers(model)[1].post_attention_layernorm.weight[7] = float("inf")
    before = block_weights(model, 1)
    with pytest.raises(NonFiniteError) as err:
        prune_model(model, calib(), spec(method), progress=False)
    message = str(err.value)
    assert message.startswith("block 1 (model.layers.1): Gram of the input of layers "
                              "mlp.gate_proj, mlp.up_proj holds"), message
    assert "inf" in message and "bfloat16 or float32" in message, message
    assert_unchanged(model, 1, before)


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_activations_named_at_the_block_they_enter(method):
    model, _ = build_tiny_model("llama")

    def overflow(module, args, output):  # block 1's outputs overflow (as fp16 can)
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[..., 0] = float("inf")

    decoder_layers(model)[1].register_forward_hook(overflow)
    inputs = capture_block_inputs(model, calib())
    before = block_weights(model, 2)
    with pytest.raises(NonFiniteError) as err:
        prune_model(model, None, spec(method), inputs=inputs, progress=False)
    message = str(err.value)
    assert message.startswith("block 2 (model.layers.2): input activations"), message
    assert "0 NaN and 32 inf" in message, message  # 2 samples x 16 tokens, one channel
    assert_unchanged(model, 2, before)


@pytest.mark.parametrize("method", ["sparsegpt", "admm", "admm-grad"])
def test_failed_cholesky_names_block_and_layers(method, monkeypatch):
    model, _ = build_tiny_model("llama")

    def refuse(matrix, *args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.cholesky: not positive-definite (test)")

    monkeypatch.setattr(torch.linalg, "cholesky", refuse)
    with pytest.raises(torch.linalg.LinAlgError) as err:
        prune_model(model, calib(), spec(method), progress=False)
    assert isinstance(err.value, FactorisationError)
    message = str(err.value)
    assert message.startswith("block 0 (model.layers.0): layers self_attn.q_proj, self_attn.k_proj, "
                              "self_attn.v_proj: Cholesky factorisation"), message
    assert "damping" in message, message


@pytest.mark.parametrize("method", ["sparsegpt", "admm", "admm-grad"])
def test_real_cholesky_failure_of_one_layer_is_named(method):
    """An indefinite Gram (finite, so it passes the checks) with no damping."""
    opts = {"damping": 0.0} if method == "sparsegpt" else {"damping": 0.0, "iters": 2, "mask_steps": 2}
    if method == "admm":
        opts.pop("mask_steps")
    with pytest.raises(FactorisationError, match="^layers layer: Cholesky factorisation"):
        prune_layer(torch.randn(8, 16), -torch.eye(16), method=method, sparsity=0.5, **opts)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("where", ["weight", "gram"])
def test_prune_layer_refuses_non_finite_inputs(method, where):
    weight, gram = torch.randn(8, 16), torch.eye(16)
    (weight if where == "weight" else gram)[1, 1] = float("-inf")
    with pytest.raises(NonFiniteError, match="weight of layer layer" if where == "weight"
                       else "Gram of the input of layers layer"):
        prune_layer(weight, gram, method=method, sparsity=0.5)
