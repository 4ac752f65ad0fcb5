"""Layer-level numerics: oracle optimum, method ordering, invariants, bad input."""
import pytest
import torch

from pruning import admm_update, is_nm_valid, prune_layer
from pruning.baselines import sparsegpt

METHODS = ["magnitude", "wanda", "sparsegpt", "admm", "admm-grad"]


def correlated_problem(d_out, d_in, n=4096, seed=0):
    """Inputs with a power-law spectrum in a random basis and uneven channel scales,
    like real activations: strongly correlated, a few loud channels."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g))
    spectrum = torch.arange(1, d_in + 1).float() ** -0.8
    x = (torch.randn(n, d_in, generator=g) * spectrum.sqrt()) @ basis.T
    x = x * torch.exp(0.5 * torch.randn(d_in, generator=g))
    weight = torch.randn(d_out, d_in, generator=g)
    return weight, x.T @ x


def damped_optimum(weight, gram, mask, damping=0.1):
    """Exact per-row least squares for a fixed mask, in float64 — the test oracle.

    Objective: (w - w0) H (w - w0)ᵀ with H = G + λ diag(d²), which is what ADMM's
    damped problem is in original coordinates (d_j = ‖X_j‖, λ = damping·mean(G_jj/d_j²)).
    """
    g = gram.double()
    d = g.diagonal().sqrt() + 1e-8
    h = g + damping * (g.diagonal() / d ** 2).mean() * torch.diag(d ** 2)
    best = torch.zeros_like(weight, dtype=torch.float64)
    for i in range(weight.shape[0]):
        keep, drop = mask[i], ~mask[i]
        w0 = weight[i].double()
        best[i, keep] = w0[keep] + torch.linalg.solve(h[keep][:, keep], h[keep][:, drop] @ w0[drop])
    return best, h


def output_error(new, weight, gram):
    diff = (new.double() - weight.double())
    return torch.einsum("ij,jk,ik->", diff, gram.double(), diff).item()


@pytest.mark.parametrize("shape", [(16, 30), (32, 64), (24, 130), (64, 256)])
@pytest.mark.parametrize("damping", [0.1, 0.0])
def test_fixed_mask_admm_reaches_least_squares_optimum(shape, damping):
    weight, gram = correlated_problem(*shape, seed=shape[1])
    _, mask = prune_layer(weight, gram, method="wanda", sparsity=0.6)
    best, h = damped_optimum(weight, gram, mask, damping)

    def objective(w):
        diff = w.double() - weight.double()
        return torch.einsum("ij,jk,ik->", diff, h, diff).item()

    new = admm_update(weight, gram, mask, iters=20, damping=damping)
    gap = (objective(new) - objective(best)) / objective(best)
    assert gap < 1e-4
    assert not new[~mask].any()


def test_fixed_mask_admm_far_from_optimum_with_one_iteration():
    # Guards the oracle test: one iteration must not already look converged.
    weight, gram = correlated_problem(32, 64)
    _, mask = prune_layer(weight, gram, method="wanda", sparsity=0.6)
    best, h = damped_optimum(weight, gram, mask)
    new = admm_update(weight, gram, mask, iters=1)
    diff_new, diff_best = new.double() - weight.double(), best - weight.double()
    f = lambda d: torch.einsum("ij,jk,ik->", d, h, d).item()
    assert (f(diff_new) - f(diff_best)) / f(diff_best) > 1e-3


@pytest.mark.parametrize("sparsity", [0.5, 0.6, 0.7, 0.8])
def test_reconstruction_error_ordering(sparsity):
    weight, gram = correlated_problem(64, 256, seed=1)
    err = {m: output_error(prune_layer(weight, gram, method=m, sparsity=sparsity)[0], weight, gram)
           for m in METHODS}
    assert err["admm-grad"] <= err["admm"] < err["wanda"] < err["magnitude"]
    assert err["sparsegpt"] < err["wanda"]
    assert err["admm-grad"] < err["sparsegpt"]


def test_sparsegpt_update_is_close_to_optimum_for_its_mask():
    # SparseGPT's sequential OBS update is approximate, but must beat "no update"
    # by far and stay within a small factor of the exact optimum for its own mask.
    weight, gram = correlated_problem(32, 256, seed=2)
    new, mask = sparsegpt(weight, gram, 0.5, None)
    best, _ = damped_optimum(weight, gram, mask, damping=0.0)
    err_new, err_best = output_error(new, weight, gram), output_error(best, weight, gram)
    err_none = output_error(weight * mask, weight, gram)
    assert err_best <= err_new < 1.5 * err_best
    assert err_new - err_best < 0.5 * (err_none - err_best)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sparsity", [0.0, 0.37, 0.5, 0.8])
def test_exact_unstructured_sparsity(method, sparsity):
    weight, gram = correlated_problem(24, 130, n=512)
    new, mask = prune_layer(weight, gram, method=method, sparsity=sparsity)
    if method == "wanda":  # Wanda compares weights within a row: exact per row
        assert ((~mask).sum(1) == round(sparsity * 130)).all()
    else:
        assert (~mask).sum().item() == round(sparsity * mask.numel())
    assert not new[~mask].any()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "admm", "admm-grad"])
def test_row_group_prunes_each_row_equally(method):
    weight, gram = correlated_problem(16, 64, n=512)
    _, mask = prune_layer(weight, gram, method=method, sparsity=0.5, group="row")
    assert ((~mask).sum(1) == 32).all()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("4:8", 4, 8), ("1:4", 1, 4)])
def test_nm_groups_valid(method, pattern, n, m):
    weight, gram = correlated_problem(16, 64, n=512)
    new, mask = prune_layer(weight, gram, method=method, pattern=pattern)
    groups = mask.reshape(16, 64 // m, m).sum(-1)
    assert (groups == n).all()          # exactly N kept in every group
    assert is_nm_valid(new != 0, n, m)
    if pattern == "4:8":
        # 4:8 is not 2:4 in disguise: some group of 4 must keep 3 or more.
        assert (mask.reshape(16, 16, 4).sum(-1) > 2).any()


def test_gradual_nm_beats_one_shot_nm():
    weight, gram = correlated_problem(64, 256, seed=3)
    grad = output_error(prune_layer(weight, gram, method="admm-grad", pattern="2:4")[0], weight, gram)
    fixed = output_error(prune_layer(weight, gram, method="admm", pattern="2:4")[0], weight, gram)
    assert grad <= fixed


def test_constant_schedule_differs_from_cubic():
    weight, gram = correlated_problem(32, 64)
    cubic, _ = prune_layer(weight, gram, method="admm-grad", sparsity=0.7)
    const, _ = prune_layer(weight, gram, method="admm-grad", sparsity=0.7, schedule="constant")
    assert not torch.equal(cubic, const)


@pytest.mark.parametrize("method", METHODS)
def test_dead_channels_and_singular_gram_give_finite_results(method):
    weight, _ = correlated_problem(16, 32)
    x = torch.randn(8, 32)            # 8 samples: Gram of rank 8 < 32
    x[:, :5] = 0                      # dead input channels
    gram = x.T @ x
    for damping in ([0.0, 0.1] if method.startswith("admm") else [None]):
        opts = {} if damping is None else {"damping": damping}
        new, mask = prune_layer(weight, gram, method=method, sparsity=0.5, **opts)
        assert torch.isfinite(new).all()
        assert (~mask).sum() == 256


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method", METHODS)
def test_low_precision_weights_keep_dtype(method, dtype):
    weight, gram = correlated_problem(16, 64, n=512)
    new, mask = prune_layer(weight.to(dtype), gram, method=method, sparsity=0.5)
    assert new.dtype == dtype and new.shape == weight.shape
    assert torch.isfinite(new.float()).all()
    assert not new[~mask].any()


def test_external_mask_is_respected():
    weight, gram = correlated_problem(16, 64, n=512)
    mask = torch.rand(16, 64, generator=torch.Generator().manual_seed(0)) > 0.3
    new = admm_update(weight, gram, mask)
    assert torch.equal(new != 0, mask)


@pytest.mark.parametrize("kwargs,name", [
    (dict(method="admm", sparsity=1.0), "sparsity"),
    (dict(method="admm", sparsity=-0.1), "sparsity"),
    (dict(method="admm", sparsity=1.5), "sparsity"),
    (dict(method="admm", pattern="3:2"), "pattern"),
    (dict(method="admm", pattern="2-4"), "pattern"),
    (dict(method="admm", pattern="2:4", sparsity=0.6), "sparsity"),
    (dict(method="bogus", sparsity=0.5), "method"),
    (dict(method="admm-grad", sparsity=0.5, iters=10), "mask_steps"),
    (dict(method="admm", sparsity=0.5, schedule="linear"), "schedule"),
    (dict(method="admm", sparsity=0.5, group="column"), "group"),
    (dict(method="wanda", sparsity=0.5, iters=3), "iters"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    weight, gram = correlated_problem(8, 16, n=64)
    with pytest.raises(ValueError, match=name):
        prune_layer(weight, gram, **kwargs)


def test_shape_mismatch_and_indivisible_nm():
    weight, gram = correlated_problem(8, 18, n=64)
    with pytest.raises(ValueError, match="gram"):
        prune_layer(weight, gram[:10, :10], method="wanda", sparsity=0.5)
    with pytest.raises(ValueError, match="pattern"):
        prune_layer(weight, gram, method="wanda", pattern="2:4")
    with pytest.raises(ValueError, match="mask"):
        admm_update(weight, gram, torch.ones(8, 4, dtype=torch.bool))
