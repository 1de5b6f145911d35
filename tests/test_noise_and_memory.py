"""Noise tunnels (any method), GradientSHAP and the memory-budget chunking. Oracles: Captum's NoiseTunnel
with the same seed (our noise is drawn as Captum draws it), the mean of per-sample attributions over the
same noise, exactness on linear models, and chunked == unchunked."""
import warnings

import pytest
import torch
from captum import attr as captum
from conftest import make_cnn, relative
from torch import nn

import attrib
from attrib.memory import ChunkPlan, Footprint
from attrib.noise import draw_noise, noise_scale

TOL = 1e-8


@pytest.fixture(scope="module")
def cnn():
    model = make_cnn()
    torch.manual_seed(2)
    return model, torch.rand(2, 3, 8, 8, dtype=torch.float64), [1, 3]


@pytest.mark.parametrize("nt_type", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_noise_tunnel_of_integrated_gradients_matches_captum_with_the_same_seed(cnn, nt_type):
    model, x, target = cnn
    torch.manual_seed(11)
    ours = attrib.NoiseTunnel(attrib.IntegratedGradients(model)).attribute(
        x, nt_type=nt_type, nt_samples=4, stdevs=0.2, target=target, n_steps=8, internal_batch_size=5)
    torch.manual_seed(11)
    theirs = captum.NoiseTunnel(captum.IntegratedGradients(model)).attribute(
        x, nt_type=nt_type, nt_samples=4, stdevs=0.2, target=target, n_steps=8)
    assert relative(ours.attributions, theirs) <= TOL


def test_noise_tunnel_in_sample_batches_matches_captum(cnn):
    model, x, target = cnn
    torch.manual_seed(5)
    ours = attrib.NoiseTunnel(attrib.Saliency(model)).attribute(x, nt_samples=5, nt_samples_batch_size=2, stdevs=0.3,
                                                                target=target)
    torch.manual_seed(5)
    theirs = captum.NoiseTunnel(captum.Saliency(model)).attribute(x, nt_samples=5, nt_samples_batch_size=2, stdevs=0.3,
                                                                  target=target)
    assert relative(ours.attributions, theirs) <= TOL


def test_noise_tunnel_is_the_mean_of_per_sample_attributions_with_complete_deltas(cnn):
    model, x, target = cnn
    res = attrib.NoiseTunnel(attrib.IntegratedGradients(model)).attribute(
        x, nt_samples=3, stdevs=0.1, target=target, n_steps=6, generator=torch.Generator().manual_seed(4))
    noise = draw_noise(x, 3, noise_scale(x, 0.1, "absolute"), torch.Generator().manual_seed(4)).view(2, 3, 3, 8, 8)
    runs = [attrib.IntegratedGradients(model).attribute(x + noise[:, s], target=target, n_steps=6) for s in range(3)]
    expected = sum(r.attributions for r in runs) / 3
    assert relative(res.attributions, expected) <= 1e-12
    assert torch.allclose(res.info["sample_deltas"], torch.stack([r.delta for r in runs], 1), atol=1e-14)
    # delta is the averaged map's completeness error against the averaged score change
    assert torch.allclose(res.attributions.flatten(1).sum(1) - (res.outputs - res.baseline_outputs), res.delta, atol=1e-12)


def test_noise_tunnel_around_layer_and_neuron_methods(cnn):
    model, x, target = cnn
    g = lambda: torch.Generator().manual_seed(8)  # noqa: E731
    layer = attrib.NoiseTunnel(attrib.LayerConductance(model, ["0", "3"])).attribute(
        x, nt_samples=3, stdevs=0.1, target=target, n_steps=5, generator=g())
    noise = draw_noise(x, 3, noise_scale(x, 0.1, "absolute"), g()).view(2, 3, 3, 8, 8)
    runs = [attrib.LayerConductance(model, ["0", "3"]).attribute(x + noise[:, s], target=target, n_steps=5) for s in range(3)]
    for name in ("0", "3"):
        assert relative(layer[name], sum(r[name] for r in runs) / 3) <= 1e-12
        assert torch.allclose(layer.delta[name], sum(r.delta[name] for r in runs) / 3, atol=1e-14)
    selectors = [(1, 1, 1), (0, slice(None), slice(None))]
    neuron = attrib.NoiseTunnel(attrib.NeuronConductance(model, "3")).attribute(
        x, nt_samples=3, stdevs=0.1, target=target, n_steps=5, neuron_selector=selectors, generator=g())
    runs = [attrib.NeuronConductance(model, "3").attribute(x + noise[:, s], selectors, target=target, n_steps=5)
            for s in range(3)]
    assert neuron.attributions.shape == (2,) + x.shape
    assert relative(neuron.attributions, sum(r.attributions for r in runs) / 3) <= 1e-12


def test_noise_tunnel_with_several_inputs_and_per_input_stdevs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Bilinear(4, 3, 2)).double()

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, a, b):
            return self.inner[0](a, b)

    two = Two()
    inputs = (torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64))
    torch.manual_seed(3)
    ours = attrib.NoiseTunnel(attrib.InputXGradient(two)).attribute(inputs, nt_samples=4, stdevs=(0.1, 0.5), target=1)
    torch.manual_seed(3)
    theirs = captum.NoiseTunnel(captum.InputXGradient(two)).attribute(inputs, nt_samples=4, stdevs=(0.1, 0.5), target=1)
    assert isinstance(ours.attributions, tuple)
    for a, b in zip(ours.attributions, theirs):
        assert relative(a, b) <= TOL


