"""Acceptance tests of the engine facade on tiny random-weight models and media made on the spot.

One engine and one 360×360, 1.5 s astronaut clip (38 frames at 25 fps) + 2 s of speech serve the module;
the first render is cold (the avatar is prepared), later ones reuse the cached avatar. Renders are kept
short (CPU, tiny models): each source clip's frames carry their index in a corner marker, so the frame
order of an output can be read back."""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import musetalk_engine.engine as engine_mod
from musetalk_engine.avatar import Avatar, PrepareParams, avatar_key
from musetalk_engine.cycle import cycle_indices
from musetalk_engine.device_blend import DeviceBlendMaterial
from musetalk_engine.engine import Engine, EngineConfig, RenderResult
from musetalk_engine.errors import MediaError, NoFaceError, ProcessingError
from musetalk_engine.metrics import RENDER_STAGES, StageTimer
from musetalk_engine.render import render_stream, render_stream_device
from musetalk_engine.sample_media import astronaut_frame, make_speech
from musetalk_engine.video import VideoWriter, decode_frames, probe_video
from tests.media import (MARKER, ffprobe, image_files, lavfi_video, marked_avatar_video, media_duration,
                         read_markers, rotated_video)

pytest_plugins = ["tests.fixtures_engine"]

FRAME = 1 / 25


@pytest.fixture(scope="module")
def engine(tiny_models, tmp_path_factory) -> Engine:
    return Engine(EngineConfig(models_dir=tiny_models, cache_dir=tmp_path_factory.mktemp("avatars"),
                               batch_size=8))


@dataclass
class Cold:
    result: RenderResult
    new_images: set[Path]
    image_writes: list[str]


@pytest.fixture(scope="module")
def cold(engine, media, tmp_path_factory) -> Cold:
    """The module's first render (avatar prepared), watched for image files: the temp dir is private for
    its duration (TMPDIR for ffmpeg, ``tempfile.tempdir`` for Python), the working directory too, and any
    cv2/PIL image write is recorded and refused."""
    out_dir = tmp_path_factory.mktemp("out")
    private_tmp = tmp_path_factory.mktemp("tmpdir")
    workdir = tmp_path_factory.mktemp("cwd")
    roots = [tmp_path_factory.getbasetemp(), out_dir, private_tmp, workdir, engine.config.cache_dir]
    writes: list[str] = []

    def refuse(name):
        def write(*args, **kwargs):
            writes.append(f"{name}({args[1] if name == 'PIL.save' else args[0]})")
            raise AssertionError(f"the render wrote an image with {name}")
        return write

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(private_tmp))
        mp.setattr(tempfile, "tempdir", str(private_tmp))
        mp.chdir(workdir)
        mp.setattr(cv2, "imwrite", refuse("cv2.imwrite"))
        mp.setattr(Image.Image, "save", refuse("PIL.save"))
        before = image_files(*roots)
        assert tempfile.gettempdir() == str(private_tmp)
        result = engine.render(media.video, media.speech, out_dir / "out.mp4")
        new = image_files(*roots) - before
    return Cold(result, new, writes)


# --- the cold render ------------------------------------------------------------------------------------

def test_render_writes_h264_aac_mp4_as_long_as_the_audio(cold, media):
    out = cold.result.output
    assert out.is_file()
    probe = ffprobe(out)
    streams = {s["codec_type"]: s for s in probe["streams"]}
    assert streams["video"]["codec_name"] == "h264" and streams["audio"]["codec_name"] == "aac"
    assert (streams["video"]["width"], streams["video"]["height"]) == (media.width, media.height)
    assert "mp4" in probe["format"]["format_name"]
    audio_s = media_duration(media.speech)
    assert audio_s == pytest.approx(2.0, abs=0.01)
    assert abs(float(probe["format"]["duration"]) - audio_s) <= FRAME
    assert abs(float(streams["video"]["duration"]) - audio_s) <= FRAME
    assert int(streams["video"]["nb_frames"]) == cold.result.frames == 50
    assert cold.result.duration_s == pytest.approx(2.0)
    assert cold.result.metrics.avatar_cached is False


