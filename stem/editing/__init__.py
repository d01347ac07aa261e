"""Text-guided video editing of an inverted video: one module per editor, what they share in `common`.

`edit_video(engine, video, inversion_settings, edit_settings)` inverts the clip (or reuses its cached
inversion) and runs the editor that `edit_settings.editor` names:

    tokenflow   TokenFlow plug-and-play editing with FreeU, as the STEM authors ran it (`TokenFlowSettings`)

FreeU (`freeu`) is a module any editor can use on the editing UNet: a `FreeUSettings` field in the
editor's settings (with the editor's own default) and `freeu_installed(unet, settings.freeu)` around
its denoising loop.
"""

from .common import (
    COND, DEFAULT_NEGATIVE_PROMPT, EDITORS, NUM_GROUPS, SOURCE, UNCOND, EditResult, edit_metrics, edit_video,
)
from .freeu import FreeUSettings, freeu_installed
from .tokenflow import (
    CONV_INJECTION_LAYER, EDIT_ATTENTION, PROPAGATION, EditSettings, TokenFlowSettings, choose_keyframes, edit_latents,
    keyframe_neighbours, nearest_tokens, qk_injection_layers,
)

__all__ = [
    "COND", "CONV_INJECTION_LAYER", "DEFAULT_NEGATIVE_PROMPT", "EDITORS", "EDIT_ATTENTION", "NUM_GROUPS", "PROPAGATION",
    "SOURCE", "UNCOND", "EditResult", "EditSettings", "FreeUSettings", "TokenFlowSettings", "choose_keyframes",
    "edit_latents", "edit_metrics", "edit_video", "freeu_installed", "keyframe_neighbours", "nearest_tokens",
    "qk_injection_layers",
]