def test_gradient_shap_is_exact_on_a_linear_model_and_a_dense_reimplementation_elsewhere(cnn):
    linear = nn.Linear(6, 3).double()
    x, references = torch.randn(4, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    res = attrib.GradientShap(linear).attribute(x, references, n_samples=7, stdevs=0.2, target=2,
                                                generator=torch.Generator().manual_seed(1))
    assert res.delta.abs().max() < 1e-12 and res.info["sample_deltas"].abs().max() < 1e-12
    # the CNN: draw the same noise, baselines and points by hand
    model, x, target = cnn
    references = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    g = torch.Generator().manual_seed(6)
    res = attrib.GradientShap(model).attribute(x, references, n_samples=3, stdevs=0.1, target=target, generator=g,
                                               internal_batch_size=2)
    g = torch.Generator().manual_seed(6)
    noisy = x.repeat_interleave(3, 0) + draw_noise(x, 3, noise_scale(x, 0.1, "absolute"), g)
    drawn = references[torch.randint(4, (6,), generator=g)]
    u = torch.rand(6, generator=g, dtype=torch.float64).view(6, 1, 1, 1)
    grads = attrib.Saliency(model).attribute(drawn + u * (noisy - drawn), target=[1, 1, 1, 3, 3, 3], abs=False).attributions
    expected = ((noisy - drawn) * grads).view(2, 3, 3, 8, 8).mean(1)
    assert relative(res.attributions, expected) <= 1e-12


def test_gradient_shap_matches_captum_when_nothing_is_random():
    """One reference repeated, no noise, a linear model: every draw gives the same map in both."""
    linear = nn.Linear(6, 3).double()
    x, reference = torch.randn(4, 6, dtype=torch.float64), torch.randn(1, 6, dtype=torch.float64)
    ours = attrib.GradientShap(linear).attribute(x, reference.repeat(3, 1), n_samples=5, target=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = captum.GradientShap(linear).attribute(x, reference.repeat(3, 1), n_samples=5, target=1)
    assert relative(ours.attributions, theirs) <= TOL


def test_auto_chunking_gives_the_numbers_of_one_chunk(cnn):
    model, x, target = cnn
    whole = attrib.LayerConductance(model, ["0", "3"]).attribute(x, target=target, n_steps=40, internal_batch_size=None)
    for budget in (None, 200_000, 1):
        auto = attrib.LayerConductance(model, ["0", "3"]).attribute(x, target=target, n_steps=40, memory_budget=budget)
        for name in ("0", "3"):
            assert relative(auto[name], whole[name]) <= 1e-12
    ig_whole = attrib.IntegratedGradients(model).attribute(x, target=target, n_steps=40, internal_batch_size=None)
    ig_auto = attrib.IntegratedGradients(model).attribute(x, target=target, n_steps=40, memory_budget=300_000)
    assert relative(ig_auto.attributions, ig_whole.attributions) <= 1e-12


def test_the_budget_sets_the_chunk_sizes(cnn):
    """A probe of one row, then chunks of budget / (measured cost per row): twice the budget, twice the rows."""
    model, x, target = cnn
    path = attrib.sweep.StraightPath(model, x, None, target)
    sizes = {}
    for budget in (200_000, 400_000):
        seen: list[int] = []
        path.evaluate(torch.linspace(0, 1, 100, dtype=torch.float64), lambda c: seen.append(c.stop - c.start),
                      input_grad=True, memory_budget=budget)
        assert seen[0] == 1 and sum(seen) == 200
        assert len(set(seen[1:-1])) <= 1  # every chunk but the last has the planned size
        sizes[budget] = seen[1]
    assert 1 < sizes[200_000] < 100
    assert abs(sizes[400_000] - 2 * sizes[200_000]) <= 1
    plan = ChunkPlan("auto", 100, x.device, memory_budget=400_000)
    plan.measured(1000, 1)
    assert plan.size == int(400_000 // 1500)  # SAFETY 1.5 per measured byte


def test_footprint_grows_with_the_rows():
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1)).double()
    peaks = []
    for rows in (8, 32):
        x = torch.randn(rows, 64, dtype=torch.float64, requires_grad=True)
        with Footprint(model, x.device) as fp:
            torch.autograd.grad(model(x).sum(), x)
        peaks.append(fp.peak)
    assert 3.5 < peaks[1] / peaks[0] < 4.5  # per-row work, weights not counted


def test_bad_chunk_arguments_are_refused(cnn):
    model, x, target = cnn
    with pytest.raises(ValueError, match="internal_batch_size must be 'auto', None or a positive int"):
        attrib.IntegratedGradients(model).attribute(x, target=target, internal_batch_size="big")
    with pytest.raises(ValueError, match="memory_budget must be a positive number of bytes"):
        attrib.IntegratedGradients(model).attribute(x, target=target, memory_budget=0)
    with pytest.raises(ValueError, match="nt_type must be one of"):
        attrib.NoiseTunnel(attrib.Saliency(model)).attribute(x, nt_type="smooth", target=target)
    with pytest.raises(ValueError, match=r"stdevs: 2 given for 1 inputs"):
        attrib.NoiseTunnel(attrib.Saliency(model)).attribute(x, stdevs=(0.1, 0.2), target=target)
    with pytest.raises(ValueError, match="baselines: draw_baseline_from_distrib needs"):
        attrib.NoiseTunnel(attrib.Saliency(model)).attribute(x, draw_baseline_from_distrib=True, target=target)


def test_noise_tunnel_smooths_lrp_recorded_layers_too(cnn):
    model, x, target = cnn
    g = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    res = attrib.NoiseTunnel(attrib.LRP(model, "epsilon")).attribute(x, nt_samples=3, stdevs=0.05, target=target,
                                                                     layers=["3"], generator=g())
    noise = draw_noise(x, 3, noise_scale(x, 0.05, "absolute"), g()).view(2, 3, 3, 8, 8)
    runs = [attrib.LRP(model, "epsilon").attribute(x + noise[:, s], target=target, layers=["3"]) for s in range(3)]
    assert relative(res.attributions, sum(r.attributions for r in runs) / 3) <= 1e-12
    assert relative(res["3"], sum(r["3"] for r in runs) / 3) <= 1e-12
