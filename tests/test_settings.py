"""The settings model (pruning.settings): one resolver, errors that name the parameter
as data, and the params check that accepts exactly what the library accepts."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st

from pruning.settings import LayerShape, PruneSettings, SettingsError

LAYER_NAMES = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")


def shapes(blocks=4, down_in=128):
    return [LayerShape(b, n, f"model.layers.{b}.{n}", 64, down_in if n == "mlp.down_proj" else 64)
            for b in range(blocks) for n in LAYER_NAMES]


def refused(settings_call) -> SettingsError:
    with pytest.raises(SettingsError) as err:
        settings_call()
    return err.value


# ---------------------------------------------------------------- the resolver

def test_default_then_block_then_layer_overrides():
    """Red when the resolver applies the levels in another order, ignores negative
    block keys, or lets an N:M level keep an inherited sparsity."""
    s = PruneSettings("admm-grad", 0.5, options={"iters": 30, "mask_steps": 10},
                      block_overrides={-1: {"sparsity": 0.7}, 1: {"pattern": "2:4"}},
                      layer_overrides={"down_proj": {"method": "wanda", "sparsity": 0.6, "pattern": "unstructured"}})
    plan = s.plan(shapes())
    assert plan["model.layers.0.self_attn.q_proj"].sparsity == 0.5
    assert plan["model.layers.0.self_attn.q_proj"].options["iters"] == 30
    assert plan["model.layers.3.self_attn.q_proj"].sparsity == 0.7          # -1 = the last block
    assert (plan["model.layers.1.self_attn.o_proj"].pattern, plan["model.layers.1.self_attn.o_proj"].sparsity) \
        == ("2:4", 0.5)                                                          # N:M implies its own sparsity
    down = plan["model.layers.0.mlp.down_proj"]
    assert (down.method, down.sparsity, down.options) == ("wanda", 0.6, {"group": "row"})  # a new method starts clean


@pytest.mark.parametrize("kwargs, path", [
    (dict(method="admm-grad", sparsity=1.5), ("sparsity",)),
    (dict(method="admm-grad", sparsity=None), ("sparsity",)),                  # null needs an N:M pattern
    (dict(method="admm-grad", pattern="4:2"), ("pattern",)),
    (dict(method="admm-grad", pattern="2:4", sparsity=0.6), ("sparsity",)),
    (dict(method="bogus"), ("method",)),
    (dict(method="admm-grad", options={"blocksize": 64}), ("options", "blocksize")),
    (dict(method="admm-grad", options={"iters": 10}), ("options", "mask_steps")),
    (dict(method="admm", options={"schedule": "constant"}), ("options", "schedule")),
    (dict(method="admm-grad", options={"rho": "x"}), ("options", "rho")),
    (dict(method="admm-grad", block_overrides={2: {"spars": 0.3}}), ("block_overrides", 2, "spars")),
    (dict(method="admm-grad", block_overrides={2: {"method": "wanda", "options": {"iters": 3}}}),
     ("block_overrides", 2, "options", "iters")),
    (dict(method="admm-grad", layer_overrides={"mlp.down_proj": {"sparsity": 2}}),
     ("layer_overrides", "mlp.down_proj", "sparsity")),
])
def test_errors_carry_the_parameter_path_as_data(kwargs, path):
    """Red when an error names the wrong level or key, or only says it in its text."""
    err = refused(lambda: PruneSettings(**kwargs).check())
    assert err.path == path
    assert str(err.within("prune")).startswith(".".join(map(str, ("prune", *path))) + ": ")


def test_the_params_check_and_the_runner_agree_on_the_issues_drift_cases():
    """The drift of issue 10. Red when the check refuses what the runner accepts
    (options of the old method under a method override) or accepts what it refuses
    (a block's 2:4 with a layer's 0.7)."""
    PruneSettings("admm-grad", 0.5, options={"iters": 30},
                  layer_overrides={"mlp.down_proj": {"method": "wanda"}}).plan(shapes())
    conflict = PruneSettings("admm-grad", 0.5, block_overrides={1: {"pattern": "2:4"}},
                             layer_overrides={"mlp.down_proj": {"sparsity": 0.7}})
    conflict.check()  # each override is fine against the default...
    err = refused(lambda: conflict.plan(shapes()))  # ...but block 1's down_proj gets both
    assert err.path == ("layer_overrides", "mlp.down_proj", "sparsity")
    assert "block_overrides.1.pattern" in str(err) and "block 1" in str(err)


def test_names_that_reach_nothing_are_refused_with_the_nearest_name():
    """Red when a mistyped override or mask key is accepted silently (issue 10: a
    typo ran the whole pipeline and changed nothing) or suggests nothing useful."""
    err = refused(lambda: PruneSettings("wanda", layer_overrides={"mlp.down_prj": {"sparsity": 0.9}}).plan(shapes()))
    assert err.path == ("layer_overrides", "mlp.down_prj") and "did you mean 'mlp.down_proj'" in str(err)
    err = refused(lambda: PruneSettings("wanda", block_overrides={7: {"sparsity": 0.7}}).plan(shapes()))
    assert err.path == ("block_overrides", 7) and "0..3" in str(err)
    err = refused(lambda: PruneSettings("wanda").plan(shapes(), {"model.layers.9.mlp.down_proj": (64, 128)},
                                                     mask_path=("mask_file",)))
    assert err.path == ("mask_file",) and "did you mean 'model.layers.3.mlp.down_proj'" in str(err)
    err = refused(lambda: PruneSettings("wanda").plan(shapes(), {"model.layers.1.mlp.down_proj": (3, 3)}))
    assert err.path == ("masks",) and "(64, 128)" in str(err)
    err = refused(lambda: PruneSettings("wanda", None, "1:3").plan(shapes()))
    assert err.path == ("pattern",) and "in_features=64" in str(err)


def test_a_user_mask_gets_the_admm_update_whatever_the_method():
    """Issue 10: sparsegpt's blocksize was handed to the ADMM update of a masked layer
    and failed mid-run. Red when a masked layer inherits another method's options."""
    plan = PruneSettings("sparsegpt", options={"blocksize": 64}).plan(
        shapes(), {"model.layers.1.mlp.down_proj.weight": (64, 128)})
    masked = plan["model.layers.1.mlp.down_proj"]
    assert masked.user_mask and masked.method == "admm" and "blocksize" not in masked.options
    assert plan["model.layers.0.mlp.down_proj"].options["blocksize"] == 64
    admm = PruneSettings("admm", options={"iters": 7}).plan(shapes(), {"model.layers.1.mlp.down_proj": (64, 128)})
    assert admm["model.layers.1.mlp.down_proj"].options["iters"] == 7  # the ADMM options do carry over


