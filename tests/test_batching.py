"""Chunking, batching, targets and dtypes: the same numbers however the work is cut."""
import pytest
import torch
from conftest import make_cnn, relative

import attrib


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("method", ["stieltjes_trapezoid", "riemann_trapezoid", "gausslegendre"])
def test_chunked_equals_unchunked(dtype, tol, method):
    model = make_cnn(dtype=dtype)
    x = torch.randn(3, 3, 8, 8, dtype=dtype, generator=torch.Generator().manual_seed(0))
    layers = ["0", "3", "6"]
    full = attrib.LayerConductance(model, layers).attribute(x, target=[0, 2, 4], n_steps=10, method=method)
    ig_full = attrib.IntegratedGradients(model).attribute(x, target=[0, 2, 4], n_steps=10, method=method)
    nc_full = attrib.NeuronConductance(model, "3").attribute(x, [(0, 1, 1), (2, slice(None), slice(None))], target=1, n_steps=10, method=method)
    for size in [1, 2, 5, 7, 32]:  # smaller than the batch, not a multiple of it, and larger
        chunked = attrib.LayerConductance(model, layers).attribute(x, target=[0, 2, 4], n_steps=10, method=method, internal_batch_size=size)
        for name in layers:
            assert relative(chunked[name], full[name]) <= tol, (size, name)
            # delta is a difference of nearly equal numbers: compare it on the scale of the scores
            scale = float(full.outputs.abs().max() + full.baseline_outputs.abs().max())
            assert float((chunked.delta[name] - full.delta[name]).abs().max()) <= tol * scale
        ig = attrib.IntegratedGradients(model).attribute(x, target=[0, 2, 4], n_steps=10, method=method, internal_batch_size=size)
        assert relative(ig.attributions, ig_full.attributions) <= tol
        nc = attrib.NeuronConductance(model, "3").attribute(x, [(0, 1, 1), (2, slice(None), slice(None))], target=1, n_steps=10, method=method, internal_batch_size=size)
        assert relative(nc.attributions, nc_full.attributions) <= tol


def test_memory_is_streamed_residuals_sum_to_delta():
    model = make_cnn()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    res = attrib.LayerConductance(model, ["0", "4"]).attribute(x, target=1, n_steps=30, internal_batch_size=4)
    for name in ["0", "4"]:
        residuals = res.info["step_residuals"][name]
        assert residuals.shape == (30, 2)
        assert torch.allclose(residuals.sum(0), res.delta[name], rtol=0, atol=1e-13)


def test_batch_equals_examples_one_by_one():
    model = make_cnn()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    targets = [4, 0, 2]
    together = attrib.LayerConductance(model, ["0", "3"]).attribute(x, target=targets, n_steps=6)
    ig = attrib.IntegratedGradients(model).attribute(x, target=torch.tensor(targets), n_steps=6)
    for i in range(3):
        alone = attrib.LayerConductance(model, ["0", "3"]).attribute(x[i:i + 1], target=targets[i], n_steps=6)
        for name in ["0", "3"]:
            assert torch.allclose(together[name][i:i + 1], alone[name], rtol=1e-12, atol=1e-15)
            assert torch.allclose(together.delta[name][i:i + 1], alone.delta[name], rtol=1e-9, atol=1e-15)
        one = attrib.IntegratedGradients(model).attribute(x[i:i + 1], target=targets[i], n_steps=6)
        assert torch.allclose(ig.attributions[i:i + 1], one.attributions, rtol=1e-12, atol=1e-15)


def test_target_forms_agree():
    model = make_cnn()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    run = attrib.LayerConductance(model, "3")
    by_int = run.attribute(x, target=2, n_steps=4)["3"]
    for target in [[2, 2], torch.tensor([2, 2]), torch.tensor(2), (2,), [(2,), (2,)], -3, lambda out: out[:, 2]]:
        assert torch.equal(run.attribute(x, target=target, n_steps=4)["3"], by_int), target


def test_float32_and_float64_agree():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    high = attrib.LayerConductance(make_cnn(dtype=torch.float64), "3").attribute(x, target=1, n_steps=8)
    low = attrib.LayerConductance(make_cnn(dtype=torch.float32), "3").attribute(x.float(), target=1, n_steps=8)
    assert low["3"].dtype == torch.float32
    assert relative(low["3"].double(), high["3"]) <= 1e-5


def test_additional_forward_args_are_expanded_per_row():
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = make_cnn()

        def forward(self, x, scale):
            return self.body(x) * scale.view(-1, 1)

    model = Scaled()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    scale = torch.tensor([2.0, -1.0], dtype=torch.float64)
    with_args = attrib.IntegratedGradients(model).attribute(x, target=1, additional_forward_args=(scale,), n_steps=5, internal_batch_size=3)
    plain = attrib.IntegratedGradients(model.body).attribute(x, target=1, n_steps=5)
    assert torch.allclose(with_args.attributions, plain.attributions * scale.view(-1, 1, 1, 1), rtol=1e-12, atol=1e-15)


def test_filter_scores_and_top_filters():
    conductance = torch.tensor([[[[1.0, -2.0], [0.5, 0.0]], [[3.0, 0.0], [0.0, 0.0]], [[-1.0, -1.0], [-1.0, 4.5]]]])
    res = attrib.Attribution(attributions={"layer": conductance})
    assert res.filter_scores("layer", "sum").tolist() == [[-0.5, 3.0, 1.5]]
    assert res.filter_scores(reduce="max").tolist() == [[1.0, 3.0, 4.5]]
    values, indices = attrib.top_filters(res.filter_scores(reduce="max"), 2)
    assert indices.tolist() == [[2, 1]] and values.tolist() == [[4.5, 3.0]]
