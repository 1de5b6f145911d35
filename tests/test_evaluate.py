"""Evaluation tools: ablation scores by hand, the flip test's stopping point, correlations against
scipy, feature selection on a task with known informative filters, the randomisation cascade."""
import pytest
import torch
from torch import nn

from attrib import evaluate as ev

stats = pytest.importorskip("scipy.stats")


class OneByOne(nn.Module):
    """h = relu(a_c x + b_c) per channel (1x1 conv), F_k = sum_c W_kc sum_positions h_c."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 1)
        self.relu = nn.ReLU()
        self.head = nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -2.0, 0.5]).view(3, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.1, 1.0, -0.2]))
            self.head.weight.copy_(torch.tensor([[2.0, 1.0, -3.0], [0.5, 0.5, 0.5]]))

    def forward(self, x):
        return self.head(self.relu(self.conv(x)).sum((2, 3)))


def test_ablation_score_is_the_score_difference_by_hand():
    model = OneByOne().double().eval()
    x = torch.tensor([[[[0.3, 1.2], [-0.4, 0.8]]]], dtype=torch.float64)
    a, b = model.conv.weight.view(3), model.conv.bias
    per_channel = torch.relu(a.view(3, 1) * x.view(1, 4) + b.view(3, 1)).sum(1)   # sum over positions of h_c
    expected = model.head.weight[0] * per_channel                                  # F - F(without c)
    got = ev.ablation_scores(model, x, "conv", target=0)
    assert torch.allclose(got[0], expected, atol=1e-12)
    # -inf before the ReLU gives the same here (the ReLU maps it to 0)
    assert torch.allclose(ev.ablation_scores(model, x, "conv", target=0, mode="suppress")[0], expected, atol=1e-12)
    with pytest.raises(ValueError, match="mode"):
        ev.ablation_scores(model, x, "conv", target=0, mode="drop")


class Threshold(nn.Module):
    """Label 0 while the sum of the features exceeds 2.5, label 1 after."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Identity()

    def forward(self, x):
        total = self.features(x).sum(1, keepdim=True)
        return torch.cat([total, torch.full_like(total, 2.5)], 1)


def test_flip_test_stops_at_the_first_label_change():
    model = Threshold().eval()
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0, 0.0]])
    importance = torch.tensor([[5.0, 4, 3, 2, 1], [1.0, 2, 3, 4, 5], [0.0, 1, 2, 3, 4]])
    # sums 5 -> 4 -> 3 -> 2 (< 2.5 at the 3rd ablation); 3 -> 3 -> 3 -> 2 (its top two filters hold 0);
    # the third example flips only when filter 0, ranked last, goes
    assert ev.flip_counts(model, x, "features", importance) == [3, 3, 5]
    assert ev.flip_counts(model, x, "features", importance, max_filters=4) == [3, 3, None]


def test_correlations_match_scipy_with_ties():
    a = torch.tensor([[1.0, 2.0, 2.0, 5.0, 3.0, 3.0], [0.5, -1.0, 4.0, 2.0, 2.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[2.0, 1.0, 4.0, 4.0, 6.0, 0.0], [1.0, 1.0, 1.0, 3.0, -2.0, 5.0]], dtype=torch.float64)
    for row in range(2):
        assert abs(float(ev.pearson(a, b)[row]) - stats.pearsonr(a[row].numpy(), b[row].numpy())[0]) < 1e-12
        assert abs(float(ev.spearman(a, b)[row]) - stats.spearmanr(a[row].numpy(), b[row].numpy())[0]) < 1e-12
    assert torch.equal(ev.ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])), torch.tensor([3.5, 1.0, 3.5, 2.0], dtype=torch.float64))


class Informative(nn.Module):
    """Six features; the head reads only features 0 and 3."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Linear(6, 6, bias=False)
        self.head = nn.Linear(6, 2, bias=False)
        with torch.no_grad():
            self.features.weight.copy_(torch.eye(6))
            self.head.weight.copy_(torch.tensor([[1.0, 0, 0, 1.0, 0, 0], [-1.0, 0, 0, -1.0, 0, 0]]))

    def forward(self, x):
        return self.head(self.features(x))


def test_feature_selection_picks_the_informative_filters():
    torch.manual_seed(0)
    labels = torch.randint(0, 2, (400,))
    x = torch.randn(400, 6)
    signal = (1 - 2 * labels.float()) * 2.0 + 0.3 * torch.randn(400)
    x[:, 0] += signal
    x[:, 3] += signal
    model = Informative().eval()
    for method in ("gradient_x_activation", "conductance"):
        importance = ev.filter_importance(model, x[:300], "features", labels[:300].tolist(), method)
        assert ev.select_filters(importance, labels[:300], 2) == [0, 3], method
    features = ev.pooled_activations(model, x, "features")
    good = ev.linear_probe(features[:300, [0, 3]], labels[:300], features[300:, [0, 3]], labels[300:], 2)
    noise = ev.linear_probe(features[:300, [1, 2]], labels[:300], features[300:, [1, 2]], labels[300:], 2)
    assert good > 0.95 and noise < 0.7


def test_randomisation_cascade_goes_top_down_and_changes_the_attribution():
    model = OneByOne().double().eval()
    x = torch.randn(4, 1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    copies = list(ev.randomised_copies(model))
    assert [name for name, _ in copies] == ["head", "conv"]
    assert torch.equal(copies[0][1].conv.weight, model.conv.weight) and not torch.equal(copies[0][1].head.weight, model.head.weight)
    result = ev.sanity_check(model, x, "conv", target=0, methods=("activation", "gradient_x_activation"), n_steps=4)
    assert result["activation"][0] == ("head", pytest.approx(1.0))    # activations below the change stay
    from attrib import LayerGradientXActivation

    def grad_x_act(m):
        return LayerGradientXActivation(m, "conv").attribute(x, target=0).attributions["conv"].reshape(4, -1)

    for (name, twin), (reported_name, value) in zip(copies, result["gradient_x_activation"]):
        import numpy as np

        with np.errstate(invalid="ignore"):
            per_example = [stats.spearmanr(grad_x_act(model)[i].numpy(), grad_x_act(twin)[i].numpy())[0] for i in range(4)]
        expected = float(np.nanmean(per_example))  # a constant map has no rank correlation: left out
        assert reported_name == name and abs(value - expected) < 1e-12, (name, value, expected)


def test_cascade_follows_the_forward_order_and_leaves_the_random_state_alone():
    class Reversed(nn.Module):  # the head is registered before the body it follows
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(3, 2)
            self.body = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    model, x = Reversed(), torch.rand(2, 4)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    names = [name for name, _ in ev.randomised_copies(model, inputs=x)]
    assert names == ["head", "body"]
    assert torch.equal(torch.rand(1), expected_next)
