"""The one place where dreamcache_core reaches ComfyUI.

Every ComfyUI import in the core happens in this package, inside functions, so the rest of the core stays
importable (and testable) without ComfyUI (tests/test_core_layout.py holds every other core module to that).
Inside ComfyUI the modules are already importable; command-line runners call ``ensure_comfyui()`` first,
which finds the checkout from an explicit path, ``COMFYUI_PATH``, or the ``custom_nodes`` folder the pack
sits in.

- checkout: find ComfyUI, set its options before ``comfy`` loads
- model_pass: one model call through ComfyUI's guider, each row at its own sigma (Encode, training, benchmark)
- reference_encoding: Encode DreamCache's pass and its checks
- attention: the memory attention through ComfyUI's optimized attention
- injection_builder: an injection for a ComfyUI model (ComfyUI's attention, the adapter handed to its memory
  manager)
- injection_patches: an injection's attention patches and row-sigma wrapper on a ModelPatcher, and off again
- combined_guider: the DreamCache Guider's GUIDER
- models: checkpoints, U-Nets from configs, seeded random models, the adapter as a ModelPatcher
- sampling: noise, KSampler-path sampling, a timed Euler sampler, version info
"""
from .attention import comfy_memory_attention
from .checkout import ensure_comfyui, find_comfyui
from .combined_guider import combined_guider, combined_guider_class
from .model_pass import ModelPass, single_model_pass
from .injection_builder import build_injection, build_injections, hand_to_memory_manager
from .injection_patches import attach_injection, without_dreamcache_patches
from .models import adapter_model_patcher
from .reference_encoding import ENCODE_TIMESTEP, check_latent_size, encode_reference, encode_sigma

__all__ = ["ENCODE_TIMESTEP", "ModelPass", "adapter_model_patcher", "attach_injection", "build_injection",
           "build_injections", "check_latent_size", "combined_guider", "combined_guider_class", "comfy_memory_attention",
           "encode_reference", "encode_sigma", "ensure_comfyui", "find_comfyui", "hand_to_memory_manager",
           "single_model_pass", "without_dreamcache_patches"]
