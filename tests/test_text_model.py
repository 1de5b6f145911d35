"""The embedded sentence-sentiment CNN: the tokenizer and the encoding against hand-written expectations,
the input errors, the shipped weights (loaded without unpickling code) against the accuracies that the
training script recorded, and the forward pass (each module once, deterministic, rows independent)."""
import subprocess
import sys
from importlib import resources

import pytest
import torch

from attrib.errors import InputError, InputTypeError
from attrib.models import (
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

SMALL = Vocabulary(["<pad>", "<unk>", "the", "plot", "was", "not", "good", "n't", "."])


@pytest.mark.parametrize("sentence, tokens", [
    ("The plot wasn't GOOD -- at all!", ["the", "plot", "was", "n't", "good", "-", "-", "at", "all", "!"]),
    ("I can't believe it's not bad; won't you?",
     ["i", "can", "n't", "believe", "it", "'s", "not", "bad", ";", "will", "n't", "you", "?"]),
    ("We cannot say they\u2019re great.", ["we", "can", "not", "say", "they", "'re", "great", "."]),
    ("You shouldn't've missed the rock'n'roll", ["you", "should", "n't", "'ve", "missed", "the", "rock'n'roll"]),
    ("\u00dcber-cool, 10/10 film", ["\u00fcber", "-", "cool", ",", "10", "/", "10", "film"]),
    ("  ", []),
])
def test_tokenize_hand_written(sentence, tokens):
    assert tokenize(sentence) == tokens


def test_encode_unknown_word_is_id_1_and_reported_and_short_rows_are_padded_with_0():
    ids, unknown = SMALL.encode(["The plot was dreadful.", "not good", "The plot was not good at all."])
    assert ids.dtype == torch.int64
    assert ids.tolist() == [   # every row padded to the 64 slots the model always reads
        [2, 3, 4, 1, 8] + [0] * 59,
        [5, 6] + [0] * 62,
        [2, 3, 4, 5, 6, 1, 1, 8] + [0] * 56,
    ]
    assert unknown == [["dreadful"], [], ["at", "all"]]
    alone, _ = SMALL.encode("good")
    assert alone.tolist() == [[6] + [0] * 63]
    assert SMALL.decode(ids[0]) == ["the", "plot", "was", "<unk>", "."]


def test_errors_name_the_argument():
    with pytest.raises(InputError, match=r"sentences\[1\] is empty"):
        SMALL.encode(["good", "   "])
    with pytest.raises(InputError, match=rf"sentences\[0\] has {MAX_LENGTH + 1} tokens, more than max_length={MAX_LENGTH}"):
        SMALL.encode(["good " * (MAX_LENGTH + 1)])
    with pytest.raises(InputError, match=r"sentences\[0\] has 3 tokens, more than max_length=2"):
        SMALL.encode(["the plot was"], max_length=2)
    with pytest.raises(InputError, match=r"max_length must be 1 to 64, got 65"):
        SMALL.encode(["good"], max_length=65)
    with pytest.raises(InputTypeError, match=r"sentences\[0\] must be a str, got int"):
        SMALL.encode([3])  # type: ignore[list-item]
    with pytest.raises(InputError, match="sentences must be a str or a non-empty sequence"):
        SMALL.encode([])
    with pytest.raises(InputError, match="tokens must start with"):
        Vocabulary(["the", "<pad>", "<unk>"])


def test_shipped_weights_load_with_weights_only_and_match_the_record():
    record = training_record()
    state = torch.load(resources.files("attrib.models").joinpath("text.pt").open("rb"), weights_only=True)
    assert all(value.dtype == torch.float32 for value in state.values())
    assert sum(value.numel() for value in state.values()) == record["model"]["parameters"] == 204578
    vocabulary = load_vocabulary()
    assert len(vocabulary) == record["sizes"]["vocabulary"] == state["embedding.weight"].shape[0]
    assert vocabulary.tokens[:2] == ["<pad>", "<unk>"]
    assert float(state["embedding.weight"][0].abs().sum()) == 0.0   # the padding row stays 0
    assert len(resources.files("attrib.models").joinpath("text.pt").read_bytes()) < 1_000_000


def _accuracy(model, sentences, labels):
    ids, _ = load_vocabulary().encode(sentences)
    with torch.no_grad():
        return (model(ids).argmax(1) == labels).float()


def test_sample_accuracy_is_the_recorded_one_and_samples_need_no_unknown_word():
    sentences, labels = sample_sentences()
    right = _accuracy(load_text_model(), sentences, labels)
    assert round(float(right.mean()), 4) == training_record()["accuracy"]["samples"]
    assert len(sentences) == 10 and int(labels.sum()) == 5
    _, unknown = load_vocabulary().encode(sentences)
    assert sum(len(u) for u in unknown) == 0


def test_held_out_check_accuracy_is_recomputed_from_the_shipped_sentences():
    recorded = training_record()["accuracy"]["check"]
    sentences, labels, kinds, splits = check_sentences()
    right = _accuracy(load_text_model(), sentences, labels)
    assert (len(sentences), kinds.count("negated"), splits.count("by_word")) == (300, 120, 100)
    for split in ("template", "by_word"):
        mask = torch.tensor([s == split for s in splits])
        assert int(mask.sum()) == recorded[f"n_{split}"]
        assert round(float(right[mask].mean()), 4) == recorded[split]
    assert round(float(right.mean()), 4) == recorded["all"]
    # the negated held-out template sentences: the model learnt negation (the record says 0.99+)
    negated = torch.tensor([k == "negated" and s == "template" for k, s in zip(kinds, splits)])
    assert float(right[negated].mean()) >= 0.95


def test_eval_forward_is_deterministic_rows_independent_and_calls_each_module_once():
    model = load_text_model()
    ids, _ = load_vocabulary().encode(["The plot was not good at all.", "The movie was never dull, honestly."])
    calls: dict[str, int] = {}
    handles = [module.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
               for name, module in model.named_modules() if name]
    with torch.no_grad():
        first, second = model(ids), model(ids)
    for handle in handles:
        handle.remove()
    assert torch.equal(first, second)
    names = ["embedding", "convs.0", "convs.1", "convs.2", "relus.0", "relus.1", "relus.2", "pools.0", "pools.1", "pools.2",
             "flatten", "dropout", "fc"]
    assert {name: calls[name] for name in names} == dict.fromkeys(names, 2)   # once in each of the two passes
    with torch.no_grad():
        alone = model(ids[:1])
    torch.testing.assert_close(alone, first[:1], rtol=1e-6, atol=1e-6)
    probability = first.softmax(1)[:, 1]
    assert float(probability[0]) < 0.5 < float(probability[1])   # "not good" negative, "never dull" positive


def test_untrained_model_padding_row_is_zero_and_data_packages_are_not_imported():
    torch.manual_seed(0)
    model = TextCNN(10)
    assert float(model.embedding.weight.detach()[0].abs().sum()) == 0.0
    code = ("import sys, attrib, attrib.models; attrib.models.load_text_model(); "
            "print(sorted(m for m in ('scattertext', 'vaderSentiment', 'captum', 'zennit') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
