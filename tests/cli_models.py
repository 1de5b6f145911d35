"""Model factories for the command-line tests (``--model cli_models:name``, with tests/ on PYTHONPATH)."""
import torch
from torch import nn


class Residual(nn.Module):
    """conv -> (conv, conv) + skip -> pool -> linear: the inner convolutions are bypassed, so not cuts."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x):
        h = torch.relu(self.stem(x))
        return self.head(h + self.block(h))


def residual():
    torch.manual_seed(0)
    return Residual()


residual.attrib_input = {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


class DictOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU())
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        features = self.features(x)
        return {"features": features, "logits": self.fc(features.mean((2, 3)))}


def dict_output():
    torch.manual_seed(1)
    return DictOutput()


dict_output.attrib_input = {"channels": 1, "size": 28, "mean": [0.5], "std": [0.5], "output": "logits"}


def one_channel_28():
    """Takes 1 x 28 x 28 and declares nothing (the command line must be told)."""
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 26 * 26, 3))


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        x.mul_(2.0)  # changes the caller's tensor
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def inplace_input():
    torch.manual_seed(3)
    return InPlace()


inplace_input.attrib_input = {"size": 16}


class Buggy(nn.Module):
    """Fine on one example; a bug (ValueError) on a batch, as a real bug would surface mid-run."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        if x.shape[0] > 1:
            raise ValueError("an internal bug in the user's model")
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def buggy():
    torch.manual_seed(4)
    return Buggy()


buggy.attrib_input = {"size": 16}


class SpareConv(nn.Module):
    """The last convolution registered never runs; the default layer is the last one that does."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)
        self.spare = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def spare_conv():
    torch.manual_seed(5)
    return SpareConv()


spare_conv.attrib_input = {"size": 16}


def mlp():
    torch.manual_seed(6)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 3))


mlp.attrib_input = {"size": 8}


class Picky(nn.Module):
    """Refuses a wrong input size with a ValueError, as many user models do."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 3)

    def forward(self, x):
        if x.shape[-1] != 8:
            raise ValueError(f"expected 8 x 8 pictures, got {tuple(x.shape)}")
        return self.fc(x.flatten(1))


def picky():
    return Picky()


def tiny_vit():
    """torchvision's VisionTransformer at 16 px (4 patches of 8): a custom model with attention."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8,
                                                 mlp_dim=16, num_classes=3)
    with torch.no_grad():  # torchvision starts the classifier and the class token at zero
        model.heads.head.weight.normal_(0, 0.5)
        model.class_token.normal_()
    return model


tiny_vit.attrib_input = {"size": 16}


def pl_small():
    """Piecewise linear (conv, ReLU, max pool, linear) with biases: the audit's exact rows and scorecard."""
    torch.manual_seed(6)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


pl_small.attrib_input = {"size": 8}


def sigmoid_small():
    """Not piecewise linear: the audit skips the exact rows, saying why."""
    torch.manual_seed(7)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Sigmoid(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))


sigmoid_small.attrib_input = {"size": 8}
