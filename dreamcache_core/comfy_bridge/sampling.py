"""ComfyUI's sampling entry points as the runners use them (generate, the benchmarks, the toy benchmark)."""
from __future__ import annotations

import time
from typing import Callable

import torch


def prepare_noise(latent: torch.Tensor, seed: int) -> torch.Tensor:
    """The noise KSampler draws for ``latent`` with ``seed``."""
    import comfy.sample

    return comfy.sample.prepare_noise(latent, seed)


def empty_latent_for(model_patcher, latent: torch.Tensor) -> torch.Tensor:
    """An empty latent with the channel count the model works on (as KSampler fixes it)."""
    import comfy.sample

    return comfy.sample.fix_empty_latent_channels(model_patcher, latent)


def schedule_sigmas(model_patcher, scheduler: str, steps: int) -> torch.Tensor:
    import comfy.samplers

    return comfy.samplers.calculate_sigmas(model_patcher.get_model_object("model_sampling"), scheduler, steps)


def ksampler_sample(model_patcher, noise, steps: int, cfg: float, sampler_name: str, scheduler: str, positive,
                    negative, latent, seed: int) -> torch.Tensor:
    """What the stock KSampler node runs (``comfy.sample.sample``), without a progress bar."""
    import comfy.sample

    return comfy.sample.sample(model_patcher, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                               denoise=1.0, disable_pbar=True, seed=seed)


def guider_sample(guider, noise, latent, steps: int, sampler_name: str, scheduler: str, seed: int) -> torch.Tensor:
    """What SamplerCustomAdvanced runs for ``guider`` with KSampler's sigmas for ``steps``/``scheduler``."""
    import comfy.model_management
    import comfy.samplers

    model = guider.model_patcher
    ksampler = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                       scheduler=scheduler, denoise=1.0, model_options=model.model_options)
    samples = guider.sample(noise, latent, comfy.samplers.sampler_object(sampler_name), ksampler.sigmas,
                            disable_pbar=True, seed=seed)
    return samples.to(comfy.model_management.intermediate_device())


def timed_euler_sampler(synchronize: Callable[[], None], record: list):
    """A ComfyUI Sampler doing Euler steps that appends the wall time of every model call to ``record``
    (``synchronize`` waits for the device before each clock read)."""
    import comfy.samplers

    class TimedEulerSampler(comfy.samplers.Sampler):
        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                   disable_pbar=False):
            model_sampling = model_wrap.inner_model.model_sampling
            x = model_sampling.noise_scaling(sigmas[0], noise, latent_image, self.max_denoise(model_wrap, sigmas))
            s_in = x.new_ones([x.shape[0]])
            for i in range(len(sigmas) - 1):
                synchronize()
                start = time.perf_counter()
                denoised = model_wrap(x, sigmas[i] * s_in, **extra_args)
                synchronize()
                record.append(time.perf_counter() - start)
                d = (x - denoised) / sigmas[i]
                x = x + d * (sigmas[i + 1] - sigmas[i])
            return x

    return TimedEulerSampler()


def sample_timed(model_patcher, positive, negative, latent, sigmas, cfg: float, seed: int,
                 synchronize: Callable[[], None]) -> list:
    """One sampling run through CFGGuider (what KSampler uses); the time of each model call (each step)."""
    import comfy.samplers

    record: list = []
    guider = comfy.samplers.CFGGuider(model_patcher)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    noise = prepare_noise(latent, seed)
    with torch.no_grad():
        guider.sample(noise, latent, timed_euler_sampler(synchronize, record), sigmas, disable_pbar=True, seed=seed)
    return record


def comfyui_environment() -> dict:
    """ComfyUI's version, device and attention (what a result record names); "unknown" where not known."""
    info = {}
    try:
        import comfy.ldm.modules.attention as attention
        import comfy.model_management

        info["device"] = str(comfy.model_management.get_torch_device())
        info["attention"] = f"ComfyUI attention {attention.optimized_attention.__name__}"
        import comfyui_version

        info["comfyui"] = comfyui_version.__version__
    except Exception:  # ComfyUI not imported, or without comfyui_version.py
        info.setdefault("comfyui", "unknown")
        info.setdefault("attention", "attention unknown")
    return info
