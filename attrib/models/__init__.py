"""Models shipped with attrib (offline): the digits CNN."""
from .digits import (
    DigitsNet,
    load_digits_model,
    pixel_bounds,
    preprocess,
    sample_digits,
)

__all__ = ["DigitsNet", "load_digits_model", "pixel_bounds", "preprocess", "sample_digits"]
