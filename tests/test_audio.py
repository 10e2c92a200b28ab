"""Speech → per-frame Whisper windows (DESIGN §3 "Audio"), with numbers worked out by hand."""

from __future__ import annotations

import math
import subprocess

import numpy as np
import pytest
import torch

from musetalk_engine import audio
from musetalk_engine.audio import (encoder_states, frame_count, frame_windows, load_audio, positional_encoding,
                                   window_starts)
from musetalk_engine.errors import MediaError
from musetalk_engine.face_generator import FaceGenerator
from musetalk_engine.sample_media import make_speech

pytest_plugins = ["tests.fixtures_engine"]

SR = 16_000


# --- frame counts and window starts -------------------------------------------------------------------

def test_frame_count_is_floor_of_seconds_times_fps():
    assert frame_count(2 * SR, 25) == 50
    assert frame_count(2 * SR - 1, 25) == 49  # one sample short of 2 s: floor
    assert frame_count(2 * SR, 29.97) == 59  # 59.94
    assert frame_count(int(1.3 * SR), 25) == 32  # 32.5
    assert frame_count(int(1.3 * SR), 29.97) == 38  # 38.961
    assert frame_count(SR // 25 - 1, 25) == 0


def test_window_starts_25fps():
    # 50/25 = 2 encoder steps per frame
    np.testing.assert_array_equal(window_starts(6, 25), [0, 2, 4, 6, 8, 10])
    assert window_starts(50, 25)[-1] == 98


def test_window_starts_2997fps():
    # floor(t · 50/29.97) = floor(t · 1.66834…): 0, 1.67, 3.34, 5.01, 6.67, 8.34, 10.01, 11.68, 13.35, 15.02
    np.testing.assert_array_equal(window_starts(10, 29.97), [0, 1, 3, 5, 6, 8, 10, 11, 13, 15])
    assert window_starts(59, 29.97)[-1] == 96  # 58 · 1.66834 = 96.76


def _coded_states(steps: int) -> torch.Tensor:
    """[steps, 5, 384] whose every value says where it came from: 1000 + 10·step + layer (+ dim/1000)."""
    s = torch.arange(steps, dtype=torch.float64)[:, None, None]
    layer = torch.arange(5, dtype=torch.float64)[None, :, None]
    dim = torch.arange(384, dtype=torch.float64)[None, None, :]
    return 1000 + 10 * s + layer + dim / 1000


@pytest.mark.parametrize("fps,steps,frames,left,right", [
    (25.0, 100, 50, 4, 12),  # 2 s: pad = ceil(50/25) = 2 → 2·2 before, 2·3·2 after
    (29.97, 100, 59, 4, 12),  # ceil(50/29.97) = 2 as well
    (20.0, 100, 40, 6, 18),  # ceil(50/20) = 3 → 6 before, 18 after
])
def test_frame_windows_layout_and_padding(fps, steps, frames, left, right):
    states = _coded_states(steps)
    win = frame_windows(states, frames, fps)
    assert win.shape == (frames, 50, 384)
    padded_len = left + steps + right
    for t in sorted({0, 1, 2, 3, frames // 2, frames - 3, frames - 2, frames - 1}):
        start = math.floor(t * 50 / fps)
        for r in range(50):
            step, layer = start + r // 5 - left, r % 5  # row r of 50 = padded step r//5, layer r%5
            row = win[t, r]
            if 0 <= step < steps:
                expected = 1000 + 10 * step + layer + torch.arange(384, dtype=torch.float64) / 1000
                torch.testing.assert_close(row, expected, rtol=0, atol=0)
            else:
                assert start + r // 5 < padded_len
                assert not row.any(), f"frame {t} row {r} should be zero padding"
    # zero padding at the start: frame 0 begins with `left` silent steps, then step 0 layer 0
    assert not win[0, :left * 5].any()
    assert win[0, left * 5, 0] == 1000


def test_frame_windows_dtype_and_device_follow_states():
    win = frame_windows(torch.ones(10, 5, 384, dtype=torch.float16), 5, 25)
    assert win.dtype == torch.float16 and win.shape == (5, 50, 384)


# --- positional encoding --------------------------------------------------------------------------------

def test_positional_encoding_values():
    pe = positional_encoding(50)
    assert pe.shape == (50, 384)
    # position 0: sin 0 = 0 on even dims, cos 0 = 1 on odd dims
    assert torch.equal(pe[0, 0::2], torch.zeros(192)) and torch.equal(pe[0, 1::2], torch.ones(192))
    # dim pair (2i, 2i+1) uses angle pos / 10000^(2i/384)
    for pos, i in [(1, 0), (3, 0), (7, 1), (20, 10), (49, 191)]:
        angle = pos / 10000 ** (2 * i / 384)
        assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
        assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)


def test_generator_adds_positional_encoding_before_the_unet():
    seen = {}

    class FakeUnet:
        def __call__(self, latents, t, encoder_hidden_states):
            seen["audio"], seen["t"] = encoder_hidden_states, t

            class Out:
                sample = latents[:, :4]
            return Out()

    gen = FaceGenerator(FakeUnet(), vae=None, device=torch.device("cpu"), dtype=torch.float32)
    windows = torch.randn(2, 50, 384)
    gen.unet_latents(torch.zeros(2, 8, 32, 32), windows)
    torch.testing.assert_close(seen["audio"], windows + positional_encoding(50)[None])
    assert seen["t"].tolist() == [0]  # one call at timestep 0


# --- decoding and the Whisper encoder -----------------------------------------------------------------

@pytest.fixture(scope="module")
def speech_48k_stereo(tmp_path_factory):
    path = make_speech(tmp_path_factory.mktemp("audio") / "speech48.wav", seconds=1.3, sample_rate=48000,
                       extra_args=("-ac", "2"))
    probe = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=sample_rate,channels",
                            "-of", "csv=p=0", str(path)], capture_output=True, text=True, check=True).stdout
    assert probe.strip() == "48000,2"
    return path


