"""Session fixtures for the engine's acceptance tests: tiny random-weight models and shared media.

Test modules load this with ``pytest_plugins = ["tests.fixtures_engine"]`` so that every session-scoped
fixture here is built once per pytest session, however many modules use it (importing the fixture
functions by name would give each module its own copy). Media helpers live in ``tests/media.py``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import pytest

from musetalk_engine.sample_media import astronaut_frame, make_speech
from tests.media import marked_avatar_video


# --- session fixtures ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Media:
    video: Path  # 360×360, 1.5 s at 25 fps (38 frames), marker-coded frame indices
    speech: Path  # 2.0 s espeak-ng speech, 16 kHz mono
    n_source: int
    still: Path  # a 320×320 PNG portrait (an avatar may be a single image)
    short_speech: Path  # 0.4 s of speech: 10 frames, for renders that need not be long
    width: int = 360
    height: int = 360


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """Random-weight models in the released layout (dlib landmarks via ``tiny.json``)."""
    from musetalk_engine.tiny import make_models

    root = tmp_path_factory.mktemp("tiny-models")
    make_models(root, "tiny")
    return root


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> Media:
    d = tmp_path_factory.mktemp("media")
    video = marked_avatar_video(d / "avatar.mp4", seconds=1.5)
    speech = make_speech(d / "speech.wav", seconds=2.0)
    still = d / "portrait.png"
    cv2.imwrite(str(still), cv2.cvtColor(astronaut_frame(320, 320), cv2.COLOR_RGB2BGR))
    short = make_speech(d / "short.wav", seconds=0.4)
    return Media(video=video, speech=speech, n_source=round(1.5 * 25), still=still, short_speech=short)
