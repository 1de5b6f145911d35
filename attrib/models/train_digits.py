"""Reproduce the embedded digits model: ``python -m attrib.models.train_digits [--out DIR]``.

Needs scikit-learn (the ``dev`` extra) for ``load_digits``. Deterministic on CPU: fixed seeds, one
thread, a stratified 75/25 split (random_state 0). Prints the held-out accuracy and writes
``digits.pt`` (state dict), ``digits_samples.pt`` (one held-out digit per class) and the
normalisation constants to put in ``digits.py``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from .digits import SIZE, DigitsNet, digits_split


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent))
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    images, labels, train_idx, test_idx = digits_split()

    def upscale(raw):
        return F.interpolate(raw.unsqueeze(1) / 16.0, size=(SIZE, SIZE), mode="bilinear", align_corners=False)

    train_x = upscale(images[train_idx])
    mean, std = float(train_x.mean()), float(train_x.std())
    train_x = (train_x - mean) / std
    test_x = (upscale(images[test_idx]) - mean) / std
    train_y, test_y = labels[train_idx], labels[test_idx]

    model = DigitsNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_y), generator=generator)
        for start in range(0, len(order), 64):
            batch = order[start:start + 64]
            # small random shifts (up to 2 px) make the net rely on shape, not position
            shift = torch.randint(-2, 3, (2,), generator=generator).tolist()
            inputs = torch.roll(train_x[batch], shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(inputs), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracy = float((model(test_x).argmax(1) == test_y).float().mean())
        print(f"epoch {epoch + 1}: loss {float(loss.detach()):.4f}, held-out accuracy {accuracy:.4f}")
    out = Path(args.out)
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, out / "digits.pt")
    picks = [int(test_idx[(test_y == digit).nonzero()[0, 0]]) for digit in range(10)]
    torch.save({"images": images[picks].to(torch.uint8), "labels": labels[picks]}, out / "digits_samples.pt")
    print(f"held-out accuracy {accuracy:.4f} on {len(test_y)} digits; MEAN, STD = {mean:.4f}, {std:.4f}")


if __name__ == "__main__":
    main()
