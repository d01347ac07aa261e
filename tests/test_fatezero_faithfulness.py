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
        assert edit.num_fused_steps(num_steps) == (
            reference_self_steps(f, num_steps),
            reference_cross_steps(f, num_steps),
        )


def test_step_counts_at_the_known_edges():
    assert cross_replace_steps(0.75, 50) == 38        # int(0.75 * 51) = 38, not floor(0.75 * 50) = 37
    assert self_replace_steps(0.58, 50) == 28         # 50 * 0.58 = 28.999999999999996
    assert cross_replace_steps(1.0, 50) == 50 and self_replace_steps(1.0, 50) == 50
    assert cross_replace_steps(0.0, 50) == 0 and self_replace_steps(0.0, 50) == 0


# -- word maps: FateZero's seq_aligner, re-derived naively ------------------------------------------

# FateZero's example edits (source prompt, target prompt), from its config/ folder at 9b6cb7b.
FATEZERO_PAIRS = [
    ("A black cat walking on the floor next to a wall", "A black cat walking on the grass next to a wall"),
    ("A black cat walking on the floor next to a wall", "A red tiger walking on the floor next to a wall"),
    ("A black cat walking on the floor next to a wall", "a yellow cute Shiba-Inu walking on the floor next to a wall"),
    ("A black cat walking on the floor next to a wall", "a yellow cute leopard walking on the floor next to a wall"),
    ("A gray dog sitting on the mat", "A robotic dog sitting on the mat"),
    ("A gray dog sitting on the mat", "A yellow corgi sitting on the mat"),
    (
        "A man rides a wooden skateboard on the rail with a helmet and arms outstretched",
        "A Batman rides a wooden skateboard on the rail and arms outstretched",
    ),
    (
        "A man rides a wooden skateboard on the rail with a helmet and arms outstretched",
        "A Spider-Man  rides a wooden skateboard on the rail and arms outstretched",
    ),
    (
        "A man rides a wooden skateboard on the rail with a helmet and arms outstretched",
        "A Wonder Woman rides a wooden skateboard on the rail with cowboy hat and arms outstretched",
    ),
    ("A rabbit is eating a watermelon", "pokemon cartoon of A rabbit is eating a watermelon"),
    ("A rabbit is eating strawberries", "A white rabbit is eating flower"),
    ("A rabbit is eating strawberries", "A white rabbit is eating leaves"),
    ("A rabbit is eating strawberries", "A white rabbit is eating orange"),
    ("A squirrel is eating a carrot", "A rabbit is eating a eggplant"),
    ("A squirrel is eating a carrot", "A robot mouse is eating a screwdriver"),
    ("A squirrel is eating a carrot", "A robot squirrel is eating a carrot"),
    ("A squirrel is eating a carrot", "A white mouse is eating a peanut"),
    (
        "a black swan with a red beak swimming in a river near a wall and bushes",
        "a Swarovski crystal swan with a red beak swimming in a river near a wall and bushes",
    ),
    (
        "a black swan with a red beak swimming in a river near a wall and bushes",
        "a pink flamingo with a red beak swimming in a river near a wall and bushes",
    ),
    (
        "a black swan with a red beak swimming in a river near a wall and bushes",
        "a white duck with a yellow beak swimming in a river near a wall and bushes",
    ),
    (
        "a black swan with a red beak swimming in a river near a wall and bushes",
        "cartoon photo of a black swan with a red beak swimming in a river near a wall and bushes",
    ),
    ("a brown bear walking on the rock against a wall", "a brown lion walking on the rock against a wall"),
    ("a brown bear walking on the rock against a wall", "a red tiger walking on the rock against a wall"),
    ("a brown bear walking on the rock against a wall", "a yellow leopard walking on the rock against a wall"),
    (
        "a man with round helmet surfing on a white wave in blue ocean with a rope",
        "The Ukiyo-e style painting of a man with round helmet surfing on a white wave in blue ocean with a rope",
    ),
    ("a pink water lily", "Claude Monet painting of a pink water lily"),
    (
        "a silver jeep driving down a curvy road in the countryside",
        "a Porsche car driving down a curvy road in the countryside",
    ),
    (
        "a silver jeep driving down a curvy road in the countryside",
        "watercolor painting of a silver jeep driving down a curvy road in the countryside",
    ),
    ("a sleepy white duck", "a sleepy yellow rubber duck"),
    ("a white and blue bus on the road", "a black and green GPU on the road"),
    ("a white fox sitting in the grass", "a grey wolf sitting in the grass"),
    ("a white fox sitting in the grass", "a white fox sitting in the snow"),
    ("a yellow sunflower", "van gogh style painting of a yellow sunflower"),
]

