"""The per-frame GPU work: one UNet call at timestep 0 and a VAE decode, batched. No scheduler, no noise."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

import torch

from .audio import positional_encoding
from .device import device_scope
from .weights import VAE_SCALING_FACTOR

log = logging.getLogger(__name__)

# CUDA graphs kept at once: the engine's batch size, a job's own, and an OOM retry's half
MAX_GRAPHS = 3


class FaceGenerator:
    """Holds the UNet and VAE on one device; ``generate`` turns avatar latents + audio windows into faces.

    ``mode`` picks the execution (see :mod:`musetalk_engine.accel`): ``eager``, ``graphs`` (CUDA-graph UNet)
    or ``compiled`` (torch.compile of UNet and VAE decoder). Any failure of a fast path logs once and
    falls back to eager for good, so a job never fails for the sake of speed."""

    def __init__(self, unet, vae, device: torch.device, dtype: torch.dtype, mode: str = "eager"):
        from .accel import MODES

        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if mode == "graphs" and device.type != "cuda":
            mode = "eager"  # CUDA graphs need CUDA
        self.unet, self.vae = unet, vae
        self.device, self.dtype = device, dtype
        self.mode = mode
        self._pe = positional_encoding(50).to(device=device, dtype=dtype)
        self._t0 = torch.zeros(1, device=device, dtype=torch.long)
        self._graphs: OrderedDict[int, object] = OrderedDict()  # batch size → graph, least recent first
        self._unet_fast = self._decoder_fast = None
        if mode == "compiled":
            from .accel import compile_module

            self._unet_fast = compile_module(unet, "reduce-overhead" if device.type == "cuda" else "default")
            self._decoder_fast = compile_module(vae.decoder, "max-autotune-no-cudagraphs"
                                                if device.type == "cuda" else "default")

    def _fallback(self, what: str, exc: BaseException) -> None:
        log.warning("%s failed (%s: %s); falling back to eager", what, type(exc).__name__, str(exc)[:300])
        self.mode = "eager"
        self._graphs.clear()
        self._unet_fast = self._decoder_fast = None

    def _attempt(self, what: str, fast: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        """``fast()``, or None once it failed and the generator fell back to eager for good. An OOM is
        raised as it is: it is the batch's failure, which the caller retries at half the batch."""
        try:
            return fast()
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 — a fast path must never fail a job
            self._fallback(what, exc)
            return None

    def _run_unet(self, latents: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        out = None
        if self.mode == "graphs":
            out = self._attempt("CUDA graph capture", lambda: self._graph_for(latents.shape[0])(latents, audio))
        elif self.mode == "compiled" and self._unet_fast is not None:
            out = self._attempt("compiled UNet",
                                lambda: self._unet_fast(latents, self._t0, encoder_hidden_states=audio).sample)
        return out if out is not None else self.unet(latents, self._t0, encoder_hidden_states=audio).sample

    def _graph_for(self, batch: int):
        """The graph for this batch size, captured on first use. Each graph keeps its own memory pool, so
        only the most recently used few are kept (jobs may ask for any batch size)."""
        from .accel import GraphedUNet

        if batch in self._graphs:
            self._graphs.move_to_end(batch)
            return self._graphs[batch]
        while len(self._graphs) >= MAX_GRAPHS:
            self._graphs.popitem(last=False)
            torch.cuda.empty_cache()
        graph = self._graphs[batch] = GraphedUNet(self.unet, batch, self._t0, self.dtype)
        return graph

    def release_fast_paths(self) -> None:
        """Drop the captured graphs and their memory (before a retry at a smaller batch after an OOM)."""
        if self._graphs:
            self._graphs.clear()
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def unet_latents(self, latents: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """[B,8,32,32] inputs + [B,50,384] audio windows → [B,4,32,32] predicted face latents."""
        latents = latents.to(self.device, self.dtype, non_blocking=True)
        audio = audio.to(self.device, self.dtype, non_blocking=True) + self._pe
        return self._run_unet(latents, audio)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Face latents → [B,256,256,3] uint8 RGB on the model's device."""
        image = None
        if self._decoder_fast is not None:
            image = self._attempt("compiled VAE decoder", lambda: self._decoder_fast(
                self.vae.post_quant_conv(latents / VAE_SCALING_FACTOR)))
        if image is None:
            image = self.vae.decode(latents / VAE_SCALING_FACTOR).sample
        image = (image.float() / 2 + 0.5).clamp_(0, 1).mul_(255).round_()
        return image.to(torch.uint8).permute(0, 2, 3, 1)

    def generate(self, latents: torch.Tensor, audio: torch.Tensor, timer=None,
                 batch_size: int | None = None) -> torch.Tensor:
        """Both steps with their times recorded under ``unet`` and ``vae_decode`` when a timer is given
        (GPU time on CUDA; the faces may still be being computed when this returns).

        ``batch_size`` is the size of the run's full batches. The fast modes are built per batch size
        (a graph capture, a compile), so a shorter batch, a job's last, runs padded to it instead of
        building anew."""
        with device_scope(self.device):  # graphs capture and replay on the current device's stream
            return self._generate(latents, audio, timer, batch_size)

    def _generate(self, latents: torch.Tensor, audio: torch.Tensor, timer, batch_size: int | None) -> torch.Tensor:
        n = latents.shape[0]
        size = n if self.mode == "eager" else max(n, batch_size or n)
        if size > n:  # repeat the last frame's inputs; their faces are dropped below
            latents = torch.cat([latents, latents[-1:].expand(size - n, *latents.shape[1:])])
            audio = torch.cat([audio, audio[-1:].expand(size - n, *audio.shape[1:])])
        if timer is None:
            return self.decode(self.unet_latents(latents, audio))[:n]
        with timer.stage("unet", self.device):
            pred = self.unet_latents(latents, audio)
        with timer.stage("vae_decode", self.device):
            return self.decode(pred)[:n]
