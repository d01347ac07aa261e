"""Prompt-to-Prompt word maps: which source token each target token takes its cross-attention map from.

Prompt-to-Prompt (Hertz et al. 2022), as FateZero uses it, edits the cross-attention maps of the
target prompt during the first steps of the edit:

    replace   the prompts have the same number of tokens (a word swap, "a cat" -> "a dog"): target
              token j takes the source's map of token j;
    refine    otherwise ("a cat" -> "a big cat"): the two token sequences are aligned (a longest
              common subsequence of the token ids); a target token aligned with a source token takes
              that token's map, a new token keeps its own;
    reweight  a target word's maps are multiplied by a scale (`WORD=SCALE`).

Positions index the text encoder's padded sequence (BOS, the prompt's tokens, EOS, padding up to
`tokenizer.model_max_length`, 77 for CLIP). Padding is aligned from each prompt's end: the k-th
padding token of the target takes the map of the k-th padding token of the source (Prompt-to-Prompt
pairs padding by absolute position, which can give a target padding token the map of a source word).

Words are matched as whole words, case-insensitively: in the text (`contains_word`, no tokenizer), and
in the tokens (`word_positions`: a run of tokens that starts a word and spells the word's tokens).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import StemError

WORD_MAPS = ("auto", "replace", "refine")
WORD_END = "</w>"  # CLIP's BPE marks the last token of every word


@dataclass(frozen=True)
class WordMap:
    """Where each target token's cross-attention map comes from (all tuples of length `length`)."""

    mode: str                        # "replace" or "refine"
    source_index: tuple[int, ...]    # the source position whose map target position j takes
    weight: tuple[float, ...]        # 1: take the source's map, 0: keep the target's own

    def tensors(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(length,) long source indices and (length,) float32 weights."""
        return (torch.tensor(self.source_index, dtype=torch.long, device=device),
                torch.tensor(self.weight, dtype=torch.float32, device=device))


def contains_word(text: str, word: str) -> bool:
    """Whether `word` occurs in `text` as a whole word (case-insensitive)."""
    return re.search(rf"(?<!\w){re.escape(word.lower())}(?!\w)", text.lower()) is not None


def prompt_tokens(tokenizer, prompt: str) -> list[int]:
    """The ids the text encoder reads of `prompt`: BOS, tokens, EOS, truncated as `encode_prompt` does."""
    return tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids


def word_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions (in the padded sequence) of every token of every whole-word occurrence of `word`."""
    ids = prompt_tokens(tokenizer, prompt)
    wanted = tokenizer(word, add_special_tokens=False).input_ids
    if not wanted:
        return []
    pieces = tokenizer.convert_ids_to_tokens(ids)
    body = range(1, len(ids) - 1)  # not BOS / EOS
    positions = []
    for start in body:
        starts_word = start == 1 or str(pieces[start - 1]).endswith(WORD_END)
        if starts_word and start + len(wanted) <= len(ids) - 1 and ids[start:start + len(wanted)] == wanted:
            positions.extend(range(start, start + len(wanted)))
    return positions


def align_tokens(source: Sequence[int], target: Sequence[int]) -> list[int | None]:
    """Align two token sequences: for each target token, the source position it matches, or None (new).

    A longest common subsequence of equal ids; among equally long ones, the one that matches the
    earliest target tokens, each to the earliest source token it can (Prompt-to-Prompt's global
    alignment with gap 0 and mismatch -1 never aligns unequal tokens either).
    """
    n, m = len(source), len(target)
    # suffix[i][j]: length of the longest common subsequence of source[i:] and target[j:]
    suffix = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            suffix[i][j] = (suffix[i + 1][j + 1] + 1 if source[i] == target[j]
                            else max(suffix[i + 1][j], suffix[i][j + 1]))
    aligned: list[int | None] = [None] * m
    i = j = 0
    while i < n and j < m:
        if source[i] == target[j] and suffix[i][j] == suffix[i + 1][j + 1] + 1:
            aligned[j] = i
            i, j = i + 1, j + 1
        elif suffix[i + 1][j] >= suffix[i][j + 1]:
            i += 1  # source token i is not in the target (deleted)
        else:
            j += 1  # target token j is new (inserted)
    return aligned


def word_map(tokenizer, source_prompt: str, target_prompt: str, mode: str = "auto") -> WordMap:
    """The word map of an edit from `source_prompt` to `target_prompt`.

    Args:
        tokenizer: the model's (CLIP) tokenizer.
        source_prompt, target_prompt: the two prompts.
        mode: "replace" (needs equal token counts), "refine", or "auto" (replace when the token counts
            are equal, refine otherwise).

    Returns:
        The map over the padded sequence of `tokenizer.model_max_length` positions.
    """
    length = tokenizer.model_max_length
    source, target = prompt_tokens(tokenizer, source_prompt), prompt_tokens(tokenizer, target_prompt)
    if mode not in WORD_MAPS:
        raise StemError(f"Unknown word map {mode!r}; choose one of: {', '.join(WORD_MAPS)}.")
    if mode == "replace" and len(source) != len(target):
        raise StemError(
            f"--word-map replace needs prompts of the same number of tokens, but the source prompt has "
            f"{len(source)} and the target prompt {len(target)}; use --word-map refine or auto.")
    if mode == "replace" or (mode == "auto" and len(source) == len(target)):
        return WordMap("replace", tuple(range(length)), (1.0,) * length)
    index, weight = [0] * length, [0.0] * length
    for j, i in enumerate(align_tokens(source, target)):
        if i is not None:
            index[j], weight[j] = i, 1.0
    for k in range(length - len(target)):  # padding, aligned from each prompt's end
        j, i = len(target) + k, len(source) + k
        if i < length:
            index[j], weight[j] = i, 1.0
    return WordMap("refine", tuple(index), tuple(weight))


def word_mask(tokenizer, prompt: str, words: Sequence[str], what: str) -> torch.Tensor:
    """(length,) float32: 1 at the tokens of `words` in `prompt`; refuses a word the encoder does not read."""
    mask = torch.zeros(tokenizer.model_max_length)
    for word in words:
        positions = word_positions(tokenizer, prompt, word)
        if not positions:
            raise StemError(f"The {what} word {word!r} is not among the tokens the text encoder reads of the prompt "
                            f"{prompt!r} (past its {tokenizer.model_max_length} tokens?); pick a word of the prompt.")
        mask[positions] = 1.0
    return mask


def reweight_scales(tokenizer, prompt: str, reweight: Sequence[tuple[str, float]]) -> torch.Tensor:
    """(length,) float32: each target token's cross-attention scale (1 but at the reweighted words)."""
    scales = torch.ones(tokenizer.model_max_length)
    for word, scale in reweight:
        scales[word_mask(tokenizer, prompt, [word], "reweighted") > 0] = float(scale)
    return scales
