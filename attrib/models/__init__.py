"""Models shipped with attrib (offline): the digits CNN, a tiny ViT on the same digits and the sentence-sentiment CNN."""
from .digits import (
    DigitsDataset,
    DigitsNet,
    load_digits_model,
    pixel_bounds,
    preprocess,
    sample_digits,
)
from .digits_vit import digits_vit_record, load_digits_vit, make_digits_vit
from .text import (
    MAX_LENGTH,
    TextCNN,
    Vocabulary,
    check_sentences,
    load_text_model,
    load_vocabulary,
    sample_sentences,
    tokenize,
    training_record,
)

__all__ = [
    "MAX_LENGTH",
    "DigitsDataset",
    "DigitsNet",
    "TextCNN",
    "Vocabulary",
    "check_sentences",
    "digits_vit_record",
    "load_digits_model",
    "load_digits_vit",
    "load_text_model",
    "load_vocabulary",
    "make_digits_vit",
    "pixel_bounds",
    "preprocess",
    "sample_digits",
    "sample_sentences",
    "tokenize",
    "training_record",
]
