"""Prompt-to-Prompt word maps: which source tokens each target token takes its cross-attention map from.

Prompt-to-Prompt (Hertz et al. 2022), as FateZero's code uses it (`seq_aligner.py`), edits the
cross-attention maps of the target prompt during the first steps of the edit:

    replace   the prompts have the same number of words, split on spaces ("a cat" -> "a dog"):
              FateZero's word-level mapper (`get_replacement_mapper_`). Target tokens take the source's
              map of the same token, shifted past each swapped word; a swapped word of as many tokens as
              its source word takes the source word's maps token by token, one of another number of
              tokens gives each of its tokens the sum of the source word's maps over the target word's
              token count ("fox" -> "shiba-inu": each of shiba, -, inu takes fox / 3). After the LAST
              swapped word FateZero maps by absolute position (target token j takes source token j), so
              when the swapped words change the token count, the tokens after them take the maps of
              other tokens ("a fox sitting" -> "a shiba-inu sitting": `sitting` gets the source's
              end-of-text map or padding). This is FateZero's behaviour and the default.
    refine    otherwise ("a cat" -> "a big cat"): the two token sequences are aligned by FateZero's
              global alignment (`align_tokens`); a target token aligned with a source token takes that
              token's map, a new token keeps its own;
    tokens    the project's earlier rule, kept as an option: replace token by token when the prompts
              have the same number of TOKENS, refine otherwise. It never hands a token the map of
              another position, so a swap that changes the token count ("fox" -> "shiba-inu") is aligned
              as a refine instead of shifting the rest of the prompt;
    reweight  a target word's maps are multiplied by a scale (`WORD=SCALE`).

Positions index the text encoder's padded sequence (BOS, the prompt's tokens, EOS, padding up to
`tokenizer.model_max_length`, 77 for CLIP). In a refine, padding is aligned from each prompt's end: the
k-th padding token of the target takes the map of the k-th padding token of the source (FateZero pairs
padding by absolute position, which can give a target padding token the map of a source word).

Words are matched as whole words, case-insensitively, ignoring punctuation: in the text
(`contains_word`, no tokenizer), and in the tokens (`word_positions`: a run of tokens that starts a word
and spells the word's tokens); FateZero matches a word only when it equals a space-separated piece
of the prompt exactly (it misses "monet" in "Claude Monet painting" and "bushes" in "bushes,").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import StemError
from ..settings import SettingError

WORD_MAP = {"word_map": "the word map"}  # how the errors name the setting (the CLI: --word-map)

WORD_MAPS = ("auto", "replace", "refine", "tokens")
WORD_END = "</w>"  # CLIP's BPE marks the last token of every word


@dataclass(frozen=True)
class WordMap:
    """Where each target token's cross-attention map comes from (all tuples of length `length`)."""

    mode: str                        # "replace" or "refine"
    columns: tuple[tuple[tuple[int, float], ...], ...]  # per target position j: (source position, coefficient) pairs
    weight: tuple[float, ...]        # 1: take the mapped source maps, 0: keep the target's own

    @property
    def source_index(self) -> tuple[int, ...]:
        """The (first) source position whose map each target position takes (0 where none)."""
        return tuple(column[0][0] if column else 0 for column in self.columns)

    def tensors(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(length, length) float32 mapper M (target j's map is sum_i M[i, j] source_i) and (length,) weights."""
        mapper = torch.zeros(len(self.columns), len(self.columns))
        for j, column in enumerate(self.columns):
            for i, coefficient in column:
                mapper[i, j] = coefficient
        return mapper.to(device), torch.tensor(self.weight, dtype=torch.float32, device=device)

    @classmethod
    def from_index(cls, mode: str, index, weight) -> "WordMap":
        """A map in which target position j takes source position index[j] whole."""
        return cls(mode, tuple(((int(i), 1.0),) for i in index), tuple(float(w) for w in weight))


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
    """Align two token sequences as FateZero's `seq_aligner` does: for each target token, the source
    position it matches, or None (new).

    A global alignment scored match +1, mismatch -1, gap 0 (so unequal tokens are never aligned and the
    aligned pairs form a longest common subsequence), traced back from the ends of both sequences
    preferring, where the score allows, first to leave the target token new, then to drop the source
    token, and only then to align the two. Among equally long alignments this aligns the earliest target
    tokens, and a repeated word to its earliest source occurrence: "a red car and a blue car" ->
    "a green car" takes `car` from source position 3, not 7.
    """
    n, m = len(source), len(target)
    # score[i][j]: the best score of source[:i] against target[:j] (gaps cost 0)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            diagonal = score[i - 1][j - 1] + (1 if source[i - 1] == target[j - 1] else -1)
            score[i][j] = max(score[i][j - 1], score[i - 1][j], diagonal)
    aligned: list[int | None] = [None] * m
    i, j = n, m
    while i > 0 and j > 0:
        if score[i][j] == score[i][j - 1]:
            j -= 1  # target token j - 1 is new (inserted)
        elif score[i][j] == score[i - 1][j]:
            i -= 1  # source token i - 1 is not in the target (deleted)
        else:
            i, j = i - 1, j - 1
            aligned[j] = i
    return aligned


def word_count(prompt: str) -> int:
    """The number of words as FateZero counts them: pieces of the prompt split on single spaces."""
    return len(prompt.split(" "))


def fatezero_word_tokens(tokenizer, prompt: str, word: int) -> list[int]:
    """FateZero's `get_word_inds(prompt, word, tokenizer)`: positions of the tokens of space-separated word
    number `word`, found by adding up the lengths of the decoded tokens against the words' lengths."""
    words = prompt.split(" ")
    pieces = [tokenizer.decode([token]).strip("#") for token in tokenizer.encode(prompt)][1:-1]
    positions, spelled, current = [], 0, 0
    for k, piece in enumerate(pieces):
        if current >= len(words):
            break  # FateZero would index past its words here
        spelled += len(piece)
        if current == word:
            positions.append(k + 1)
        if spelled >= len(words[current]):
            current, spelled = current + 1, 0
    return positions


def fatezero_replace_columns(tokenizer, source_prompt: str, target_prompt: str, length: int):
    """FateZero's word-level replace mapper (`get_replacement_mapper_`) as columns of a `WordMap`."""
    source_words, target_words = source_prompt.split(" "), target_prompt.split(" ")
    swapped = [k for k in range(len(target_words)) if target_words[k] != source_words[k]]
    source_inds = [fatezero_word_tokens(tokenizer, source_prompt, k) for k in swapped]
    target_inds = [fatezero_word_tokens(tokenizer, target_prompt, k) for k in swapped]
    for k, s, t in zip(swapped, source_inds, target_inds):
        if not s or not t or max(s + t) >= length:
            raise SettingError(
                "", f"{{word_map}} replace cannot map the swapped word {source_words[k]!r} -> {target_words[k]!r} "
                f"(no tokens, or past the encoder's {length} tokens); use {{word_map}} refine.", mentions=WORD_MAP)
    columns: list[dict[int, float]] = [{} for _ in range(length)]
    i = j = current = 0
    while i < length and j < length:
        if current < len(source_inds) and source_inds[current][0] == i:
            s, t = source_inds[current], target_inds[current]
            if len(s) == len(t):
                for a, b in zip(s, t):
                    columns[b][a] = 1.0
            else:
                for b in t:
                    for a in s:
                        columns[b][a] = 1 / len(t)
            current += 1
            i, j = i + len(s), j + len(t)
        elif current < len(source_inds):
            columns[j][i] = 1.0
            i, j = i + 1, j + 1
        else:
            columns[j][j] = 1.0  # after the last swapped word: by absolute position, as FateZero
            i, j = i + 1, j + 1
    return tuple(tuple(sorted(column.items())) for column in columns)


def word_map(tokenizer, source_prompt: str, target_prompt: str, mode: str = "auto") -> WordMap:
    """The word map of an edit from `source_prompt` to `target_prompt`.

    Args:
        tokenizer: the model's (CLIP) tokenizer.
        source_prompt, target_prompt: the two prompts.
        mode: "replace" (FateZero's word-level replace; needs equal word counts), "refine", "auto"
            (FateZero's choice: replace when the prompts have the same number of space-separated words,
            refine otherwise), or "tokens" (token-level replace when the token counts are equal, refine
            otherwise).

    Returns:
        The map over the padded sequence of `tokenizer.model_max_length` positions.
    """
    length = tokenizer.model_max_length
    if mode not in WORD_MAPS:
        raise StemError(f"Unknown word map {mode!r}; choose one of: {', '.join(WORD_MAPS)}.")
    source, target = prompt_tokens(tokenizer, source_prompt), prompt_tokens(tokenizer, target_prompt)
    same_words = word_count(source_prompt) == word_count(target_prompt)
    if mode == "replace" and not same_words:
        raise SettingError(
            "", f"{{word_map}} replace needs prompts of the same number of words, but the source prompt has "
            f"{word_count(source_prompt)} and the target prompt {word_count(target_prompt)}; use {{word_map}} refine "
            "or auto.", mentions=WORD_MAP)
    if mode == "replace" or (mode == "auto" and same_words):
        return WordMap(
            "replace", fatezero_replace_columns(tokenizer, source_prompt, target_prompt, length), (1.0,) * length
        )
    if mode == "tokens" and len(source) == len(target):
        return WordMap.from_index("replace", range(length), (1.0,) * length)
    index, weight = [0] * length, [0.0] * length
    for j, i in enumerate(align_tokens(source, target)):
        if i is not None:
            index[j], weight[j] = i, 1.0
    for k in range(length - len(target)):  # padding, aligned from each prompt's end
        j, i = len(target) + k, len(source) + k
        if i < length:
            index[j], weight[j] = i, 1.0
    return WordMap.from_index("refine", index, weight)


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