def test_render_plays_source_frames_forward_then_backward(cold, media):
    # 50 output frames from 38 source frames: 0..37, then 37, 36, … 26
    assert read_markers(cold.result.output) == cycle_indices(media.n_source, 50).tolist()


def test_render_creates_no_image_files(cold):
    assert cold.image_writes == []
    assert cold.new_images == set()


def test_metrics_name_every_stage(cold):
    m = cold.result.metrics.as_dict()
    for stage in ("decode", "prepare", "audio", "unet", "vae_decode", "blend", "encode"):
        assert stage in m["stage_times"], stage
        assert m["stage_times"][stage] >= 0
    assert set(RENDER_STAGES) <= set(m["stage_times"])
    assert m["stage_times"]["prepare"] > 0 and m["stage_times"]["unet"] > 0
    assert m["frames"] == 50 and m["fps"] > 0
    assert m["peak_rss_kb"] > 0 and m["gpu_class"] == "cpu"
    assert m["encoder"] in ("libx264", "h264_nvenc") and m["batch_size"] == 8


# --- avatar reuse -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cached(engine, media, cold, tmp_path_factory) -> RenderResult:
    """A second, short render of the same video with avatar preparation made impossible."""
    def no_prepare(*args, **kwargs):
        raise AssertionError("the avatar was prepared again")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_mod, "prepare_avatar", no_prepare)
        return engine.render(media.video, media.short_speech, tmp_path_factory.mktemp("again") / "again.mp4")


def test_second_render_reuses_the_avatar(cached, cold):
    assert cached.metrics.avatar_cached is True
    assert cached.frames == 10 and cached.output.is_file()
    assert read_markers(cached.output) == list(range(10))
    assert cached.metrics.stage_times["prepare"] < cold.result.metrics.stage_times["prepare"]


def test_avatar_key_covers_video_params_and_weights():
    base = avatar_key("a" * 64, PrepareParams(), "fp1")
    assert base == avatar_key("a" * 64, PrepareParams(), "fp1")
    others = {avatar_key("b" * 64, PrepareParams(), "fp1"), avatar_key("a" * 64, PrepareParams(), "fp2"),
              avatar_key("a" * 64, PrepareParams(extra_margin=12), "fp1"),
              avatar_key("a" * 64, PrepareParams(parsing_mode="raw"), "fp1"),
              avatar_key("a" * 64, PrepareParams(blur_factor=0.1), "fp1")}
    assert base not in others and len(others) == 5


def test_avatar_format_3_keys_differ_from_format_2(monkeypatch):
    """Float32 latents came with format 3: a format-2 (float16) cache entry is never found again."""
    import musetalk_engine.avatar as avatar_mod

    new = avatar_key("a" * 64, PrepareParams(), "fp1")
    monkeypatch.setattr(avatar_mod, "AVATAR_FORMAT", 2)
    assert avatar_mod.AVATAR_FORMAT == 2 and avatar_key("a" * 64, PrepareParams(), "fp1") != new


def test_blur_width_defaults_to_musetalk_inference_and_reaches_the_job_params():
    from musetalk_engine.blend import BLUR_FACTOR, feather_kernel_size
    from tasks.contract import JobParams

    assert BLUR_FACTOR == 0.05 and PrepareParams().blur_factor == 0.05  # MuseTalk v1.5 inference.py
    assert feather_kernel_size(300) == 15
    assert JobParams(blur_factor=0.1).prepare_params("auto").blur_factor == 0.1
    with pytest.raises(ValueError):
        JobParams(blur_factor=0.9)


# --- inputs of other kinds --------------------------------------------------------------------------------

def test_video_without_a_face_raises_no_face_error(engine, media, tmp_path):
    video = lavfi_video(tmp_path / "noface.mp4", "testsrc=size=160x120:rate=25", seconds=0.4)
    out = tmp_path / "noface-out.mp4"
    with pytest.raises(NoFaceError) as exc:
        engine.render(video, media.short_speech, out)
    err = exc.value
    assert err.video == "noface.mp4" and err.frame == 0
    assert "noface.mp4" in str(err) and "frame" in str(err)
    assert err.stage == "preprocessing" and err.error_type == "media_error" and not err.retryable
    assert not out.exists()


