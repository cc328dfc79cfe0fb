"""The attention patch callables that inject a DreamCache into ComfyUI's U-Net.

ComfyUI's patch protocol (comfy/ldm/modules/attention.py, BasicTransformerBlock): ``attn1_patch(n, context, value,
extra_options)`` sees n = norm1(x) before self-attention and
``attn1_output_patch(a1, extra_options)`` sees the self-attention output; both
get the same ``extra_options`` dict within one transformer-block call, so the
first leaves n there for the second.

The output patch replaces a1 by a1 + s * (adapter(n, a1, memory) - a1) on the
batch rows that are active (their chunk is included and the step's sigma lies
inside [sigma_end, sigma_start]); every other row, layer and block is returned
bit for bit as it came. Training and inference use these same objects.

Artist controls (see ``controls`` and ``schedules``): s is the global strength times the
layer's weight (``layer_strengths``), times the step schedule's factor at the step's sampling
percent and the frame weight of the row's image (rows whose product is 0 stay bit for bit);
a region mask limits the change to the tokens it covers (uncovered tokens are
returned bit for bit); the memory is either shared by every image (the union of
all references, each with its relative weight as a log bias on its keys) or one
reference per image of the batch.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch

from .adapter import DreamCacheAdapter, multihead_attention
from .cache import DreamCache, check_reference_weights
from .controls import REFERENCE_MODES, prepare_region_mask, region_token_weights, token_grid
from .normal_tensors import normal_tensors, parameters_state
from .schedules import FrameWeights, StepSchedule

POSITIVE_CHUNK = 0  # index of the positive cond list in KSampler's cond_or_uncond
NEGATIVE_CHUNK = 1  # and of the negative one


class DreamCacheInjection:
    """State shared by the two patch callables of one Apply.

    adapter, cache:   what to inject (cache layers must match adapter layers)
    strength:         global s; ``layer_strengths`` multiplies it per layer key
    sigma_start/end:  active while sigma_end <= sigma <= sigma_start
    chunks:           cond_or_uncond values to personalise (None = all)
    reuse_memory_kv:  when gradients are off, W_k R and W_v R (and the cast weights) are computed once
                      per device/dtype and reused by every step; training always recomputes them
    region_mask:      optional MASK [H, W] or [1 or batch, H, W] over the generated image (1 = personalise),
                      area-resized to each layer's token grid; tokens it does not touch stay bit for bit
    reference_mode:   "shared" (every image attends to all references) or "per_image" (image i of the
                      batch attends to reference i only)
    reference_weights: relative weight per reference (shared mode); None = the cache's own weights
    step_schedule:    optional ``schedules.StepSchedule``: the strength's factor at each step's sigma
    frame_weights:    optional ``schedules.FrameWeights``: a factor per image of the latent batch
    managed_models:   ComfyUI ModelPatchers wrapping the adapter, handed to ComfyUI's memory manager by
                      ``models()`` so the adapter is loaded to and offloaded from the device with the model
    """

    def __init__(self, adapter: DreamCacheAdapter, cache: DreamCache, strength: float = 1.0,
                 sigma_start: float = math.inf, sigma_end: float = 0.0, chunks: Optional[Iterable[int]] = (POSITIVE_CHUNK,),
                 layer_strengths: Optional[dict] = None, reuse_memory_kv: bool = True, attention=multihead_attention,
                 region_mask: Optional[torch.Tensor] = None, reference_mode: str = "shared",
                 reference_weights: Optional[Iterable[float]] = None, managed_models: Iterable = (),
                 step_schedule: Optional[StepSchedule] = None, frame_weights: Optional[FrameWeights] = None):
        if not adapter.norm_folded:
            raise ValueError("The adapter's LN_m is not folded against the base model yet (authors' checkpoint); "
                             "Apply DreamCache folds it when given the model.")
        if reference_mode not in REFERENCE_MODES:
            raise ValueError(f"reference_mode must be one of {list(REFERENCE_MODES)}, got {reference_mode!r}.")
        unknown = sorted(set(layer_strengths or {}) - set(adapter.specs))
        if unknown:
            raise ValueError(f"Layer weights name {unknown}, which are not memory layers of this adapter "
                             f"({sorted(adapter.specs)}).")
        self.adapter = adapter
        self.cache = cache
        self.strength = float(strength)
        self.sigma_start = float(sigma_start)
        self.sigma_end = float(sigma_end)
        self.chunks = None if chunks is None else frozenset(int(c) for c in chunks)
        self.layer_strengths = dict(layer_strengths or {})
        self.reuse_memory_kv = reuse_memory_kv
        self.attention = attention
        self.layers_by_block = {spec.block: key for key, spec in adapter.specs.items()}
        self.state_key = f"dreamcache_norm1_{id(self)}"
        self.region_mask = prepare_region_mask(region_mask)
        self.reference_mode = reference_mode
        self.reference_weights = (None if reference_weights is None
                                  else check_reference_weights(list(reference_weights), cache.num_references))
        self.managed_models = list(managed_models)
        self.step_schedule = step_schedule
        self.frame_weights = frame_weights
        self._memo: dict = {}  # (device, layer key, dtype) -> (parameter state, weights, K, V, key mask)
        self._region_memo: dict = {}  # (device, height, width) -> token weights
        self.attn1_patch = DreamCacheNorm1Patch(self)
        self.attn1_output_patch = DreamCacheOutputPatch(self)

    def memory_layer_of(self, extra_options: dict) -> Optional[str]:
        if extra_options.get("block_index", 0) != 0:
            return None
        block = extra_options.get("block")
        if block is None:
            return None
        return self.layers_by_block.get((block[0], int(block[1])))

    def active_rows(self, batch: int, extra_options: dict) -> Optional[torch.Tensor]:
        """Bool [batch] of rows to personalise, or None when no row is."""
        active = torch.ones(batch, dtype=torch.bool)
        if self.chunks is not None:
            chunk_ids = extra_options.get("cond_or_uncond")
            if chunk_ids:
                per_chunk = batch // len(chunk_ids)
                active &= torch.tensor([c in self.chunks for c in chunk_ids]).repeat_interleave(per_chunk)
        sigma = row_sigmas(batch, extra_options)
        if sigma is not None and (self.sigma_start != math.inf or self.sigma_end > 0):
            active &= (sigma <= self.sigma_start) & (sigma >= self.sigma_end)
        return active if bool(active.any()) else None

    def row_scales(self, batch: int, extra_options: dict) -> Optional[torch.Tensor]:
        """Float32 [batch]: the step schedule's factor at each row's sigma times the frame weight of the row's
        image; None when neither is set (every factor 1)."""
        if self.step_schedule is None and self.frame_weights is None:
            return None
        scales = torch.ones(batch)
        sigma = row_sigmas(batch, extra_options)
        if self.step_schedule is not None and sigma is not None:
            scales = scales * self.step_schedule.factors(sigma)
        if self.frame_weights is not None:
            images = images_in_batch(batch, extra_options)
            weights = torch.tensor(self.frame_weights.for_frames(images), dtype=torch.float32)
            scales = scales * weights[torch.arange(batch) % images]
        return scales

    def _memory_tokens(self, key: str, device, dtype):
        """(tokens [1 or N, L, C], key mask or bias [1 or N, L] or None) in this injection's reference mode."""
        if self.reference_mode == "per_image":
            return self.cache.per_reference_tokens(key, device, dtype)
        return self.cache.weighted_memory_tokens(key, self.reference_weights, device, dtype)

    def layer_memory(self, key: str, device, dtype):
        """(weights dict, memory keys, memory values, key mask or bias) for layer ``key`` on ``device``/``dtype``.

        Shared mode: keys/values [1, L, inner] (all references), bias [1, L] of log reference weights or None.
        Per-image mode: [N, Lmax, inner] (one memory per reference), bool key mask [N, Lmax] or None.
        """
        layer = self.adapter.layer(key)
        if torch.is_grad_enabled() or not self.reuse_memory_kv:
            weights = layer.runtime_weights(dtype, device)
            tokens, key_mask = self._memory_tokens(key, device, dtype)
            k, v = layer.project_memory(tokens, weights)
            return weights, k, v, key_mask
        state = parameters_state(layer)
        memo_key = (str(device), key, dtype)
        found = self._memo.get(memo_key)
        if found is None or found[0] != state:
            with normal_tensors():  # usable outside the prompt's inference mode too
                weights = {k: t.detach() for k, t in layer.runtime_weights(dtype, device).items()}
                tokens, key_mask = self._memory_tokens(key, device, dtype)
                k, v = layer.project_memory(tokens, weights)
            found = (state, weights, k, v, key_mask)
            self._memo[memo_key] = found
        return found[1], found[2], found[3], found[4]

    def region_weights(self, height: int, width: int, device) -> torch.Tensor:
        """[M, height*width] float32 token weights of the region mask at this grid, on ``device`` (memoised)."""
        memo_key = (str(device), height, width)
        found = self._region_memo.get(memo_key)
        if found is None:
            with normal_tensors():  # may be saved for backward when training through a region
                found = region_token_weights(self.region_mask, height, width).to(device)
            self._region_memo[memo_key] = found
        return found

    def to(self, device_or_dtype):
        """ComfyUI calls this with the load device (and the model's dtype) when the model is loaded, and with
        the offload device when it is unloaded: copies on any other device are dropped then (the memory
        keys/values, the cache tokens, the region weights), so nothing stays on a GPU the model has left.
        Copies are made lazily, once per device/dtype."""
        if isinstance(device_or_dtype, torch.device):
            self.release_device_copies(keep_device=device_or_dtype)
        return self

    def release_device_copies(self, keep_device=None):
        keep = None if keep_device is None else str(keep_device)
        self._memo = {k: v for k, v in self._memo.items() if keep is not None and k[0] == keep}
        self._region_memo = {k: v for k, v in self._region_memo.items() if keep is not None and k[0] == keep}
        self.cache.release_device_copies(keep_device)

    def models(self):
        """ModelPatchers ComfyUI's memory manager loads and offloads with the model (the adapter's). The adapter's
        one patcher may be shared by several Apply nodes: it is sized here, when ComfyUI asks before loading, with
        what this injection handed over (``managed_size``)."""
        for patcher in self.managed_models:
            if getattr(self, "managed_size", None):
                patcher.size = self.managed_size
        return list(self.managed_models)

    def memory_kv_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of the memory keys and values a sampling run keeps at ``dtype`` (every layer, every token)."""
        size = torch.empty((), dtype=dtype).element_size()
        return sum(sum(self.cache.token_counts(key)) * 2 * spec.heads * spec.dim_head * size
                   for key, spec in self.adapter.specs.items())

    def device_memory_bytes(self, dtype: torch.dtype) -> int:
        """What sampling holds on the device beyond the adapter's weights: the memory keys and values and the
        memory tokens they are projected from, at ``dtype`` (every reference, every token: the worst case)."""
        size = torch.empty((), dtype=dtype).element_size()
        tokens = sum(sum(self.cache.token_counts(key)) * spec.channels * size for key, spec in self.adapter.specs.items())
        return self.memory_kv_bytes(dtype) + tokens


def row_sigmas(batch: int, extra_options: dict) -> Optional[torch.Tensor]:
    """Float32 [batch] on the CPU: the sigma of each row of this U-Net call (ComfyUI passes one per row, or one
    for all); None when the call carries none."""
    sigmas = extra_options.get("sigmas")
    if sigmas is None:
        return None
    sigma = sigmas.detach().float().cpu().reshape(-1)
    return sigma.expand(batch) if sigma.numel() == 1 else sigma


def images_in_batch(batch: int, extra_options: dict) -> int:
    """Images of the latent batch in a U-Net call of ``batch`` rows (ComfyUI stacks one copy per cond chunk)."""
    chunk_ids = extra_options.get("cond_or_uncond") or [0]
    return max(batch // len(chunk_ids), 1)


class DreamCacheNorm1Patch:
    """attn1_patch: leave n = norm1(x) of memory-layer block 0 for the output patch."""

    def __init__(self, injection: DreamCacheInjection):
        self.injection = injection

    def __call__(self, n, context_attn1, value_attn1, extra_options):
        if self.injection.memory_layer_of(extra_options) is not None:
            extra_options[self.injection.state_key] = n
        return n, context_attn1, value_attn1

    def to(self, device):
        self.injection.to(device)
        return self

    def models(self):
        return []


class DreamCacheOutputPatch:
    """attn1_output_patch: a1 -> a1 + s * (adapter(n, a1, memory) - a1) on the active rows (and, with a region
    mask, on the tokens it covers, each with its own s); everything else is returned bit for bit."""

    def __init__(self, injection: DreamCacheInjection):
        self.injection = injection

    def __call__(self, a1, extra_options):
        injection = self.injection
        key = injection.memory_layer_of(extra_options)
        if key is None:
            return a1
        n = extra_options.pop(injection.state_key, None)
        if n is None:
            return a1
        strength = injection.strength * injection.layer_strengths.get(key, 1.0)
        if strength == 0:
            return a1
        rows = injection.active_rows(a1.shape[0], extra_options)
        if rows is None:
            return a1
        scales = injection.row_scales(a1.shape[0], extra_options)
        if scales is not None:
            rows &= scales != 0
            if not bool(rows.any()):
                return a1
            scales = scales[rows] * strength  # the strength of each active row
        weights, memory_k, memory_v, key_mask = injection.layer_memory(key, a1.device, a1.dtype)
        row_index = None if bool(rows.all()) else rows.nonzero().flatten().to(a1.device)
        a1_rows = a1 if row_index is None else a1[row_index]
        n_rows = n if row_index is None else n[row_index.to(n.device)]
        if injection.reference_mode == "per_image" and memory_k.shape[0] > 1:
            pick = self.image_of_rows(a1.shape[0], rows, extra_options, memory_k.shape[0]).to(memory_k.device)
            memory_k, memory_v = memory_k[pick], memory_v[pick]
            key_mask = None if key_mask is None else key_mask[pick]
        tokens, blend = None, None
        if injection.region_mask is not None:
            token_weights = self.region_token_weights(a1, rows, extra_options)
            token_weights = token_weights * strength if scales is None else token_weights * scales[:, None]
            tokens = (token_weights != 0).any(0).nonzero().flatten()
            if tokens.numel() == 0:
                return a1
            a1_rows, n_rows = a1_rows[:, tokens], n_rows[:, tokens.to(n.device)]
            blend = token_weights[:, tokens].to(a1.dtype).unsqueeze(-1)
        elif scales is not None:
            blend = scales.to(a1.device, a1.dtype)[:, None, None]
        adapted = injection.adapter.layer(key)(n_rows, a1_rows, memory_k, memory_v, key_mask=key_mask,
                                              weights=weights, attention=injection.attention)
        if blend is not None:  # per-token or per-row strength; lerp at 1 gives adapted exactly
            adapted = torch.where(blend != 0, torch.lerp(a1_rows, adapted, blend), a1_rows)
        elif strength != 1.0:
            adapted = a1_rows + strength * (adapted - a1_rows)
        if row_index is None and tokens is None:
            return adapted
        out = a1.clone()
        if tokens is None:
            out[row_index] = adapted
        else:
            rows_of = torch.arange(a1.shape[0], device=a1.device) if row_index is None else row_index
            out[rows_of[:, None], tokens[None, :]] = adapted
        return out

    def image_of_rows(self, batch: int, rows, extra_options: dict, references: int) -> torch.Tensor:
        """Index of the image (of the latent batch) each active row belongs to, for one reference per image."""
        images = images_in_batch(batch, extra_options)
        if references != images:
            raise ValueError(
                f"'one reference per image' needs one reference for each image of the batch: the cache holds "
                f"{references} references but the batch has {images} images. Encode as many references as "
                "images (a batch), or use 'all references shared'.")
        return rows.nonzero().flatten() % images

    def region_token_weights(self, a1, rows, extra_options: dict) -> torch.Tensor:
        """[active rows, tokens] float32 weights of the region mask at this layer's token grid."""
        height, width = token_grid(extra_options, a1.shape[1])
        region = self.injection.region_weights(height, width, a1.device)  # [M, L]
        active = int(rows.sum())
        if region.shape[0] == 1:
            return region.expand(active, -1)
        images = images_in_batch(a1.shape[0], extra_options)
        if region.shape[0] != images:
            raise ValueError(f"The attention mask batch has {region.shape[0]} masks for a batch of {images} images; "
                             "give one mask, or one mask per image.")
        return region[(rows.nonzero().flatten() % images).to(region.device)]

    def to(self, device):
        self.injection.to(device)
        return self

    def models(self):
        return self.injection.models()


def attach_injection(model_patcher, injection: DreamCacheInjection):
    """Register the injection's two callables on a ModelPatcher (call on a clone)."""
    model_patcher.set_model_attn1_patch(injection.attn1_patch)
    model_patcher.set_model_attn1_output_patch(injection.attn1_output_patch)
    return model_patcher
