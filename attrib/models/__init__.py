"""Models shipped with attrib (offline): the digits CNN and the sentence-sentiment CNN."""
from .digits import (
    DigitsNet,
    load_digits_model,
    pixel_bounds,
    preprocess,
    sample_digits,
)
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
    "DigitsNet",
    "TextCNN",
    "Vocabulary",
    "check_sentences",
    "load_digits_model",
    "load_text_model",
    "load_vocabulary",
    "pixel_bounds",
    "preprocess",
    "sample_digits",
    "sample_sentences",
    "tokenize",
    "training_record",
]
