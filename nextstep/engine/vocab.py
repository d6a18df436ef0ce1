"""A word-level tokenizer with NextStep's special tokens (the shapes world's, and the bench's random models').

Lower-cases, splits on whitespace and punctuation and writes digits one by one, so the
image-area text ``8*8`` reads as ``8``, ``*``, ``8``. Saved as standard tokenizer files that
``nextstep.engine.prompts.load_tokenizer`` reads.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .prompts import BEGIN_OF_IMAGE, END_OF_IMAGE, IMAGE_AREA, IMAGE_PLACEHOLDER

UNK, PAD = "[UNK]", "[PAD]"
# NextStep's own special tokens, in the official order; the last four are unused here but kept
# so that prompts written for the released models tokenize the same way.
SPECIAL_TOKENS = [
    IMAGE_AREA,
    BEGIN_OF_IMAGE,
    END_OF_IMAGE,
    IMAGE_PLACEHOLDER,
    "<|begin_of_prompt_refinement|>",
    "<|end_of_prompt_refinement|>",
    "<|begin_of_thinking|>",
    "<|end_of_thinking|>",
]
SYMBOLS = list("0123456789*,.")


def build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    vocab = {UNK: 0}
    for token in [*words, *SYMBOLS, PAD, *SPECIAL_TOKENS]:
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated"), pre_tokenizers.Digits(individual_digits=True)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=SPECIAL_TOKENS,
        padding_side="left",
        model_max_length=512,
    )

