"""Text-guided video editing of an inverted video: one module per editor, what they share in `common`.

`edit_video(engine, video, inversion_settings, edit_settings)` inverts the clip (or reuses its cached
inversion) and runs the editor that `edit_settings.editor` names:

    tokenflow   TokenFlow plug-and-play editing with FreeU, as the STEM authors ran it (`TokenFlowSettings`)
    fatezero    FateZero attention fusion with Prompt-to-Prompt word maps and local blending (`FateZeroSettings`)

FreeU (`freeu`) is a module any editor can use on the editing UNet: a `FreeUSettings` field in the
editor's settings (with the editor's own default) and `freeu_installed(unet, settings.freeu)` around
its denoising loop.

What a library user needs is here: the editors' settings, `edit_video`, `edit_metrics`, `EditResult`,
`EDITORS` (editor name -> its denoising loop), `DEFAULT_NEGATIVE_PROMPT`, `parse_reweight`. Everything else
stays importable from its module (`stem.editing.tokenflow`, `.fatezero`, `.wordmap`, `.freeu`, `.common`).
"""

from .common import DEFAULT_NEGATIVE_PROMPT, EDITORS, EditResult, edit_metrics, edit_video
from .fatezero import FateZeroSettings, parse_reweight
from .freeu import FreeUSettings
from .tokenflow import TokenFlowSettings

__all__ = [
    "DEFAULT_NEGATIVE_PROMPT", "EDITORS", "EditResult", "FateZeroSettings", "FreeUSettings", "TokenFlowSettings",
    "edit_metrics", "edit_video", "parse_reweight",
]
