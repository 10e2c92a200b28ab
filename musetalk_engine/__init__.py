"""MuseTalk v1.5 inference engine: weights, audio features, face boxes, avatars, batched generation,
blending and streamed video encoding. Plain Python + torch; nothing here knows about Prefect, HTTP or B2."""

MODEL_VERSION = "musetalk-v1.5"
