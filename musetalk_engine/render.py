"""The per-frame GPU work: one UNet call at timestep 0 and a VAE decode, batched. No scheduler, no noise."""

from __future__ import annotations

import torch

from .audio import positional_encoding
from .weights import VAE_SCALING_FACTOR


class FaceGenerator:
    """Holds the UNet and VAE on one device; ``generate`` turns avatar latents + audio windows into faces."""

    def __init__(self, unet, vae, device: torch.device, dtype: torch.dtype):
        self.unet, self.vae = unet, vae
        self.device, self.dtype = device, dtype
        self._pe = positional_encoding(50).to(device=device, dtype=dtype)
        self._t0 = torch.zeros(1, device=device, dtype=torch.long)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def unet_latents(self, latents: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """[B,8,32,32] inputs + [B,50,384] audio windows → [B,4,32,32] predicted face latents."""
        latents = latents.to(self.device, self.dtype, non_blocking=True)
        audio = audio.to(self.device, self.dtype, non_blocking=True) + self._pe
        return self.unet(latents, self._t0, encoder_hidden_states=audio).sample

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Face latents → [B,256,256,3] uint8 RGB on the model's device."""
        image = self.vae.decode(latents / VAE_SCALING_FACTOR).sample
        image = (image.float() / 2 + 0.5).clamp_(0, 1).mul_(255).round_()
        return image.to(torch.uint8).permute(0, 2, 3, 1)

    def generate(self, latents: torch.Tensor, audio: torch.Tensor, timer=None) -> torch.Tensor:
        """Both steps with their times recorded under ``unet`` and ``vae_decode`` when a timer is given."""
        if timer is None:
            return self.decode(self.unet_latents(latents, audio))
        with timer.stage("unet"):
            pred = self.unet_latents(latents, audio)
            self._sync()
        with timer.stage("vae_decode"):
            faces = self.decode(pred)
            self._sync()
        return faces
