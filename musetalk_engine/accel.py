"""Faster per-frame GPU work, each with a fallback to eager execution.

- ``graphs``: the UNet captured as a CUDA graph per batch size. The eager UNet is launch-bound (≈ 42–52 ms
  whatever the batch up to 64 on an H200); a replay removes most of that.
- ``compiled``: ``torch.compile`` of the UNet (CUDA graphs through ``reduce-overhead``) and of the VAE
  decoder (fused GroupNorm+SiLU and convolutions), the part that bounds throughput. Inductor's on-disk cache
  (``TORCHINDUCTOR_CACHE_DIR``) makes later process starts reuse the compiled kernels.
"""

from __future__ import annotations

import torch

MODES = ("eager", "graphs", "compiled")


class GraphedUNet:
    """The UNet at timestep 0 replayed from a CUDA graph with static input/output buffers."""

    def __init__(self, unet, batch_size: int, t0: torch.Tensor, dtype: torch.dtype, warmup: int = 3):
        """``t0``: the generator's timestep-0 tensor, on the device the graph runs on."""
        device = t0.device
        with torch.cuda.device(device):  # the capture runs on the *current* device's stream: make it ours
            self._capture(unet, batch_size, t0, dtype, warmup)

    def _capture(self, unet, batch_size: int, t0: torch.Tensor, dtype: torch.dtype, warmup: int) -> None:
        device = t0.device
        self.batch_size = batch_size
        self.latents = torch.zeros(batch_size, 8, 32, 32, device=device, dtype=dtype)
        self.audio = torch.zeros(batch_size, 50, 384, device=device, dtype=dtype)
        self.t0 = t0
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(warmup):  # cuDNN/cuBLAS pick their algorithms outside the capture
                unet(self.latents, self.t0, encoder_hidden_states=self.audio)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the render's encoder thread may wait on an event while a capture runs (a batch
        # size first seen mid-render); in the default global mode that would invalidate the capture
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"), torch.inference_mode():
            self.out = unet(self.latents, self.t0, encoder_hidden_states=self.audio).sample

    def __call__(self, latents: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """A full batch (``FaceGenerator.generate`` pads a short one) → the UNet's output, copied out of
        the graph's buffer before the next replay overwrites it."""
        self.latents.copy_(latents)
        self.audio.copy_(audio)
        self.graph.replay()
        return self.out.clone()


def compile_module(module, mode: str):
    """``torch.compile`` of ``module`` (static shapes); the caller keeps the eager module to fall back on."""
    return torch.compile(module, mode=mode, fullgraph=False, dynamic=False)
