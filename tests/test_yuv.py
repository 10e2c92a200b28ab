"""The encoder's I420 input: the tensor conversion matches ffmpeg's own, and a VideoWriter fed I420 a
batch per write gives the video an RGB-fed one gives."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch

from musetalk_engine.sample_media import astronaut_frame, make_speech
from musetalk_engine.video import VideoWriter, decode_frames, i420_shape
from musetalk_engine.yuv import rgb_to_i420


def _frames(n: int, width: int, height: int) -> np.ndarray:
    face = astronaut_frame(width, height)
    return np.stack([np.roll(face, 7 * k, axis=1) for k in range(n)])


def _ffmpeg_i420(frames: np.ndarray) -> np.ndarray:
    n, h, w, _ = frames.shape
    out = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
                          "-s", f"{w}x{h}", "-i", "-", "-pix_fmt", "yuv420p", "-f", "rawvideo", "-"],
                         input=frames.tobytes(), capture_output=True, check=True).stdout
    return np.frombuffer(out, np.uint8).reshape(n, *i420_shape(h, w))


def test_i420_matches_ffmpegs_conversion_of_the_same_frames():
    frames = _frames(3, 320, 240)
    ours = rgb_to_i420(torch.from_numpy(frames)).numpy().astype(np.int16)
    theirs = _ffmpeg_i420(frames).astype(np.int16)
    luma, chroma = np.abs(ours - theirs)[:, :240], np.abs(ours - theirs)[:, 240:]
    assert luma.max() <= 1 and luma.mean() < 0.01
    assert chroma.max() <= 4 and chroma.mean() < 0.2


def test_i420_needs_even_sides():
    with pytest.raises(ValueError, match="even sides, not 33x32"):
        rgb_to_i420(torch.zeros(1, 32, 33, 3, dtype=torch.uint8))


def test_writer_fed_i420_batches_encodes_what_an_rgb_fed_one_does(tmp_path):
    frames = _frames(10, 160, 128)
    speech = make_speech(tmp_path / "s.wav", seconds=0.4)
    rgb = VideoWriter(tmp_path / "rgb.mp4", 160, 128, 25.0, speech, encoder="libx264")
    for frame in frames:
        rgb.write(frame)
    rgb.close()
    yuv = VideoWriter(tmp_path / "yuv.mp4", 160, 128, 25.0, speech, encoder="libx264", pix_fmt="yuv420p")
    i420 = rgb_to_i420(torch.from_numpy(frames)).numpy()
    yuv.write_frames(i420[:6])  # a batch per pipe write
    yuv.write_frames(i420[6:])
    yuv.close()
    assert yuv.frames == rgb.frames == 10
    a = np.stack(list(decode_frames(tmp_path / "rgb.mp4", 25.0))).astype(np.int16)
    b = np.stack(list(decode_frames(tmp_path / "yuv.mp4", 25.0))).astype(np.int16)
    assert a.shape == b.shape == (10, 128, 160, 3)
    error_rgb, error_yuv = np.abs(a - frames).mean(), np.abs(b - frames).mean()
    assert error_yuv < error_rgb + 0.1  # as faithful to the source (lossy coding differs in detail)


def test_writer_refuses_frames_of_another_layout(tmp_path):
    speech = make_speech(tmp_path / "s.wav", seconds=0.2)
    writer = VideoWriter(tmp_path / "o.mp4", 64, 48, 25.0, speech, encoder="libx264", pix_fmt="yuv420p")
    try:
        assert writer.frame_shape == (72, 64)
        with pytest.raises(ValueError, match=r"\(48, 64, 3\) != \(72, 64\) \(yuv420p\)"):
            writer.write(np.zeros((48, 64, 3), np.uint8))
    finally:
        writer.abort()
    with pytest.raises(ValueError, match="even sides"):
        VideoWriter(tmp_path / "odd.mp4", 63, 48, 25.0, speech, encoder="libx264", pix_fmt="yuv420p")
    with pytest.raises(ValueError, match="rgb24 or yuv420p"):
        VideoWriter(tmp_path / "x.mp4", 64, 48, 25.0, speech, encoder="libx264", pix_fmt="nv12")