WORDS = ["a", "cat", "dog", "red", "car", "and", "blue", "the", "shiba-inu", "on", "grass", "fox", "wolf", "sat"]


def random_pairs(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """Random prompts and edits of them: word swaps (same word count), insertions and deletions."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        source = [rng.choice(WORDS) for _ in range(rng.randint(1, 7))]
        target = list(source)
        for _ in range(rng.randint(1, 3)):
            kind, k = rng.choice(("swap", "swap", "insert", "delete")), rng.randrange(len(target))
            if kind == "swap":
                target[k] = rng.choice(WORDS)
            elif kind == "insert":
                target.insert(k, rng.choice(WORDS))
            elif len(target) > 1:
                del target[k]
        pairs.append((" ".join(source), " ".join(target)))
    return pairs


def reference_is_replace(source_prompt: str, prompt: str) -> bool:
    """p2preplace_edit: is_replace_controller (True unless the config says otherwise) and equal word counts."""
    return len(source_prompt.split(" ")) == len(prompt.split(" "))


def reference_word_inds(text: str, place: int, tokenizer) -> list[int]:
    """seq_aligner.get_word_inds for an int word place, line by line."""
    split_text = text.split(" ")
    words_encode = [tokenizer.decode([item]).strip("#") for item in tokenizer.encode(text)][1:-1]
    out, cur_len, ptr = [], 0, 0
    for i in range(len(words_encode)):
        cur_len += len(words_encode[i])
        if ptr == place:
            out.append(i + 1)
        if cur_len >= len(split_text[ptr]):
            ptr += 1
            cur_len = 0
    return out


def reference_replacement_mapper(x: str, y: str, tokenizer, max_len: int = 77) -> np.ndarray:
    """seq_aligner.get_replacement_mapper_: (max_len, max_len) float64, target j's map = sum_i M[i, j] source_i."""
    words_x, words_y = x.split(" "), y.split(" ")
    inds_replace = [i for i in range(len(words_y)) if words_y[i] != words_x[i]]
    inds_source = [reference_word_inds(x, i, tokenizer) for i in inds_replace]
    inds_target = [reference_word_inds(y, i, tokenizer) for i in inds_replace]
    mapper = np.zeros((max_len, max_len), dtype=np.float64)
    i = j = cur = 0
    while i < max_len and j < max_len:
        if cur < len(inds_source) and inds_source[cur][0] == i:
            s, t = inds_source[cur], inds_target[cur]
            if len(s) == len(t):
                for a, b in zip(s, t):
                    mapper[a, b] = 1
            else:
                for b in t:
                    for a in s:
                        mapper[a, b] = 1 / len(t)
            cur += 1
            i += len(s)
            j += len(t)
        elif cur < len(inds_source):
            mapper[i, j] = 1
            i += 1
            j += 1
        else:
            mapper[j, j] = 1
            i += 1
            j += 1
    return mapper


def reference_alignment(x: list[int], y: list[int]) -> list[int]:
    """seq_aligner.global_align (gap 0, match 1, mismatch -1) and get_aligned_sequences' traceback:
    for each y token, the x position it is aligned with, or -1."""
    n, m = len(x), len(y)
    matrix = np.zeros((n + 1, m + 1), dtype=np.float64)
    trace = np.zeros((n + 1, m + 1), dtype=np.int64)
    trace[0, 1:], trace[1:, 0], trace[0, 0] = 1, 2, 4
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left, up = matrix[i, j - 1], matrix[i - 1, j]
            diag = matrix[i - 1, j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            matrix[i, j] = max(left, up, diag)
            trace[i, j] = 1 if matrix[i, j] == left else 2 if matrix[i, j] == up else 3
    i, j, pairs = n, m, []
    while i > 0 or j > 0:
        if trace[i, j] == 3:
            i, j = i - 1, j - 1
            pairs.append((j, i))
        elif trace[i, j] == 1:
            j -= 1
            pairs.append((j, -1))
        elif trace[i, j] == 2:
            i -= 1
        else:
            break
    pairs.reverse()
    assert [p[0] for p in pairs] == list(range(m))
    return [p[1] for p in pairs]


def project_mapper(mapping) -> np.ndarray:
    mapper, weight = mapping.tensors()
    return mapper.double().numpy(), weight.double().numpy()


@pytest.fixture
def tokenizer(tiny_parts):
    return tiny_parts.tokenizer


@pytest.mark.parametrize("pairs", ["fatezero", "random"])
def test_auto_chooses_replace_by_word_count_and_replace_is_fatezeros_mapper(tokenizer, pairs):
    from stem.editing.wordmap import word_map

    cases = FATEZERO_PAIRS if pairs == "fatezero" else random_pairs(300)
    replaced = 0
    for source_prompt, prompt in cases:
        mapping = word_map(tokenizer, source_prompt, prompt, "auto")
        assert mapping.mode == ("replace" if reference_is_replace(source_prompt, prompt) else "refine"), (
            source_prompt,
            prompt,
        )
        if mapping.mode == "replace":
            replaced += 1
            mapper, weight = project_mapper(mapping)
            reference = reference_replacement_mapper(source_prompt, prompt, tokenizer)
            np.testing.assert_allclose(mapper, reference, rtol=0, atol=1e-7, err_msg=f"{source_prompt!r} -> {prompt!r}")
            assert (weight == 1).all()
    assert replaced >= (10 if pairs == "fatezero" else 100)  # both kinds are exercised


def test_fatezeros_replace_shifts_the_tokens_after_a_longer_word(tokenizer):
    # FateZero's word replace past the last swapped word maps by absolute position: with "fox" -> "shiba-inu"
    # (3 -> 9 letter tokens here) the tokens of "sitting" take the maps of later source positions
    from stem.editing.wordmap import word_map

    source_prompt, prompt = "a white fox sitting", "a white shiba-inu sitting"
    reference = reference_replacement_mapper(source_prompt, prompt, tokenizer)
    mapper, _ = project_mapper(word_map(tokenizer, source_prompt, prompt))
    np.testing.assert_allclose(mapper, reference, rtol=0, atol=1e-7)
    sitting = reference_word_inds(prompt, 3, tokenizer)
    source_eos = len(tokenizer.encode(source_prompt)) - 1
    assert [int(np.argmax(reference[:, j])) for j in sitting] == sitting  # by absolute position
    assert any(j >= source_eos for j in sitting)  # ... up to the source's EOS and padding


@pytest.mark.parametrize("pairs", ["fatezero", "random"])
def test_refine_alignment_is_fatezeros(tokenizer, pairs):
    from stem.editing.wordmap import word_map

    cases = FATEZERO_PAIRS if pairs == "fatezero" else random_pairs(300, seed=1)
    for source_prompt, prompt in cases:
        x, y = tokenizer.encode(source_prompt), tokenizer.encode(prompt)
        if max(len(x), len(y)) > tokenizer.model_max_length:
            continue  # past what the text encoder reads (this tokenizer spells words letter by letter)
        mapping = word_map(tokenizer, source_prompt, prompt, "refine")
        reference = reference_alignment(x, y)
        index, weight = mapping.source_index, mapping.weight
        for j, i in enumerate(reference):
            assert weight[j] == (0.0 if i < 0 else 1.0), (source_prompt, prompt, j)
            if i >= 0:
                assert index[j] == i, (source_prompt, prompt, j)


def test_token_alignment_tie_break_is_fatezeros_on_random_sequences():
    from stem.editing.wordmap import align_tokens

    rng = random.Random(2)
    for _ in range(2000):
        x = [rng.randrange(5) for _ in range(rng.randint(0, 10))]
        y = [rng.randrange(5) for _ in range(rng.randint(0, 10))]
        reference = reference_alignment(x, y)
        assert align_tokens(x, y) == [None if i < 0 else i for i in reference], (x, y)
    # "a red car and a blue car" -> "a green car" (one token a word): car from source position 3, not 7
    source = ["<bos>", "a", "red", "car", "and", "a", "blue", "car", "<eos>"]
    target = ["<bos>", "a", "green", "car", "<eos>"]
    assert reference_alignment(source, target)[3] == 3
    assert align_tokens(source, target) == [0, 1, None, 3, 8]


# -- where the source's maps and the blend's source latents come from -------------------------------

def reference_source_map_step(cur_step: int, num_steps: int) -> tuple[int, int]:
    """(trajectory level, index into the ascending timesteps) of the UNet call whose maps FateZero fuses at
    edit step cur_step (0 .. T-1, timestep timesteps[T-1-cur_step]).

    ddim_clean2noisy_loop: inversion step k runs the UNet on latent x_k at timesteps[k] and its
    AttentionStore appends those maps as attention_store_all_step[k]. AttentionControlEdit.forward with
    use_inversion_attention reads attention_store_all_step[T - cur_step - 1]."""
    k = num_steps - cur_step - 1
    return k, k


def reference_blend_source_level(cur_step: int, num_steps: int) -> int:
    """The trajectory level of the source latents FateZero's LocalBlend mixes into the edit after step cur_step.

    The inversion's step_callback appends x_(k+1) as latents_store[k]; the edit's step_callback first
    increments cur_step, then reads latents_store[len(latents_store) - cur_step]."""
    latents_store = list(range(1, num_steps + 1))
    return latents_store[num_steps - (cur_step + 1)]


def run_edit(tiny_parts, edit, steps=3, n=2, side=16):
    from stem.attention import AttentionState
    from stem.editing.common import NUM_GROUPS
    from stem.editing.fatezero import edit_latents
    from stem.inversion import ddim_schedule, encode_prompt

    parts = tiny_parts
    trajectory = torch.randn(steps + 1, n, 4, side, side, generator=torch.Generator().manual_seed(0))
    timesteps, alphas = ddim_schedule(parts.scheduler, steps)
    text = torch.cat(
        [encode_prompt(parts.tokenizer, parts.text_encoder, p) for p in (edit.source_prompt, "", edit.prompt)]
    )
    calls, blends = [], []

    def record(_module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        calls.append((sample.detach().clone(), int(timestep)))

    handle = parts.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            latents, _ = edit_latents(
                parts, trajectory, timesteps, alphas, text, edit, AttentionState(method="ddim", num_groups=NUM_GROUPS),
                trace=lambda info: blends.append((info["step"], info)) if info["phase"] == "blend" else None,
            )
    finally:
        handle.remove()
    return trajectory, timesteps, calls, blends


@pytest.mark.parametrize("source_maps", ["inversion", "editing"])
def test_the_source_group_runs_where_fatezero_stored_its_maps(tiny_parts, source_maps):
    steps, n = 3, 2
    edit = FateZeroSettings("a dog", source_prompt="a cat", self_replace=1.0, cross_replace=1.0,
                            source_maps=source_maps).validate()
    trajectory, timesteps, calls, _ = run_edit(tiny_parts, edit, steps, n)
    assert len(calls) == steps
    for cur_step, (sample, timestep) in enumerate(calls):
        level, t_index = reference_source_map_step(cur_step, steps)
        if source_maps == "editing":
            level += 1  # the project's option: the source at the edit's own level x_i
        assert timestep == int(timesteps[t_index])
        assert torch.equal(sample[:n].float(), trajectory[level])           # the source group
        if cur_step == 0:
            assert torch.equal(sample[n:2 * n].float(), trajectory[steps])  # the edit starts from x_T


@pytest.mark.parametrize("blend_level", ["input", "output"])
def test_the_latent_blend_keeps_fatezeros_source_level(tiny_parts, blend_level):
    steps = 3
    edit = FateZeroSettings("a dog", source_prompt="a cat", blend_words="cat,dog", blend_threshold=0.999,
                            blend_start=0, blend_end=1, blend_level=blend_level, blend_latents=True).validate()
    trajectory, _, calls, blends = run_edit(tiny_parts, edit, steps)
    assert [step for step, _ in blends] == [3, 2, 1]
    for cur_step, (_, tensors) in enumerate(blends):
        level = reference_blend_source_level(cur_step, steps) - (blend_level == "output")
        mask, x = tensors["mask"].expand(-1, 4, -1, -1), tensors["latents"]
        assert 0 < mask.float().mean() < 1
        assert torch.equal(x[~mask], trajectory[level][~mask])


# -- per-word cross-replace schedules ---------------------------------------------------------------

def reference_word_inds_of(text: str, word: str, tokenizer) -> list[int]:
    """seq_aligner.get_word_inds with a str word: every space-separated piece equal to it."""
    places = [i for i, piece in enumerate(text.split(" ")) if piece == word]
    return sorted(j for place in places for j in reference_word_inds(text, place, tokenizer))


def reference_alpha_time_words(prompts, num_steps: int, cross_replace_steps: dict, tokenizer) -> np.ndarray:
    """ptp_utils.get_time_words_attention_alpha for one edit: (T + 1, 77) float64, row cur_step read at step
    cur_step."""
    alpha = np.zeros((num_steps + 1, 77), dtype=np.float64)

    def update(bounds, inds):
        start, end = int(0 * alpha.shape[0]), int(bounds * alpha.shape[0])
        alpha[:start, inds], alpha[start:end, inds], alpha[end:, inds] = 0, 1, 0

    update(cross_replace_steps["default_"], np.arange(77))
    for key, item in cross_replace_steps.items():
        if key != "default_":
            inds = reference_word_inds_of(prompts[1], key, tokenizer)
            if len(inds) > 0:
                update(item, inds)
    return alpha


@pytest.mark.parametrize("num_steps", [10, 20, 50])
def test_per_word_cross_replace_steps_are_fatezeros(tokenizer, num_steps):
    from stem.editing.fatezero import EditMaps

    cases = [("a brown bear walking on the rock", "a red tiger walking on the rock", {"default_": 0.8, "tiger": 0.4}),
             ("a white fox sitting in the grass", "a grey wolf sitting in the snow",
              {"default_": 0.7, "wolf": 0.3, "snow": 0.58, "grey": 1.0}),
             ("a sleepy white duck", "a sleepy yellow rubber duck", {"default_": 0.5, "rubber": 0.0, "duck": 0.75})]
    for source_prompt, prompt, schedule in cases:
        edit = FateZeroSettings(
            prompt,
            source_prompt=source_prompt,
            cross_replace=schedule["default_"],
            cross_replace_words=tuple((w, f) for w, f in schedule.items() if w != "default_"),
        ).validate()
        steps = EditMaps.build(edit, tokenizer).cross_steps(num_steps)
        alpha = reference_alpha_time_words([source_prompt, prompt], num_steps, schedule, tokenizer)
        for j in range(77):
            fused = [cur_step for cur_step in range(num_steps) if alpha[cur_step, j] == 1]
            assert fused == list(range(len(fused))), (prompt, j)  # a leading run of steps
            assert int(steps[j]) == len(fused), (prompt, j, num_steps)


def test_the_blend_switches_default_to_fatezeros_configs():
    """FateZero's configs with blend words set blend_self_attention: True and leave blend_latents out (its
    code's default, False), all but the one local-latent-blend config; the defaults here are those."""
    d = FateZeroSettings("a dog", source_prompt="a cat", blend_words="cat,dog").validate()
    assert d.blend_self_attention is True and d.blend_latents is False
