"""The source's sound in result videos: `stem.video.copy_audio` on clips with a tone made here with PyAV.

A result is made from the source's first frames (stride 1), so its sound must be the source's
first seconds: the same tone, cut to the video's length, starting where the video starts. AAC and
MP3 are copied as they are; anything else (PCM, Opus) is re-encoded to AAC. The video stream is
never re-encoded.
"""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest

from stem import StemError
from stem.video import copy_audio, read_video, write_video

FPS, RATE, TONE = 10, 16000, 440.0


def make_clip(path, audio_codec: str | None, seconds: float = 2.0, silent_until: float = 0.0):
    """A moving-square clip at FPS with a TONE Hz sine (silence before `silent_until` s) in `audio_codec`."""
    num_frames = int(seconds * FPS)
    with av.open(str(path), "w") as out:
        video = out.add_stream("mpeg4", rate=FPS)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        streams = [video]
        if audio_codec is not None:
            audio = out.add_stream(audio_codec, rate=RATE, layout="mono")
            streams.append(audio)
        for i in range(num_frames):
            image = np.full((48, 64, 3), 30, np.uint8)
            image[10:30, 2 * i: 2 * i + 16] = 220
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        if audio_codec is not None:
            t = np.arange(int(seconds * RATE)) / RATE
            wave = np.where(t >= silent_until, 0.5 * np.sin(2 * np.pi * TONE * t), 0.0)
            chunk = audio.codec_context.frame_size or 1024
            resampler = av.AudioResampler(format=audio.codec_context.format.name, layout="mono", rate=RATE)
            for start in range(0, len(wave), chunk):
                samples = (wave[start:start + chunk] * 32767).astype(np.int16)[None]
                frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
                frame.sample_rate, frame.pts, frame.time_base = RATE, start, Fraction(1, RATE)
                for resampled in resampler.resample(frame):
                    for packet in audio.encode(resampled):
                        out.mux(packet)
        for stream in streams:
            for packet in stream.encode(None):
                out.mux(packet)
    return path


def sound(path) -> tuple[str, int, np.ndarray]:
    """(codec, sample rate, mono samples as float) of the first audio track."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        chunks = [
            f.to_ndarray()
            .astype(np.float64)
            .reshape(f.layout.nb_channels, -1, order="F" if f.format.is_packed else "C")[0]
            for f in container.decode(stream)
        ]
        return stream.codec_context.codec.canonical_name, stream.codec_context.sample_rate, np.concatenate(chunks)


def video_packets(path) -> list[bytes]:
    with av.open(str(path)) as container:
        return [bytes(p) for p in container.demux(video=0) if p.size]


def dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[np.argmax(spectrum)])


@pytest.mark.parametrize("container, codec, copied_as", [
    ("mp4", "aac", "aac"),          # copied as it is
    ("mkv", "mp3", "mp3"),          # copied as it is
    ("mov", "pcm_s16le", "aac"),    # re-encoded
    ("mkv", "libopus", "aac"),      # re-encoded
])
def test_the_sound_is_the_sources_first_seconds(tmp_path, container, codec, copied_as):
    source = make_clip(tmp_path / f"source.{container}", codec, seconds=2.0, silent_until=0.5)
    clip = read_video(source, num_frames=10, size=64)  # the first second
    result = tmp_path / "result.mp4"
    write_video(result, clip.frames, clip.fps)
    before = video_packets(result)

    assert copy_audio(source, result) is True
    assert video_packets(result) == before  # the video is copied, not re-encoded
    name, rate, samples = sound(result)
    assert name == copied_as
    seconds = len(samples) / rate
    assert 0.9 <= seconds <= 1.15  # cut to the video's second (plus at most a few codec frames)
    assert abs(dominant_hz(samples[int(0.55 * rate):int(0.95 * rate)], rate) - TONE) < 10
    quiet, loud = samples[int(0.05 * rate):int(0.4 * rate)], samples[int(0.6 * rate):int(0.9 * rate)]
    assert np.abs(quiet).max() < 0.05 * np.abs(loud).max()  # in sync: silent until 0.5 s as in the source
    assert len(read_video(result, size=64).frames) == 10


def test_a_whole_clip_keeps_all_its_sound(tmp_path):
    source = make_clip(tmp_path / "source.mp4", "aac", seconds=1.5)
    clip = read_video(source, size=64)
    result = tmp_path / "result.mp4"
    write_video(result, clip.frames, clip.fps)
    assert copy_audio(source, result)
    _, rate, samples = sound(result)
    assert 1.45 <= len(samples) / rate <= 1.65


def test_a_source_without_sound_leaves_the_video_as_it_was(tmp_path):
    source = make_clip(tmp_path / "silent.mp4", None)
    result = tmp_path / "result.mp4"
    write_video(result, read_video(source, size=64).frames, FPS)
    content = result.read_bytes()
    assert copy_audio(source, result) is False
    assert result.read_bytes() == content


def test_an_unreadable_source_is_a_sentence_and_the_video_stays(tmp_path):
    source = make_clip(tmp_path / "source.mp4", "aac")
    result = tmp_path / "result.mp4"
    write_video(result, read_video(source, size=64).frames, FPS)
    content = result.read_bytes()
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all" * 100)
    with pytest.raises(StemError, match="Could not copy the sound"):
        copy_audio(broken, result)
    assert result.read_bytes() == content
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left
