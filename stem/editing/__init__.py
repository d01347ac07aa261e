"""Text-guided video editing of an inverted video: one module per editor, what they share in `common`.

`edit_video(engine, video, inversion_settings, edit_settings)` inverts the clip (or reuses its cached
inversion) and runs the editor that `edit_settings.editor` names:

    tokenflow   TokenFlow plug-and-play editing with FreeU, as the STEM authors ran it (`TokenFlowSettings`)
    fatezero    FateZero attention fusion with Prompt-to-Prompt word maps and local blending (`FateZeroSettings`)

FreeU (`freeu`) is a module any editor can use on the editing UNet: a `FreeUSettings` field in the
editor's settings (with the editor's own default) and `freeu_installed(unet, settings.freeu)` around
its denoising loop.
"""

from .common import (
    COND, DEFAULT_NEGATIVE_PROMPT, EDITOR_CHECKS, EDITORS, NUM_GROUPS, SOURCE, UNCOND, EditResult, edit_metrics,
    edit_video,
)
from .fatezero import MAX_FUSED_TOKENS, FateZeroSettings, parse_reweight
from .freeu import FreeUSettings, freeu_installed
from .tokenflow import (
    CONV_INJECTION_LAYER, EDIT_ATTENTION, PROPAGATION, EditSettings, TokenFlowSettings, choose_keyframes, edit_latents,
    keyframe_neighbours, nearest_tokens, qk_injection_layers,
)
from .wordmap import WORD_MAPS, WordMap, align_tokens, word_map

__all__ = [
    "COND", "CONV_INJECTION_LAYER", "DEFAULT_NEGATIVE_PROMPT", "EDITORS", "EDITOR_CHECKS", "EDIT_ATTENTION",
    "MAX_FUSED_TOKENS", "NUM_GROUPS", "PROPAGATION", "SOURCE", "UNCOND", "WORD_MAPS", "EditResult", "EditSettings",
    "FateZeroSettings", "FreeUSettings", "TokenFlowSettings", "WordMap", "align_tokens", "choose_keyframes",
    "edit_latents", "edit_metrics", "edit_video", "freeu_installed", "keyframe_neighbours", "nearest_tokens",
    "parse_reweight", "qk_injection_layers", "word_map",
]