def test_still_png_avatar_renders(engine, media, tmp_path):
    assert probe_video(media.still).is_image
    result = engine.render(media.still, media.short_speech, tmp_path / "still.mp4")
    assert result.frames == 10
    video = next(s for s in ffprobe(result.output)["streams"] if s["codec_type"] == "video")
    assert (video["width"], video["height"]) == (320, 320) and int(video["nb_frames"]) == 10


def test_2997fps_video_decodes_to_25fps(tmp_path):
    video = marked_avatar_video(tmp_path / "ntsc.mp4", seconds=1.0, fps=29.97, width=160, height=96)
    info = probe_video(video)
    assert info.fps == pytest.approx(29.97) and info.duration == pytest.approx(30 / 29.97, abs=1e-3)
    frames = list(decode_frames(video, 25.0, info))
    assert len(frames) == round(info.duration * 25) == 25
    assert frames[0].shape == (96, 160, 3)
    shown = read_markers(video)  # which of the 30 source frames each 25 fps frame is
    assert shown[0] == 0 and shown[-1] >= 28
    assert all(b - a in (1, 2) for a, b in zip(shown, shown[1:]))  # forward, about one in six dropped


def test_rotated_video_decodes_at_displayed_size(tmp_path):
    video = rotated_video(tmp_path / "portrait.mp4", width=96, height=160, seconds=0.2)
    stored = next(s for s in ffprobe(video)["streams"] if s["codec_type"] == "video")
    assert (stored["width"], stored["height"]) == (160, 96)  # stored sideways
    info = probe_video(video)
    assert (info.width, info.height) == (96, 160) and info.rotation in (90, 270)
    frames = list(decode_frames(video, 25.0, info))
    assert len(frames) == 5 and frames[0].shape == (160, 96, 3)
    upright = astronaut_frame(96, 160).astype(np.int16)
    diff = np.abs(frames[0].astype(np.int16) - upright)[MARKER:]  # below the marker square
    assert diff.mean() < 12  # upright, as displayed
    assert read_markers(video) == [0, 1, 2, 3, 4]  # marker top-left as displayed


def test_rotated_video_with_longer_audio_renders_upright_and_cycles(engine, tmp_path):
    """A phone-style portrait clip (8 frames, stored sideways) under 0.8 s of speech (20 frames): the output
    has the displayed size and shows the source forward, backward, then forward again."""
    video = rotated_video(tmp_path / "phone.mp4", width=240, height=320, seconds=0.32)
    speech = make_speech(tmp_path / "s.wav", seconds=0.8)
    result = engine.render(video, speech, tmp_path / "phone-out.mp4")
    assert result.frames == 20
    out = next(s for s in ffprobe(result.output)["streams"] if s["codec_type"] == "video")
    assert (out["width"], out["height"]) == (240, 320)
    assert not out.get("side_data_list")  # the output is upright pixels, no rotation left to apply
    assert read_markers(result.output) == cycle_indices(8, 20).tolist()
    assert cycle_indices(8, 20).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 7, 6, 5, 4, 3, 2, 1, 0, 0, 1, 2, 3]


def test_audio_shorter_than_a_frame_is_a_media_error(engine, tmp_path):
    speech = make_speech(tmp_path / "blip.wav", seconds=0.02)
    with pytest.raises(MediaError) as exc:
        engine.audio_windows(speech)
    assert "blip.wav" in str(exc.value)


# --- the two render pipelines ---------------------------------------------------------------------------

