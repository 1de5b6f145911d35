"""Reproduce the embedded tiny ViT: ``python -m attrib.models.train_digits_vit [--out DIR]``.

Needs scikit-learn (the ``dev`` extra) for ``load_digits``. The same stratified 75/25 split as
``train_digits`` (random_state 0), so the held-out digits and ``sample_digits`` are the CNN's, and the
same preprocessing (``attrib.models.preprocess``). Deterministic on CPU: fixed seeds, one thread.
Training: AdamW with a linear warm-up then a cosine decay, label smoothing, and each digit shifted
at random by up to 2 px (the border filled with the blank grey level). Fixed epochs, no early stopping:
the held-out split is only measured. Writes ``digits_vit.pt`` (float32 state dict) and
``digits_vit_training.json`` (held-out accuracy, settings, seconds, threads, parameters, versions).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor

from .digits import digits_split, pixel_bounds, preprocess, sample_digits
from .digits_vit import HEADS, HIDDEN, LAYERS, MLP, PATCH, RECORD, WEIGHTS, make_digits_vit

THREADS = 1
BATCH, LR, WEIGHT_DECAY, WARMUP, SMOOTHING, SHIFT = 64, 2e-3, 0.05, 5, 0.1, 2


def shifted(images: Tensor, generator: torch.Generator) -> Tensor:
    """Each image moved by its own random (dy, dx) in -SHIFT..SHIFT; the uncovered border is blank."""
    blank = pixel_bounds()[0]
    size = images.shape[-1]
    padded = F.pad(images, (SHIFT,) * 4, value=blank)
    offsets = torch.randint(0, 2 * SHIFT + 1, (len(images), 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy:dy + size, dx:dx + size] for i, (dy, dx) in enumerate(offsets)])


def accuracy(model: torch.nn.Module, inputs: Tensor, labels: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(inputs).argmax(1) == labels).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent))
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    started = time.perf_counter()
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    images, labels, train_idx, test_idx = digits_split()
    train_x, test_x = preprocess(images[train_idx]), preprocess(images[test_idx])
    train_y, test_y = labels[train_idx], labels[test_idx]

    model = make_digits_vit()
    # no weight decay on biases, LayerNorm weights, the class token and the position embedding
    named = list(model.named_parameters())
    decay = [p for name, p in named if p.dim() >= 2 and name not in ("class_token", "encoder.pos_embedding")]
    rest = [p for name, p in named if p.dim() < 2 or name in ("class_token", "encoder.pos_embedding")]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}],
                                  lr=LR)
    steps_per_epoch = math.ceil(len(train_y) / BATCH)
    total, warmup = args.epochs * steps_per_epoch, WARMUP * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator().manual_seed(0)
    held_out = 0.0
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_y), generator=generator)
        for start in range(0, len(order), BATCH):
            batch = order[start:start + BATCH]
            loss = F.cross_entropy(model(shifted(train_x[batch], generator)), train_y[batch], label_smoothing=SMOOTHING)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        if (epoch + 1) % 10 == 0 or epoch + 1 == args.epochs:
            held_out = accuracy(model, test_x, test_y)
            print(f"epoch {epoch + 1}: loss {float(loss.detach()):.4f}, held-out accuracy {held_out:.4f}", flush=True)
    seconds = time.perf_counter() - started

    sample_images, sample_labels = sample_digits()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    out = Path(args.out)
    torch.save(state, out / WEIGHTS)
    record = {
        "data": "sklearn.datasets.load_digits, stratified 75/25 split (random_state 0), attrib.models.preprocess",
        "model": {"class": "torchvision.models.VisionTransformer", "image_size": 32, "patch_size": PATCH, "num_layers": LAYERS,
                  "num_heads": HEADS, "hidden_dim": HIDDEN, "mlp_dim": MLP, "conv_proj": "Conv2d(1, 64, 4, stride=4)",
                  "parameters": sum(v.numel() for v in state.values())},
        "training": {"epochs": args.epochs, "batch": BATCH, "optimizer": "AdamW", "lr": LR, "weight_decay": WEIGHT_DECAY,
                     "schedule": f"linear warm-up {WARMUP} epochs, cosine to 0", "label_smoothing": SMOOTHING,
                     "shift_px": SHIFT, "seconds": round(seconds, 1), "threads": THREADS,
                     "torch": torch.__version__, "torchvision": torchvision.__version__},
        "accuracy": {"held_out": round(held_out, 4), "n_held_out": len(test_y), "train": round(accuracy(model, train_x, train_y), 4),
                     "samples": round(accuracy(model, preprocess(sample_images), sample_labels), 4)},
    }
    (out / RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(record["accuracy"]), f"{seconds:.1f} s")


if __name__ == "__main__":
    main()
