"""MuseTalk v1.5 inference engine: weights, audio features, face boxes, avatars, batched generation,
blending and streamed video encoding. Plain Python + torch; nothing here knows about Prefect, HTTP or B2."""

import os

# The render overlaps torch with decode/blend/encode threads and ffmpeg processes. OpenMP's default
# spin-waiting then steals the cores those stages need: measured on 2 cores, the tiny UNet ran 10–20×
# slower under load. Passive waiting must be chosen before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

MODEL_VERSION = "musetalk-v1.5"
