"""FateZero as FateZero's code does it (ChenyangQiQi/FateZero at 9b6cb7b), checked against independent
re-derivations of its rules written here, naive and in float64:

- the step counts of `ptp_utils.get_time_words_attention_alpha` (cross-attention, per word) and of
  `AttentionControlEdit.num_self_replace` (self-attention);
- the replace-or-refine choice of `p2p_ddim_spatial_temporal.p2preplace_edit` (word counts);
- the word-level replace mapper of `seq_aligner.get_replacement_mapper_` and its `get_word_inds`;
- the refine alignment of `seq_aligner.global_align` / `get_aligned_sequences`;
- where the source's maps and the latent blend's source latents come from (`attention_util.py`).

The word maps run on FateZero's own example prompt pairs (its `config/` folder) and on random pairs.
"""

import random

import numpy as np
import pytest
import torch

from stem.editing.fatezero import FateZeroSettings, cross_replace_steps, self_replace_steps


# -- step counts ------------------------------------------------------------------------------------

def reference_cross_steps(fraction: float, num_steps: int) -> int:
    """get_time_words_attention_alpha: rows [int(0 * (T+1)), int(f * (T+1))) of a (T+1)-row table are 1;
    step cur_step = 0 .. T-1 reads row cur_step. Counted row by row."""
    rows = np.zeros(num_steps + 1, dtype=np.float64)
    start, end = int(0.0 * rows.shape[0]), int(fraction * rows.shape[0])
    rows[start:end] = 1
    return int(sum(rows[cur_step] for cur_step in range(num_steps)))


def reference_self_steps(fraction: float, num_steps: int) -> int:
    """AttentionControlEdit: num_self_replace = int(T * 0), int(T * f); step cur_step fuses when inside."""
    low, high = int(num_steps * 0.0), int(num_steps * fraction)
    return sum(1 for cur_step in range(num_steps) if low <= cur_step < high)


FRACTIONS = [round(0.05 * k, 2) for k in range(21)] + [0.58, 0.57, 0.29, 0.33, 0.66, 0.67, 0.7, 0.9, 0.99, 0.01]
STEP_COUNTS = [1, 2, 3, 4, 5, 7, 10, 20, 25, 49, 50, 51, 100, 200, 1000]


@pytest.mark.parametrize("num_steps", STEP_COUNTS)
def test_step_counts_are_fatezeros(num_steps):
    for f in FRACTIONS:
        assert cross_replace_steps(f, num_steps) == reference_cross_steps(f, num_steps), (f, num_steps)
        assert self_replace_steps(f, num_steps) == reference_self_steps(f, num_steps), (f, num_steps)
        edit = FateZeroSettings("a dog", source_prompt="a cat", self_replace=f, cross_replace=f)
        assert edit.num_fused_steps(num_steps) == (reference_self_steps(f, num_steps), reference_cross_steps(f, num_steps))


def test_step_counts_at_the_known_edges():
    assert cross_replace_steps(0.75, 50) == 38        # int(0.75 * 51) = 38, not floor(0.75 * 50) = 37
    assert self_replace_steps(0.58, 50) == 28         # 50 * 0.58 = 28.999999999999996
    assert cross_replace_steps(1.0, 50) == 50 and self_replace_steps(1.0, 50) == 50
    assert cross_replace_steps(0.0, 50) == 0 and self_replace_steps(0.0, 50) == 0