def test_sparsegpt_with_a_user_mask_runs_end_to_end():
    from pruning.models import build_tiny_model
    from pruning.runner import PruneSpec, prune_model

    model, _ = build_tiny_model("llama")
    name = "model.layers.1.self_attn.o_proj"
    mask = torch.rand(64, 64, generator=torch.Generator().manual_seed(0)) > 0.4
    calib = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    result = prune_model(model, calib, PruneSpec("sparsegpt", 0.5, options={"blocksize": 64}, masks={name: mask}),
                         progress=False)
    assert torch.equal(model.get_submodule(name).weight != 0, mask)
    assert len(result.layers) == 28


# ---------------------------------------------------------------- params check == library

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """params.yaml (tiny profile) whose model is a local 2-block Llama with odd widths
    (q/k/v/gate/up/o read 48 features, down_proj 80: 1:3 fits some layers, not others),
    synthetic data, and three mask files."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from flows.params_edit import apply_overrides, parse_assignment
    from pipeline_support import ROOT, TINY, write_data

    tmp = tmp_path_factory.mktemp("settings")
    config = LlamaConfig(vocab_size=258, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp / "model")
    (tmp / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    write_data(tmp / "data")
    apply_overrides(tmp / "params.yaml", [parse_assignment(s) for s in TINY + [f"model.source={tmp / 'model'}"]])
    save_file({"model.layers.1.mlp.down_proj": torch.rand(48, 80) > 0.5}, tmp / "ok.safetensors")
    save_file({"model.layers.1.mlp.down_proj": torch.ones(3, 3, dtype=torch.bool)}, tmp / "shape.safetensors")
    save_file({"model.layers.7.mlp.down_proj": torch.ones(48, 80, dtype=torch.bool)}, tmp / "unknown.safetensors")
    from stages.params import load_params
    return {"dir": tmp, "params": load_params(tmp / "params.yaml"), "model": model,
            "calib": torch.randint(0, 258, (2, 8), generator=torch.Generator().manual_seed(0))}


# Mostly valid values, some invalid ones: about a third of the generated settings pass.
METHODS = st.sampled_from(["magnitude", "wanda", "sparsegpt", "admm", "admm-grad"] * 3 + ["obs"])
FRACTIONS = st.sampled_from([0.0, 0.3, 0.5, 0.75])
NM = st.sampled_from(["2:4", "4:8", "1:3"])
SPARSITIES = st.sampled_from([0.3, 0.5, None, 1.0, -0.1, "half", True])
PATTERNS = st.sampled_from(["unstructured", "unstructured", "2:4", "1:3", "4:2", "2-4", 124])
SPARSITY_PATTERN = st.one_of(st.tuples(FRACTIONS, st.just("unstructured")), st.tuples(st.just(None), NM),
                             st.tuples(SPARSITIES, PATTERNS))
OPTION_VALUES = {
    "iters": st.sampled_from([1, 2, 3, 0, 2.5]),
    "mask_steps": st.sampled_from([1, 2, 4, 0]),
    "rho": st.sampled_from([1.0, 2, 0, -1, "x"]),
    "damping": st.sampled_from([0.1, 0.0, -0.5]),
    "schedule": st.sampled_from(["cubic", "constant", "linear"]),
    "group": st.sampled_from(["layer", "row", "column"]),
    "solve_dtype": st.sampled_from(["float32", "float64", "float16"]),
    "blocksize": st.sampled_from([16, 128, 0]),
    "foo": st.just(1),
}


def _some_of(values: dict, max_size: int):
    return st.lists(st.sampled_from(sorted(values)), max_size=max_size, unique=True).flatmap(
        lambda keys: st.fixed_dictionaries({k: values[k] for k in keys}))


OPTIONS = st.one_of(st.just({}), st.just({}), _some_of(OPTION_VALUES, 1), _some_of(OPTION_VALUES, 2))
LEVELS = _some_of({"method": METHODS, "sparsity": SPARSITIES, "pattern": PATTERNS, "options": OPTIONS,
                   "spars": st.just(0.5)}, 2)
PRUNE = st.tuples(SPARSITY_PATTERN, st.fixed_dictionaries({
    "method": METHODS, "options": OPTIONS,
    "true_sequential": st.sampled_from([False] * 6 + [True] * 2 + ["yes"]),
    "block_overrides": st.one_of(st.just({}), st.dictionaries(st.sampled_from([0, 1, -1, -2, 2]), LEVELS,
                                                              max_size=2)),
    "layer_overrides": st.one_of(st.just({}), st.dictionaries(
        st.sampled_from(["mlp.down_proj", "down_proj", "self_attn.q_proj", "o_proj", "mlp.down_prj"]), LEVELS,
        max_size=2)),
})).map(lambda pair: {"sparsity": pair[0][0], "pattern": pair[0][1], **pair[1]})


def _outcome(call):
    try:
        call()
    except Exception as err:  # for the library, any failure (a crash mid-run too) means "refused"
        return err
    return None


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(prune=PRUNE, mask=st.sampled_from([None, None, None, "ok", "shape", "unknown"]))
def test_the_params_check_accepts_exactly_what_the_library_accepts(workspace, prune, mask):
    """For generated prune settings (and user masks), `admm-prune`'s check of params.yaml
    accepts exactly when pruning.prune_model runs them through, and when both refuse,
    they name the same parameter. Red when the two drift apart again: a check that
    validates overrides only against the default, skips masked layers, or forgets N:M
    divisibility; or a runner that accepts what the check refuses."""
    from safetensors.torch import load_file

    from pruning.runner import PruneSpec, prune_model
    from stages.hashing import sha256_file
    from stages.preflight import check_all

    ws = workspace["dir"]
    params = copy.deepcopy(workspace["params"])
    mask_file = ws / f"{mask}.safetensors" if mask else None
    params["prune"] = {**prune, "mask_file": str(mask_file) if mask else None,
                       "mask_sha256": sha256_file(mask_file) if mask else None}
    with contextlib.chdir(ws):
        checked = _outcome(lambda: check_all(params))
    assert checked is None or isinstance(checked, SettingsError), repr(checked)

    model = copy.deepcopy(workspace["model"])
    masks = {k: v.bool() for k, v in load_file(mask_file).items()} if mask else None
    ran = _outcome(lambda: prune_model(model, workspace["calib"], PruneSpec(**copy.deepcopy(prune), masks=masks),
                                       progress=False))
    event("accepted" if checked is None else f"refused at {checked.key.split('.')[1] if checked.key.startswith('prune.') else checked.key}")
    assert (checked is None) == (ran is None), f"params check: {checked!r}; library: {ran!r}"
    if checked is not None:
        assert isinstance(ran, SettingsError), repr(ran)
        library_key = "prune." + ran.key.replace("masks", "mask_file", 1)
        assert checked.key == library_key, (checked, ran)
