"""Prompt rows for the guidance branches, image slots, and the token ids the backbone reads.

Layout of one row: ``text [+ " " + positive]`` with any ``<image>`` replaced by
``<|image_area|>h*w<|begin_of_image|>`` + one ``<|image_placeholder|>`` per token +
``<|end_of_image|>``; rows are left-padded, then every row gets ``<|image_area|>h*w`` for the
picture to generate and ``<|begin_of_image|>``.

BOS: rows are tokenized with the tokenizer's own special tokens (NextStep-1). With
``bos_as_text`` (NextStep-1.1) the tokenizer's BOS token, if it defines one, is also written
in front of every row as text, as that reference does. Both references then drop the first id
of the ``<|image_area|>h*w`` prefix on the assumption that the tokenizer added a BOS there; a
tokenizer that defines a BOS without adding it would lose ``<|image_area|>`` that way, so we
tokenize the prefix without special tokens instead (the same ids whenever the reference works).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

IMAGE_SLOT = "<image>"
IMAGE_AREA = "<|image_area|>"
BEGIN_OF_IMAGE = "<|begin_of_image|>"
END_OF_IMAGE = "<|end_of_image|>"
IMAGE_PLACEHOLDER = "<|image_placeholder|>"
# Where an edit prompt without an ``<image>`` slot takes the input image.
IMAGE_SLOT_PLACES = ("before", "after")


def check_image_slot_place(place: str) -> str:
    if place not in IMAGE_SLOT_PLACES:
        raise ValueError(f"the image slot's place must be one of {', '.join(IMAGE_SLOT_PLACES)}, got {place!r}")
    return place


def with_image_slot(prompt: str, place: str) -> str:
    """``prompt`` with an ``<image>`` slot added before or after its text (``place``), unless it
    already has one. The official edit examples put the image before the instruction."""
    check_image_slot_place(place)
    if IMAGE_SLOT in prompt:
        return prompt
    return IMAGE_SLOT + prompt if place == "before" else prompt + IMAGE_SLOT


def load_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(directory), padding_side="left")
    if tokenizer.pad_token_id is None:
        raise ValueError(f"the tokenizer in {directory} defines no padding token")
    return tokenizer


def guidance_branches(cfg: float, cfg_img: float, has_image: bool) -> int:
    """How many rows each image needs in the backbone batch.

    1: the prompt alone. 2: prompt and negative prompt (text guidance). 3: prompt, image +
    negative prompt, negative prompt alone (image and text guidance). ``cfg == 1`` with
    ``cfg_img != 1`` still takes three rows: the guidance formula is well defined there.
    """
    if has_image and cfg_img != 1.0:
        return 3
    if cfg != 1.0:
        return 2
    return 1


@dataclass
class PromptBatch:
    input_ids: torch.Tensor  # (rows, L) int64, left padded, generation prefix included
    attention_mask: torch.Tensor  # (rows, L) int64
    images_needed: int  # how many encoded copies of the input image the rows' slots take


class PromptBuilder:
    def __init__(self, tokenizer: PreTrainedTokenizerFast, boi: int, bos_as_text: bool = False):
        self.tokenizer = tokenizer
        self.boi = boi
        self.bos_text = tokenizer.bos_token if bos_as_text and tokenizer.bos_token is not None else ""

    @staticmethod
    def image_text(grid: tuple[int, int]) -> str:
        h, w = grid
        return f"{IMAGE_AREA}{h}*{w}{BEGIN_OF_IMAGE}" + IMAGE_PLACEHOLDER * (h * w) + END_OF_IMAGE

    def rows(
        self,
        prompt: str,
        negative_prompt: str | None,
        positive_prompt: str | None,
        num_images: int,
        branches: int,
        image_grid: tuple[int, int] | None,
    ) -> list[str]:
        """Row texts, branch-major: ``num_images`` rows per branch, in guidance order."""
        caption = prompt + (" " + positive_prompt if positive_prompt else "")
        negative = negative_prompt or ""
        if image_grid is not None:
            caption = caption.replace(IMAGE_SLOT, self.image_text(image_grid), 1)
        groups = [caption]
        if branches == 3:
            groups += [self.image_text(image_grid) + negative, negative]
        elif branches == 2:
            groups += [negative]
        return [text for text in groups for _ in range(num_images)]

    def encode(self, rows: list[str], grid: tuple[int, int]) -> PromptBatch:
        """Tokenize rows (left padded) and append the prefix for an image of ``grid`` tokens."""
        batch = self.tokenizer([self.bos_text + row for row in rows], padding="longest", return_tensors="pt")
        h, w = grid
        prefix = self.tokenizer(f"{IMAGE_AREA}{h}*{w}", add_special_tokens=False)["input_ids"] + [self.boi]
        prefix = torch.tensor(prefix, dtype=torch.long).expand(len(rows), -1)
        input_ids = torch.cat([batch["input_ids"], prefix], dim=1)
        attention_mask = torch.cat([batch["attention_mask"], torch.ones_like(prefix)], dim=1)
        images_needed = sum(IMAGE_PLACEHOLDER in row for row in rows)
        return PromptBatch(input_ids, attention_mask, images_needed)
