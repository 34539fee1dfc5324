import pytest
from pydantic import ValidationError

from hf_modelopt.distill.augment import AugmentationConfig, augmented_sentences

SENTENCES = ["a stirring , funny and finally transporting re-imagining of beauty and the beast .",
             "apparently reassembled from the cutting-room floor of any given daytime soap .",
             "a dull , lifeless mess ."]


def _is_perturbation_of(copy: list[str], words: list[str], mask: str) -> bool:
    """`copy` is a run of consecutive words of `words`, some of them replaced by `mask`."""
    return any(all(c in (w, mask) for c, w in zip(copy, words[start:start + len(copy)]))
               for start in range(len(words) - len(copy) + 1))


def test_copies_are_ngrams_or_sentences_with_masked_words():
    config = AugmentationConfig(copies=20, ngram_probability=0.5, max_ngram=3, mask_probability=0.3)
    copies = augmented_sentences(SENTENCES, config, "[MASK]")
    assert 0 < len(copies) <= 20 * len(SENTENCES)
    assert len(set(copies)) == len(copies) and not set(copies) & set(SENTENCES)
    lengths = {len(copy.split()) for copy in copies}
    assert min(lengths) <= 3 < max(lengths)  # short n-grams and whole sentences (masked) both occur
    assert any("[MASK]" in copy for copy in copies)
    for copy in copies:
        words = copy.split()
        assert len(words) <= 3 or len(words) in {len(s.split()) for s in SENTENCES}
        assert any(_is_perturbation_of(words, s.split(), "[MASK]") for s in SENTENCES), copy


def test_copies_are_the_same_for_the_same_seed_and_differ_for_another():
    config = AugmentationConfig(copies=5)
    first = augmented_sentences(SENTENCES, config, "[MASK]")
    assert augmented_sentences(SENTENCES, config, "[MASK]") == first  # every process builds the same set
    assert augmented_sentences(SENTENCES, config.model_copy(update={"seed": 1}), "[MASK]") != first


def test_without_a_mask_token_masked_words_are_dropped():
    config = AugmentationConfig(copies=10, ngram_probability=0.0, mask_probability=0.5)
    copies = augmented_sentences(SENTENCES, config, None)
    assert copies and all("[MASK]" not in copy for copy in copies)
    assert all(len(copy.split()) < max(len(s.split()) for s in SENTENCES) for copy in copies)
    nothing_left = AugmentationConfig(copies=3, ngram_probability=0.0, mask_probability=1.0)
    assert augmented_sentences(SENTENCES, nothing_left, None) == []  # empty copies are not added


def test_bad_settings_name_the_field():
    with pytest.raises(ValidationError, match="copies"):
        AugmentationConfig(copies=0)
    with pytest.raises(ValidationError, match="mask_probability"):
        AugmentationConfig(copies=1, mask_probability=1.5)
    with pytest.raises(ValidationError, match="unknown"):
        AugmentationConfig(copies=1, unknown=2)
