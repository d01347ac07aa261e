"""STEM inversion (Li et al., CVPR 2024) and text-guided editing of videos with Stable Diffusion.

What a library user needs, in one import:

    from stem import Engine, InversionSettings, TokenFlowSettings, edit_video, read_video, write_video

    engine = Engine("stable-diffusion-v1-5/stable-diffusion-v1-5")   # or Engine.from_pipe(pipe)
    settings = InversionSettings(model=engine.model, prompt="a man playing tennis")
    video = read_video("clip.mp4", size=settings.size)
    result = engine.invert(video, settings, callback=print)          # one dict per step
    edited = edit_video(engine, video, settings, TokenFlowSettings("Spider-Man playing tennis"))
    write_video("edited.mp4", edited.frames, video.fps)

Everything else stays importable from its module (`stem.em`, `stem.attention`, `stem.memory`,
`stem.editing.tokenflow`, ...).
"""

from .cache import LatentCache
from .editing import EditResult, FateZeroSettings, FreeUSettings, TokenFlowSettings, edit_metrics, edit_video
from .engine import Engine, InversionResult, InversionSettings, inversion_metrics
from .errors import StemError
from .memory import MemoryPlan
from .models import DEFAULT_MODEL, TINY_MODEL
from .video import Video, read_video, write_video

__all__ = [
    "Engine", "InversionSettings", "InversionResult", "MemoryPlan", "TokenFlowSettings", "FateZeroSettings",
    "FreeUSettings", "EditResult", "edit_video", "edit_metrics", "inversion_metrics", "Video", "read_video",
    "write_video", "LatentCache", "StemError", "DEFAULT_MODEL", "TINY_MODEL",
]
