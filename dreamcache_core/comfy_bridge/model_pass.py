"""One model call through ComfyUI's own sampling machinery, each row at its own sigma."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModelPass:
    """What one model call saw and returned, in the model's own latent space (after ``process_latent_in``)."""

    denoised: torch.Tensor        # the model's x0 prediction [B, C, h, w]
    latent: torch.Tensor          # the clean latent the rows were noised from
    sigma: torch.Tensor           # [B] float32, each row's sigma
    model_sampling: object        # the model's ModelSampling (noise_scaling, calculate_input, ...)


_SINGLE_PASS_SAMPLER = None


def _single_pass_sampler_class():
    """A ComfyUI ``Sampler`` that noises each row to its own sigma and calls the model once (built on first use)."""
    global _SINGLE_PASS_SAMPLER
    if _SINGLE_PASS_SAMPLER is None:
        import comfy.samplers

        class SinglePassSampler(comfy.samplers.Sampler):
            def __init__(self, row_sigmas: torch.Tensor):
                self.row_sigmas = row_sigmas
                self.result = None

            def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                       disable_pbar=False):
                model_sampling = model_wrap.inner_model.model_sampling
                sigma = self.row_sigmas.to(device=latent_image.device, dtype=torch.float32)
                x = model_sampling.noise_scaling(sigma, noise, latent_image)
                self.result = ModelPass(model_wrap(x, sigma, **extra_args), latent_image, sigma, model_sampling)
                return latent_image

        _SINGLE_PASS_SAMPLER = SinglePassSampler
    return _SINGLE_PASS_SAMPLER


def single_model_pass(model_patcher, latent: torch.Tensor, noise: torch.Tensor, conditioning,
                      row_sigmas: torch.Tensor, seed: int = 0) -> ModelPass:
    """One model call through ComfyUI's own guider (its latent format, patches, wrappers and memory
    management, as KSampler runs the model), the positive conditioning only, row i of the raw ``latent``
    noised with ``noise`` to ``row_sigmas[i]``. Encode DreamCache, the training loss and the benchmark's
    plain pass all run the model through here. Differentiable when gradients are on."""
    import comfy.samplers

    row_sigmas = torch.as_tensor(row_sigmas, dtype=torch.float32).detach().cpu().reshape(-1)
    if row_sigmas.numel() == 1:
        row_sigmas = row_sigmas.expand(latent.shape[0])
    sampler = _single_pass_sampler_class()(row_sigmas)
    guider = comfy.samplers.CFGGuider(model_patcher)
    guider.inner_set_conds({"positive": conditioning})
    guider.set_cfg(1.0)
    schedule = torch.stack([row_sigmas.max(), torch.tensor(0.0)])
    guider.sample(noise, latent, sampler, schedule, disable_pbar=True, seed=seed)
    return sampler.result
