"""Bad input: a clear ValueError/TypeError naming the argument, and the model left untouched."""
import pytest
import torch
from conftest import DictOutput, assert_unchanged, make_cnn, model_state

import attrib

X = torch.randn(2, 3, 8, 8, dtype=torch.float64)


@pytest.fixture
def model():
    return make_cnn()


def check(model, error, match, call):
    before = model_state(model)
    with pytest.raises(error, match=match):
        call()
    assert_unchanged(model, before)


def test_unknown_layer_name_lists_closest(model):
    with pytest.raises(ValueError, match="layers: '5x' is not a submodule.*closest names"):
        attrib.LayerConductance(model, "5x")


def test_target_out_of_range(model):
    check(model, ValueError, r"target: 5 is out of range", lambda: attrib.LayerConductance(model, "3").attribute(X, target=5))
    check(model, ValueError, r"target: 2 targets given for 3 examples",
          lambda: attrib.IntegratedGradients(model).attribute(torch.cat([X, X[:1]]), target=[0, 1]))
    check(model, ValueError, r"target is required", lambda: attrib.IntegratedGradients(model).attribute(X))
    check(model, TypeError, r"target: an integer tensor", lambda: attrib.IntegratedGradients(model).attribute(X, target=torch.tensor([0.5, 1.0])))


def test_baselines_that_do_not_match(model):
    for bad in [torch.zeros(3, 8, 8, dtype=torch.float64), torch.zeros(2, 3, 8, 1, dtype=torch.float64), torch.zeros(4, 3, 8, 8, dtype=torch.float64)]:
        check(model, ValueError, r"baselines of shape", lambda: attrib.IntegratedGradients(model).attribute(X, target=0, baselines=bad))
    check(model, TypeError, r"baselines are torch.float32", lambda: attrib.IntegratedGradients(model).attribute(X, target=0, baselines=torch.zeros(2, 3, 8, 8)))
    check(model, ValueError, r"baselines contain NaN", lambda: attrib.IntegratedGradients(model).attribute(X, target=0, baselines=torch.full_like(X, float("nan"))))


def test_non_finite_inputs_and_wrong_dtype(model):
    bad = X.clone()
    bad[0, 0, 0, 0] = float("inf")
    check(model, ValueError, r"inputs contain NaN or infinite", lambda: attrib.LayerConductance(model, "0").attribute(bad, target=0))
    check(model, TypeError, r"inputs are torch.float32 but the model", lambda: attrib.LayerConductance(model, "0").attribute(X.float(), target=0))
    check(model, TypeError, r"inputs are torch.int64: integer and boolean inputs \(token ids, masks\) cannot be interpolated", lambda: attrib.LayerConductance(model, "0").attribute(X.long(), target=0))


def test_bad_steps_method_and_chunk(model):
    check(model, ValueError, r"n_steps must be a positive int, got 0", lambda: attrib.LayerConductance(model, "0").attribute(X, target=0, n_steps=0))
    check(model, ValueError, r"n_steps must be an int >= 2, got 1", lambda: attrib.IntegratedGradients(model).attribute(X, target=0, n_steps=1, method="riemann_left"))
    check(model, TypeError, r"n_steps must be an int", lambda: attrib.LayerConductance(model, "0").attribute(X, target=0, n_steps=2.5))
    check(model, ValueError, r"method: 'simpson' is not one of", lambda: attrib.LayerConductance(model, "0").attribute(X, target=0, method="simpson"))
    check(model, ValueError, r"internal_batch_size must be a positive int, got 0", lambda: attrib.LayerConductance(model, "0").attribute(X, target=0, internal_batch_size=0))
    check(model, ValueError, r"tolerance: adaptive refinement needs", lambda: attrib.LayerConductance(model, "0").attribute(X, target=0, method="riemann_left", tolerance=1e-3))


def test_inputs_on_another_device_than_the_model(model):
    meta = torch.empty(2, 3, 8, 8, dtype=torch.float64, device="meta")
    check(model, ValueError, r"inputs are on meta but the model is on cpu", lambda: attrib.LayerConductance(model, "0").attribute(meta, target=0))


def test_model_output_that_is_not_a_tensor():
    model = DictOutput()
    x = torch.randn(2, 4, dtype=torch.float64)
    check(model, TypeError, r"model output is a dict, not a tensor; pass a callable target",
          lambda: attrib.LayerConductance(model, "body").attribute(x, target=1))
    res = attrib.LayerConductance(model, "body").attribute(x, target=lambda out: out["logits"][:, 1], n_steps=3)
    assert float(res.delta["body"].abs().max()) <= 1e-14  # a linear model: exact
    check(model, ValueError, r"target: the callable must return one score per row of the output it is given",
          lambda: attrib.IntegratedGradients(model).attribute(x, target=lambda out: out["logits"]))


def test_neuron_selector_errors(model):
    check(model, ValueError, r"neuron_selector: .* must index all 3", lambda: attrib.NeuronConductance(model, "3").attribute(X, (1, 1), target=0))
    check(model, ValueError, r"neuron_selector: .* out of range", lambda: attrib.NeuronConductance(model, "3").attribute(X, (9, 0, 0), target=0))


def test_every_count_argument_refuses_a_float_the_same_way(model):
    """One validator: a float where an int count is expected is a TypeError (and a ValueError, since
    InputTypeError is both) naming the argument, in every method that takes a count."""
    calls = {
        "n_steps": [
            lambda: attrib.LayerConductance(model, "0").attribute(X, target=0, n_steps=2.0),
            lambda: attrib.IntegratedGradients(model).attribute(X, target=0, n_steps=2.0),
            lambda: attrib.NeuronConductance(model, "0").attribute(X, (0, 0, 0), target=0, n_steps=2.0),
            lambda: attrib.InternalInfluence(model, "0").attribute(X, target=0, n_steps=2.0),
            lambda: attrib.conductance_ascent(model, X[:1], "0", target=0, n_steps=2.0, steps=1),
        ],
        "internal_batch_size": [lambda: attrib.IntegratedGradients(model).attribute(X, target=0, internal_batch_size=2.0)],
        "n_samples": [lambda: attrib.SmoothGrad(model).attribute(X, target=0, n_samples=2.0)],
    }
    for name, makers in calls.items():
        for call in makers:
            check(model, attrib.InputTypeError, rf"{name} must be an int, got float 2.0", call)
