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
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

from .adapter import DreamCacheAdapter, multihead_attention
from .cache import DreamCache, check_reference_weights
from .controls import REFERENCE_MODES, prepare_region_mask, region_token_weights, token_grid
from .normal_tensors import normal_tensors, parameters_state
from .schedules import FrameWeights, StepSchedule, float32

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
        self._region_memo: dict = {}  # (device, height, width) -> (token weights, covered tokens per mask)
        self._index_memo: dict = {}  # (device, indices) -> long tensor of the indices on that device
        self._has_window = self.sigma_start != math.inf or self.sigma_end > 0
        # the window's bounds as float32, as the rows' float32 sigmas were compared with them
        self._sigma_start_f32, self._sigma_end_f32 = float32(self.sigma_start), float32(self.sigma_end)
        self.attn1_patch = DreamCacheNorm1Patch(self)
        self.attn1_output_patch = DreamCacheOutputPatch(self)

    def memory_layer_of(self, extra_options: dict) -> Optional[str]:
        if extra_options.get("block_index", 0) != 0:
            return None
        block = extra_options.get("block")
        if block is None:
            return None
        return self.layers_by_block.get((block[0], int(block[1])))

    def active_rows(self, batch: int, extra_options: dict) -> Optional[list]:
        """Indices of the rows to personalise (their chunk is included and their sigma inside the window), or
        None when no row is. Decided on the host from host values only (see ``row_sigmas``)."""
        active = [True] * batch
        if self.chunks is not None:
            chunk_ids = extra_options.get("cond_or_uncond")
            if chunk_ids:
                per_chunk = batch // len(chunk_ids)
                active = [r < per_chunk * len(chunk_ids) and chunk_ids[r // per_chunk] in self.chunks
                          for r in range(batch)]
        if self._has_window:
            sigma = row_sigmas(batch, extra_options)
            if sigma is not None:
                active = [a and self._sigma_end_f32 <= s <= self._sigma_start_f32 for a, s in zip(active, sigma)]
        rows = [r for r, a in enumerate(active) if a]
        return rows or None

    def row_scales(self, batch: int, extra_options: dict) -> Optional[list]:
        """[batch] floats (float32 values): the step schedule's factor at each row's sigma times the frame weight
        of the row's image; None when neither is set (every factor 1)."""
        if self.step_schedule is None and self.frame_weights is None:
            return None
        scales = [1.0] * batch
        sigma = row_sigmas(batch, extra_options)
        if self.step_schedule is not None and sigma is not None:
            scales = self.step_schedule.factors_of(sigma)
        if self.frame_weights is not None:
            images = images_in_batch(batch, extra_options)
            weights = [float32(w) for w in self.frame_weights.for_frames(images)]
            scales = [float32(s * weights[r % images]) for r, s in enumerate(scales)]
        return scales

    def plan(self, key: str, batch: int, extra_options: dict) -> Optional["LayerPlan"]:
        """Which rows of this memory layer's call are personalised and how strongly, or None when none is.

        Pure host arithmetic on host values: it never reads a device tensor (the rows' sigmas come from
        ``row_sigmas``), so deciding costs the U-Net call no device-to-host transfer."""
        strength = self.strength * self.layer_strengths.get(key, 1.0)
        if strength == 0:
            return None
        rows = self.active_rows(batch, extra_options)
        if rows is None:
            return None
        scales = self.row_scales(batch, extra_options)
        row_strengths = None
        if scales is not None:
            rows = [r for r in rows if scales[r] != 0]
            if not rows:
                return None
            row_strengths = [float32(scales[r] * float32(strength)) for r in rows]  # as float32 tensors multiply
        return LayerPlan(key, batch, rows, strength, row_strengths, images_in_batch(batch, extra_options))

    def device_index(self, values: Sequence[int], device) -> torch.Tensor:
        """A long tensor of ``values`` on ``device``, made once per (device, values): a host-to-device copy, never
        the other way."""
        memo_key = (str(device), tuple(values))
        found = self._index_memo.get(memo_key)
        if found is None:
            if len(self._index_memo) > 256:
                self._index_memo.clear()
            with normal_tensors():
                found = torch.tensor(list(values), dtype=torch.long, device=device)
            self._index_memo[memo_key] = found
        return found

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

    def region_weights(self, height: int, width: int, device) -> tuple:
        """(token weights [M, height*width] float32 on ``device``, for each mask the host list of the tokens it
        covers) of the region mask at this grid, memoised per device and grid."""
        memo_key = (str(device), height, width)
        found = self._region_memo.get(memo_key)
        if found is None:
            with normal_tensors():  # may be saved for backward when training through a region
                weights = region_token_weights(self.region_mask, height, width)
                covered = [frozenset(torch.nonzero(row).flatten().tolist()) for row in weights]
                found = (weights.to(device), covered)
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
        self._index_memo = {k: v for k, v in self._index_memo.items() if keep is not None and k[0] == keep}
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


ROW_SIGMAS_KEY = "dreamcache_row_sigmas"  # transformer_options entry: the host list of each row's sigma


def row_sigmas(batch: int, extra_options: dict) -> Optional[list]:
    """The sigma of each of the ``batch`` rows of this U-Net call as host floats, or None when the call carries none.

    ``record_row_sigmas`` (registered with the patches) reads the step's sigmas to the host once per model call,
    before the U-Net runs, and leaves them under ``ROW_SIGMAS_KEY``; only without it are ComfyUI's ``sigmas``
    read here (a device-to-host transfer inside the U-Net call). ComfyUI gives one sigma per image, per row, or
    one for all; rows are stacked chunk after chunk, so row r belongs to image r % images."""
    sigma = extra_options.get(ROW_SIGMAS_KEY)
    if sigma is None:
        sigmas = extra_options.get("sigmas")
        if sigmas is None:
            return None
        sigma = sigmas.detach().float().reshape(-1).tolist()
    if len(sigma) == batch:
        return list(sigma)
    if len(sigma) == 0 or batch % len(sigma):
        raise ValueError(f"The U-Net call has {batch} rows but {len(sigma)} sigmas; DreamCache cannot tell each "
                         "row's noise level.")
    return [sigma[r % len(sigma)] for r in range(batch)]


def record_row_sigmas(executor, x, t, *args, **kwargs):
    """ComfyUI apply_model wrapper: the transformer options of one model call, made once before the U-Net runs.

    - The rows' sigmas ``t`` are read to the host and handed to the patches, so that deciding which rows to
      personalise costs the U-Net call no device-to-host transfer (one read per call instead of one per memory
      layer, and none while the U-Net's kernels are queued).
    - The pack's attn1 patches are nested outside every other pack's (``nested_outermost``), whatever order the
      nodes were applied in.
    """
    options_at = 4  # apply_model(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    if len(args) > options_at - 1:
        options = call_options(args[options_at - 1], t)
        args = args[:options_at - 1] + (options,) + args[options_at:]
    else:
        kwargs["transformer_options"] = call_options(kwargs.get("transformer_options"), t)
    return executor(x, t, *args, **kwargs)


def call_options(transformer_options, t) -> dict:
    """A copy of one model call's transformer options with the rows' sigmas and the pack's patches outermost."""
    options = nested_outermost(dict(transformer_options or {}))
    options[ROW_SIGMAS_KEY] = t.detach().float().reshape(-1).tolist()
    return options


def nested_outermost(options: dict) -> dict:
    """``options`` with the pack's attn1_patch entries first and its attn1_output_patch entries last (each
    kind's other entries keep their order; the lists are copies).

    ComfyUI runs both lists in registration order, so a pair that changes the self-attention's token layout
    (Token Merging merges the queries, HyperTile cuts them into tiles, each undoing it in its output patch)
    would otherwise sit between the norm1(x) the pack keeps and the attention output it adapts. Outermost, the
    adapter always sees the block's own layout, which is the layout it was trained on."""
    patches = options.get("patches")
    if not patches:
        return options
    ours_first = patches.get("attn1_patch", [])
    ours_last = patches.get("attn1_output_patch", [])
    if not any(isinstance(p, (DreamCacheNorm1Patch, DreamCacheOutputPatch)) for p in ours_first + ours_last):
        return options
    patches = dict(patches)
    if ours_first:
        patches["attn1_patch"] = ([p for p in ours_first if isinstance(p, DreamCacheNorm1Patch)]
                                  + [p for p in ours_first if not isinstance(p, DreamCacheNorm1Patch)])
    if ours_last:
        patches["attn1_output_patch"] = ([p for p in ours_last if not isinstance(p, DreamCacheOutputPatch)]
                                         + [p for p in ours_last if isinstance(p, DreamCacheOutputPatch)])
    options["patches"] = patches
    return options


@dataclass(frozen=True)
class LayerPlan:
    """What one memory layer's call does: ``rows`` of the ``batch`` are personalised, each with ``strength``
    or, when the schedules give rows their own, ``row_strengths`` (one per row of ``rows``)."""
    key: str
    batch: int
    rows: list
    strength: float
    row_strengths: Optional[list]
    images: int

    @property
    def every_row(self) -> bool:
        return len(self.rows) == self.batch


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


@dataclass(frozen=True)
class OutputPlan:
    """Which rows and tokens of one self-attention output change, and how strongly: the layer's ``LayerPlan``
    with its device indices (``row_index``: the rows, None = every row; ``tokens``: the region's tokens, None =
    every token; ``token_rows``: the rows the tokens are written back to) and ``blend``: per-row or per-token
    strengths [rows, tokens or 1, 1] in a1's dtype, or None when every changed value takes ``layer.strength``.
    ``n`` is the layer's norm1(x), kept by the attn1 patch."""
    layer: LayerPlan
    n: torch.Tensor
    row_index: Optional[torch.Tensor]
    tokens: Optional[torch.Tensor]
    token_rows: Optional[torch.Tensor]
    blend: Optional[torch.Tensor]

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """The planned rows and tokens of ``x`` (a1 or n)."""
        rows = x if self.row_index is None else x[self.row_index]
        return rows if self.tokens is None else rows[:, self.tokens]

    def blended(self, a1_part: torch.Tensor, adapted: torch.Tensor) -> torch.Tensor:
        """a1 + s (adapted - a1) with the planned strengths; a strength of 1 gives ``adapted`` exactly, 0 ``a1``."""
        if self.blend is not None:  # per-token or per-row strength; lerp at 1 gives adapted exactly
            return torch.where(self.blend != 0, torch.lerp(a1_part, adapted, self.blend), a1_part)
        if self.layer.strength != 1.0:
            return a1_part + self.layer.strength * (adapted - a1_part)
        return adapted

    def written_back(self, a1: torch.Tensor, changed: torch.Tensor) -> torch.Tensor:
        """``a1`` with the planned rows and tokens replaced by ``changed`` (a1 itself is left as it is)."""
        if self.row_index is None and self.tokens is None:
            return changed
        out = a1.clone()
        if self.tokens is None:
            out[self.row_index] = changed
        else:
            out[self.token_rows[:, None], self.tokens[None, :]] = changed
        return out


class DreamCacheOutputPatch:
    """attn1_output_patch: a1 -> a1 + s * (adapter(n, a1, memory) - a1) on the active rows (and, with a region
    mask, on the tokens it covers, each with its own s); everything else is returned bit for bit.

    Each call is a plan (``plan``: which rows and tokens, how strongly; None when nothing changes) and a
    straight apply (``apply``: memory -> adapter -> blend -> write back)."""

    def __init__(self, injection: DreamCacheInjection):
        self.injection = injection

    def __call__(self, a1, extra_options):
        plan = self.plan(a1, extra_options)
        return a1 if plan is None else self.apply(plan, a1)

    def plan(self, a1, extra_options: dict) -> Optional[OutputPlan]:
        """The ``OutputPlan`` of this call, or None when it leaves ``a1`` as it is (not a memory layer, no norm1(x)
        kept, no row active, or a region that covers none of this layer's tokens)."""
        injection = self.injection
        key = injection.memory_layer_of(extra_options)
        if key is None:
            return None
        n = extra_options.pop(injection.state_key, None)
        if n is None:
            return None
        if n.shape != a1.shape:
            raise RuntimeError(
                f"Apply DreamCache: at memory layer {key} another patch changed the self-attention's token layout "
                f"(norm1(x) {tuple(n.shape)}, attention output {tuple(a1.shape)}) in a way DreamCache cannot nest "
                "around. Remove that patch from this model, or apply it to a model without DreamCache.")
        layer = injection.plan(key, a1.shape[0], extra_options)
        if layer is None:
            return None
        device = a1.device
        row_index = None if layer.every_row else injection.device_index(layer.rows, device)
        tokens, token_rows, blend = None, None, None
        if injection.region_mask is not None:
            token_weights, covered = self.region_token_weights(a1, layer, extra_options)
            if not covered:
                return None
            tokens = injection.device_index(covered, device)
            token_rows = injection.device_index(range(layer.batch) if row_index is None else layer.rows, device)
            token_weights = token_weights[:, tokens] * self.row_strength_column(layer, token_weights)
            blend = token_weights.to(a1.dtype).unsqueeze(-1)
        elif layer.row_strengths is not None:
            blend = self.row_strength_column(layer, a1)[:, :, None].to(a1.dtype)
        return OutputPlan(layer, n, row_index, tokens, token_rows, blend)

    def apply(self, plan: OutputPlan, a1):
        """memory -> adapter -> blend -> write back, on the plan's rows and tokens."""
        weights, memory_k, memory_v, key_mask = self.memory_of_rows(plan.layer, a1)
        a1_part, n_part = plan.select(a1), plan.select(plan.n)
        adapted = self.injection.adapter.layer(plan.layer.key)(n_part, a1_part, memory_k, memory_v, key_mask=key_mask,
                                                              weights=weights, attention=self.injection.attention)
        return plan.written_back(a1, plan.blended(a1_part, adapted))

    def memory_of_rows(self, layer: LayerPlan, a1) -> tuple:
        """(weights, memory keys, memory values, key mask) of the layer for the planned rows: every reference, or
        with one reference per image each row's own."""
        injection = self.injection
        weights, memory_k, memory_v, key_mask = injection.layer_memory(layer.key, a1.device, a1.dtype)
        if injection.reference_mode == "per_image" and memory_k.shape[0] > 1:
            pick = injection.device_index(self.image_of_rows(layer, memory_k.shape[0]), memory_k.device)
            memory_k, memory_v = memory_k[pick], memory_v[pick]
            key_mask = None if key_mask is None else key_mask[pick]
        return weights, memory_k, memory_v, key_mask

    def row_strength_column(self, plan: LayerPlan, like: torch.Tensor) -> torch.Tensor:
        """[rows, 1] float32 strengths of the plan's rows on ``like``'s device (a host-to-device copy)."""
        if plan.row_strengths is None:
            return torch.full((len(plan.rows), 1), float32(plan.strength), dtype=torch.float32, device=like.device)
        return torch.tensor(plan.row_strengths, dtype=torch.float32, device=like.device)[:, None]

    def image_of_rows(self, plan: LayerPlan, references: int) -> list:
        """Index of the image (of the latent batch) each planned row belongs to, for one reference per image."""
        if references != plan.images:
            raise ValueError(
                f"'one reference per image' needs one reference for each image of the batch: the cache holds "
                f"{references} references but the batch has {plan.images} images. Encode as many references as "
                "images (a batch), or use 'all references shared'.")
        return [r % plan.images for r in plan.rows]

    def region_token_weights(self, a1, plan: LayerPlan, extra_options: dict) -> tuple:
        """([planned rows, tokens] float32 region weights at this layer's token grid, sorted host list of the
        tokens the planned rows' masks cover)."""
        height, width = token_grid(extra_options, a1.shape[1])
        region, covered = self.injection.region_weights(height, width, a1.device)  # [M, L]
        if region.shape[0] == 1:
            return region.expand(len(plan.rows), -1), sorted(covered[0])
        if region.shape[0] != plan.images:
            raise ValueError(f"The attention mask batch has {region.shape[0]} masks for a batch of {plan.images} "
                             "images; give one mask, or one mask per image.")
        images = [r % plan.images for r in plan.rows]
        tokens = sorted(set().union(*(covered[i] for i in images)))
        return region[self.injection.device_index(images, region.device)], tokens

    def to(self, device):
        self.injection.to(device)
        return self

    def models(self):
        return self.injection.models()
