"""STEM inversion (Li et al., CVPR 2024) and text-guided editing of videos with Stable Diffusion."""

from .attention import METHODS, AttentionState, attention_mode
from .cache import LatentCache
from .em import estimate_bases
from .editing import EditResult, EditSettings, FateZeroSettings, TokenFlowSettings, edit_metrics, edit_video
from .engine import Engine, InversionResult, InversionSettings, inversion_metrics
from .errors import StemError
from .models import DEFAULT_MODEL, TINY_MODEL, build_tiny, load_models
from .video import Video, read_video, write_video

__all__ = [
    "EditResult", "EditSettings", "FateZeroSettings", "TokenFlowSettings", "edit_metrics", "edit_video",
    "METHODS", "AttentionState", "attention_mode", "LatentCache", "estimate_bases", "Engine",
    "InversionResult", "InversionSettings", "inversion_metrics", "StemError", "DEFAULT_MODEL",
    "TINY_MODEL", "build_tiny", "load_models", "Video", "read_video", "write_video",
]