def test_device_blend_path_matches_the_cpu_path(engine, media, cached, tmp_path, monkeypatch):
    """The device path (the CUDA default: tensor-op blend, I420 made on the device, a batch per pipe
    write) renders the video of the numpy path, here on the CPU. The blends are pinned to one level in
    test_blend; here the encoder's inputs differ (RGB vs I420), so x264 codes detail a little differently
    (≈ 1.1 levels on average, as in test_yuv for identical frames; ≈ 1.55 with MuseTalk's narrower 0.05
    feathering, whose sharper mask edge gives x264 more detail to code differently)."""
    assert engine.blend_on == "cpu"  # so ``cached`` went through the numpy blend
    monkeypatch.setattr(engine, "blend_on", "device")
    writers = []
    monkeypatch.setattr(engine_mod, "VideoWriter", lambda *a, **kw: writers.append(kw) or VideoWriter(*a, **kw))
    dev = engine.render(media.video, media.short_speech, tmp_path / "device.mp4")
    assert writers[0]["pix_fmt"] == "yuv420p"
    assert dev.frames == cached.frames == 10 and dev.metrics.avatar_cached
    a = np.stack(list(decode_frames(cached.output, 25.0))).astype(np.int16)
    b = np.stack(list(decode_frames(dev.output, 25.0))).astype(np.int16)
    assert a.shape == b.shape == (10, media.height, media.width, 3)
    assert np.abs(a - b).mean() < 2.0
    assert read_markers(dev.output) == list(range(10))


class _InstantGenerator:
    device = torch.device("cpu")

    def generate(self, latents, windows, timer=None, batch_size=None):
        return torch.zeros(len(latents), 256, 256, 3, dtype=torch.uint8)


class _DyingWriter:
    """An encoder that dies on its first frame, slowly enough for the GPU side to run ahead."""

    pix_fmt, frame_shape = "rgb24", (64, 64, 3)

    def write_frames(self, frames):
        time.sleep(0.2)
        raise ProcessingError("the encoder died", stage="postprocessing")

    def write(self, frame):
        self.write_frames(frame[None])


@pytest.mark.parametrize("path", ["cpu", "device"])
def test_an_encoder_failure_stops_the_render_instead_of_hanging(path):
    n = 2
    avatar = Avatar(video_sha256="x", fps=25.0, width=64, height=64,
                    boxes=np.array([[8, 8, 56, 56]] * n, np.int32),
                    crop_boxes=np.array([[-4, -4, 68, 68]] * n, np.int32),
                    latents=np.zeros((n, 8, 32, 32), np.float16), masks=[np.zeros((72, 72), np.uint8)] * n,
                    face_found=np.ones(n, bool))
    common = dict(avatar=avatar, windows=torch.zeros(40, 50, 384), generator=_InstantGenerator(),
                  writer=_DyingWriter(), batch_size=2, timer=StageTimer())
    outcome: dict = {}

    def run():
        try:
            if path == "cpu":
                render_stream(frames=iter([np.zeros((64, 64, 3), np.uint8)] * n), **common)
            else:
                render_stream_device(frames=torch.zeros(n, 64, 64, 3, dtype=torch.uint8),
                                     material=DeviceBlendMaterial(avatar, torch.device("cpu")), **common)
        except BaseException as exc:  # noqa: BLE001
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), f"the {path} pipeline hung after its encoder died"
    assert isinstance(outcome.get("error"), ProcessingError)


def test_avatar_round_trip_keeps_strided_latents(tmp_path):
    """The VAE hands back latents as a strided view; the saved avatar must hold the same numbers, at full
    precision (float16 storage made fp32 renders differ from fresh latents by up to 4 levels)."""
    n = 3
    latents = (np.arange(n * 32 * 32 * 8, dtype=np.float32) / 7 + 1e-4).reshape(n, 32, 32, 8).transpose(0, 3, 1, 2)
    assert not latents.flags["C_CONTIGUOUS"]
    avatar = Avatar(video_sha256="x", fps=25.0, width=64, height=64,
                    boxes=np.array([[8, 8, 56, 56]] * n, np.int32),
                    crop_boxes=np.array([[-4, -4, 68, 68]] * n, np.int32), latents=latents,
                    masks=[np.full((72, 72), i, np.uint8) for i in range(n)], face_found=np.ones(n, bool))
    avatar.save(tmp_path / "a")
    loaded = Avatar.load(tmp_path / "a")
    assert loaded.latents.dtype == np.float32 and np.array_equal(loaded.latents, latents)
    assert all(np.array_equal(a, b) for a, b in zip(loaded.masks, avatar.masks))
