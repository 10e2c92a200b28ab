"""Speech → per-frame Whisper windows, as MuseTalk v1.5 builds them.

Whisper-tiny's encoder runs on each 30 s piece with all hidden states (embedding output + 4 layers,
5 × 384 at 50 Hz); frame t of a video at ``fps`` gets the 10 encoder steps starting at floor(t·50/fps)
of a zero-padded sequence, flattened time-major to [50, 384]."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import numpy as np
import torch

from .errors import MediaError

SAMPLE_RATE = 16_000
AUDIO_FPS = 50  # Whisper encoder steps per second
PIECE_SECONDS = 30
PAD_LEFT = 2  # MuseTalk's audio_padding_length_left
PAD_RIGHT = 2
STEPS_PER_FRAME = 2 * (PAD_LEFT + PAD_RIGHT + 1)  # 10 encoder steps per video frame
WHISPER_DIM = 384
WHISPER_LAYERS = 5


def load_audio(path: str | Path, max_seconds: float | None = None) -> np.ndarray:
    """Decode any audio ffmpeg reads into mono float32 at 16 kHz (no temp files). With ``max_seconds``,
    decoding stops just past the limit, so a file whose header understates its length cannot make us
    decode hours of samples, and a longer one is refused."""
    limit = ["-t", f"{max_seconds + 1:.3f}"] if max_seconds else []
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-protocol_whitelist", "file,pipe", "-i", str(path),
           *limit, "-vn", "-ac", "1", "-ar", str(SAMPLE_RATE), "-f", "f32le", "-"]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise MediaError(f"the audio {Path(path).name!r} cannot be decoded: {err[-1] if err else 'ffmpeg failed'}",
                         stage="validation", details={"audio": str(path)})
    samples = np.frombuffer(proc.stdout, dtype=np.float32)
    if max_seconds and samples.size > max_seconds * SAMPLE_RATE:
        raise MediaError(f"the audio {Path(path).name!r} is longer than the limit of {max_seconds:g} s",
                         stage="validation", details={"audio": str(path)})
    if samples.size == 0:
        raise MediaError(f"the audio {Path(path).name!r} has no samples", stage="validation",
                         details={"audio": str(path)})
    return samples


def frame_count(n_samples: int, fps: float) -> int:
    """Output video frames for the audio: floor(seconds · fps)."""
    return math.floor(n_samples / SAMPLE_RATE * fps)


def window_starts(n_frames: int, fps: float) -> np.ndarray:
    """Index of the first padded encoder step for each video frame: floor(t · 50 / fps)."""
    return np.floor(np.arange(n_frames) * (AUDIO_FPS / fps)).astype(np.int64)


@torch.inference_mode()
def encoder_states(samples: np.ndarray, extractor, encoder, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
    """All Whisper encoder hidden states at 50 Hz: [steps, 5, 384], trimmed to floor(seconds·50)."""
    piece = PIECE_SECONDS * SAMPLE_RATE
    pieces = [samples[i:i + piece] for i in range(0, len(samples), piece)]
    feats = extractor(pieces, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    out = encoder(feats.to(device=device, dtype=dtype), output_hidden_states=True)
    states = torch.stack(out.hidden_states, dim=2)  # [pieces, 1500, 5, 384]
    states = states.reshape(-1, *states.shape[2:])
    steps = math.floor(len(samples) / SAMPLE_RATE * AUDIO_FPS)
    return states[:steps]


def frame_windows(states: torch.Tensor, n_frames: int, fps: float) -> torch.Tensor:
    """Per-frame audio prompts [T, 50, 384] from encoder states [steps, 5, 384]."""
    pad = math.ceil(AUDIO_FPS / fps)
    left = states.new_zeros((pad * PAD_LEFT, *states.shape[1:]))
    right = states.new_zeros((pad * 3 * PAD_RIGHT, *states.shape[1:]))
    padded = torch.cat([left, states, right], dim=0)
    starts = torch.as_tensor(window_starts(n_frames, fps), device=states.device)
    idx = starts[:, None] + torch.arange(STEPS_PER_FRAME, device=states.device)[None, :]
    idx = idx.clamp_(max=padded.shape[0] - 1)  # fps > 25 can reach past the right pad; MuseTalk would shorten
    windows = padded[idx]  # [T, 10, 5, 384]
    return windows.reshape(n_frames, STEPS_PER_FRAME * WHISPER_LAYERS, WHISPER_DIM)


def positional_encoding(length: int, d_model: int = WHISPER_DIM) -> torch.Tensor:
    """The standard sinusoidal encoding MuseTalk adds to the audio prompts before the UNet: [length, d]."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(length, d_model)
    pe[:, 0::2] = torch.sin(position * div)
    pe[:, 1::2] = torch.cos(position * div)
    return pe
