"""The embedded digits model: held-out accuracy from the shipped weights, the normalisation matches
the training split, weights load without unpickling code, and the path graph works on it."""
import io
import pickle

import pytest
import torch

from attrib import graphs
from attrib.models import (
    DigitsNet,
    load_digits_model,
    pixel_bounds,
    preprocess,
    sample_digits,
)
from attrib.models.digits import MEAN, SIZE, STD, digits_split

pytest.importorskip("sklearn")


def held_out():
    return digits_split()


def test_held_out_accuracy_at_least_95_percent():
    images, labels, _, test = held_out()
    model = load_digits_model()
    with torch.no_grad():
        predicted = model(preprocess(images[test])).argmax(1)
    accuracy = float((predicted == labels[test]).float().mean())
    assert accuracy >= 0.95, accuracy
    assert len(test) == 450


def test_normalisation_constants_are_the_training_split_statistics():
    images, _, train, _ = held_out()
    scaled = torch.nn.functional.interpolate(images[train].unsqueeze(1) / 16, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    assert abs(float(scaled.mean()) - MEAN) < 1e-4 and abs(float(scaled.std()) - STD) < 1e-4
    low, high = pixel_bounds()
    assert torch.allclose(preprocess(torch.zeros(1, 8, 8)), torch.full((1, 1, SIZE, SIZE), low))
    assert torch.allclose(preprocess(torch.full((1, 8, 8), 16.0)), torch.full((1, 1, SIZE, SIZE), high))


def test_shipped_samples_are_held_out_digits_it_classifies():
    images, labels = sample_digits()
    assert labels.tolist() == list(range(10))
    all_images, all_labels, _, test = held_out()
    for image, label in zip(images, labels):
        matches = [int(i) for i in test if torch.equal(all_images[int(i)].to(torch.uint8), image) and int(all_labels[int(i)]) == int(label)]
        assert matches, int(label)
    with torch.no_grad():
        assert load_digits_model()(preprocess(images)).argmax(1).tolist() == list(range(10))


def test_weights_are_a_plain_state_dict():
    from importlib import resources

    raw = resources.files("attrib.models").joinpath("digits.pt").read_bytes()
    state = torch.load(io.BytesIO(raw), weights_only=True)
    assert set(state) == set(DigitsNet().state_dict())
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    with pytest.raises(pickle.UnpicklingError):  # weights_only refuses anything that is not plain tensors
        torch.load(io.BytesIO(pickle.dumps(DigitsNet())), weights_only=True)


def test_path_graph_on_the_trained_model():
    images, _ = sample_digits()
    model = load_digits_model()
    x = preprocess(images[3:4])
    flow = graphs.build_graph(model, x, target=3, k=6, conductance_steps=None)
    assert flow.layers == ["features.0", "features.2", "features.5", "features.7", "classifier.0"]
    assert flow.score > 0 and len(graphs.k_best_paths(flow, 5)) == 5
    curves = graphs.k_curves(flow, max_k=100)
    assert curves.score_smape[-1] < curves.score_smape[0]  # more paths keep more of the score