def test_load_audio_resamples_to_16k_mono(speech_48k_stereo):
    samples = load_audio(speech_48k_stereo)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(len(samples) - int(1.3 * SR)) <= 1
    assert np.abs(samples).max() > 0.01  # real speech, not silence


def test_load_audio_rejects_non_audio(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not audio")
    with pytest.raises(MediaError) as exc:
        load_audio(bad)
    assert "notes.txt" in str(exc.value) and exc.value.stage == "validation"


@pytest.fixture(scope="module")
def whisper(tiny_models):
    from musetalk_engine.weights import ModelPaths, load_whisper

    return load_whisper(ModelPaths(tiny_models), torch.device("cpu"), torch.float32)


def test_tiny_whisper_states_and_windows(whisper, speech_48k_stereo):
    extractor, encoder = whisper
    samples = load_audio(speech_48k_stereo)
    states = encoder_states(samples, extractor, encoder, torch.device("cpu"), torch.float32)
    steps = math.floor(len(samples) / SR * 50)
    assert steps == 65
    assert states.shape == (steps, 5, 384)
    assert torch.isfinite(states).all() and states.abs().sum() > 0
    n = frame_count(len(samples), 25)
    win = frame_windows(states, n, 25)
    assert win.shape == (32, 50, 384)
    torch.testing.assert_close(win[0, 20:25], states[0])  # after 4 padded steps comes step 0


def test_whisper_pieces_of_30s_are_concatenated(whisper):
    """31 s of audio: two 30 s pieces, 1500 + 1500 steps, trimmed to floor(31·50) = 1550."""
    extractor, encoder = whisper
    rng = np.random.default_rng(0)
    samples = (0.1 * rng.standard_normal(31 * SR)).astype(np.float32)
    states = encoder_states(samples, extractor, encoder, torch.device("cpu"), torch.float32)
    assert states.shape == (1550, 5, 384)
    tail = encoder_states(samples[30 * SR:], extractor, encoder, torch.device("cpu"), torch.float32)
    assert tail.shape == (50, 5, 384)
    torch.testing.assert_close(states[1500:], tail, rtol=1e-4, atol=1e-4)  # the 2nd piece starts at 30 s


def test_audio_constants_match_musetalk():
    assert audio.STEPS_PER_FRAME == 10 and audio.WHISPER_LAYERS == 5 and audio.WHISPER_DIM == 384
