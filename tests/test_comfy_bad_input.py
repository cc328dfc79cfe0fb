"""Bad input through the nodes as ComfyUI runs them: Encode fed an applied MODEL, queue-time
validation (V3 validate_inputs, through run_node and called directly), non-finite values that arrive through links,
and bad tensors given to the nodes. Skipped (with the reason) when COMFYUI_PATH is unset."""
import math

import pytest
import torch

from run_as_comfyui import run_node
from tiny_models import text_conditioning, tiny_setup

pytestmark = pytest.mark.comfy  # every test here needs ComfyUI (COMFYUI_PATH)

NAN, INF = float("nan"), float("inf")
LATENT = 8


@pytest.fixture(scope="module")
def env():
    setup = tiny_setup()
    from comfyui_dreamcache.nodes import apply, cache_files, combine, encode, guider, mask_reference
    reference = {"samples": torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(3))}
    (cache,) = run_node(encode.DreamCacheEncode, setup["model"], reference, text_conditioning(0), seed=0)
    return {"model": setup["model"], "reference": reference, "cache": cache, "adapter": setup["trained"],
            "Apply": apply.DreamCacheApply, "Encode": encode.DreamCacheEncode, "Guider": guider.DreamCacheGuider,
            "Combine": combine.DreamCacheCombine, "Save": cache_files.DreamCacheSave,
            "MaskReference": mask_reference.DreamCacheMaskReference, "build_injections": node_injections}


def node_injections(model, adapter, cache, chunks=(0,), **inputs):
    """What Apply DreamCache builds from its control inputs (``inputs``: named and valued as on the node)."""
    from comfyui_dreamcache.dreamcache_core.comfy_bridge import build_injections
    from comfyui_dreamcache.nodes.apply import node_controls

    return build_injections(model, adapter, cache, node_controls(**inputs), chunks=chunks)


def encode(env, model):
    return run_node(env["Encode"], model, env["reference"], text_conditioning(0), seed=0)[0]


class ScaleSelfAttention:
    """Another pack's attn1_output_patch: scales every self-attention output."""

    def __call__(self, a1, extra_options):
        return a1 * 1.5


def our_patches(model):
    patches = model.model_options.get("transformer_options", {}).get("patches", {})
    return {name: [type(p).__name__ for p in patches.get(name, [])] for name in ("attn1_patch", "attn1_output_patch")}


def test_encode_of_the_applied_model_caches_the_base_models_features_bit_for_bit(env):
    model, cache = env["model"], env["cache"]
    (applied,) = run_node(env["Apply"], model, env["adapter"], cache, 1.0, 0.0, 1.0, "positive and negative")
    again = encode(env, applied)
    assert again.keys == cache.keys
    for key in cache.keys:
        assert torch.equal(again.features[key], cache.features[key]), key
    assert our_patches(applied) == {"attn1_patch": ["DreamCacheNorm1Patch"],
                                    "attn1_output_patch": ["DreamCacheOutputPatch"]}, "Encode changed its input MODEL"
    # other packs' patches stay: the foreign patch changes the cache, and still does under Apply
    foreign = model.clone()
    foreign.set_model_attn1_output_patch(ScaleSelfAttention())
    with_foreign = encode(env, foreign)
    assert all(not torch.equal(with_foreign.features[k], cache.features[k]) for k in cache.keys[1:])
    (applied_foreign,) = run_node(env["Apply"], foreign, env["adapter"], cache, 1.0, 0.0, 1.0, "positive and negative")
    assert our_patches(applied_foreign)["attn1_output_patch"] == ["ScaleSelfAttention", "DreamCacheOutputPatch"]
    from_applied = encode(env, applied_foreign)
    for key in cache.keys:
        assert torch.equal(from_applied.features[key], with_foreign.features[key]), key


def apply_inputs(env, **changes):
    inputs = dict(model=env["model"], adapter=env["adapter"], cache=env["cache"], strength=1.0, start_percent=0.0,
                  end_percent=1.0, apply_to="positive only")
    inputs.update(changes)
    return inputs


def guider_inputs(env, **changes):
    inputs = dict(model=env["model"], adapter=env["adapter"], cache=env["cache"], positive=text_conditioning(1),
                  negative=text_conditioning(2), text_cfg=7.5, image_cfg=5.0)
    inputs.update(changes)
    return inputs


@pytest.mark.parametrize("node, inputs, match", [
    ("Apply", dict(strength=NAN), r"strength is nan, not a finite number.*between 0 and 2.*default is 1\.0"),
    ("Apply", dict(middle_weight=NAN), r"middle_weight is nan, not a finite number"),
    ("Apply", dict(start_percent=0.8, end_percent=0.2), r"start_percent \(0\.8\) is after end_percent \(0\.2\)"),
    ("Apply", dict(layer_weights="decoder=1e30"), r"layer_weights: Layer weight 'decoder=1e30' is beyond \+-100"),
    ("Apply", dict(layer_weights="output.4=nan"), r"layer_weights: Layer weight 'output.4=nan' is not finite"),
    ("Apply", dict(layer_weights="outptu.4=1"), r"'outptu.4' is not a memory layer name"),
    ("Apply", dict(layer_weights="middle 0.5"), r"has no '='"),
    ("Apply", dict(reference_weights="1e308, 1.7e308"), r"reference_weights: .*too large or too far apart"),
    ("Apply", dict(reference_weights="1, heavy"), r"reference_weights: .*numbers separated by commas"),
    ("Guider", dict(text_cfg=NAN), r"text_cfg is nan, not a finite number"),
    ("Guider", dict(image_cfg=NAN), r"image_cfg is nan, not a finite number"),
    ("Guider", dict(reference_weights="nan"), r"reference_weights: .*finite and >= 0"),
    ("Combine", dict(weight_1=NAN), r"weight_1 is nan, not a finite number"),
    ("Combine", dict(weight_1=0.0, weight_2=0.0), r"All reference weights are 0"),
    ("Save", dict(filename_prefix="dreamcache/ref\x00x"), r"filename_prefix contains a NUL character"),
])
def test_bad_widget_values_are_refused_when_the_prompt_is_queued(env, node, inputs, match):
    if node == "Apply":
        inputs = apply_inputs(env, **inputs)
    elif node == "Guider":
        inputs = guider_inputs(env, **inputs)
    elif node == "Combine":
        inputs = dict(dict(cache_1=env["cache"], cache_2=env["cache"], weight_1=1.0, weight_2=1.0), **inputs)
    else:
        inputs = dict(cache=env["cache"], **inputs)
    with pytest.raises(ValueError, match=r"ComfyUI refuses the prompt: \w+\.validate_inputs says .*" + match):
        run_node(env[node], **inputs)


def test_validate_inputs_called_as_comfyui_calls_it(env):
    """Only widget values are passed (a linked input is absent); inputs a validate_inputs names lose ComfyUI's own
    min/max check, so the node does it."""
    import inspect

    for name in ("Apply", "Guider", "Combine", "Save"):
        node = env[name]
        declared = node.INPUT_TYPES()
        names = set(declared["required"]) | set(declared.get("optional", {}))
        arguments = inspect.getfullargspec(node.validate_inputs).args[1:]
        assert set(arguments) <= names, name
        assert node.validate_inputs() is True, f"{name}: every input linked must pass"
    apply_node = env["Apply"]
    assert apply_node.validate_inputs(strength=0.5, start_percent=0.2, end_percent=0.9, reference_weights="1",
                                      middle_weight=1.0, decoder_weight=2.0, layer_weights="output.4=0.5") is True
    assert apply_node.validate_inputs(strength=5.0).startswith("strength is 5.0, outside its range")
    assert apply_node.validate_inputs(decoder_weight=INF).startswith("decoder_weight is inf, not a finite number")
    assert apply_node.validate_inputs(start_percent=0.9) is True  # end_percent linked: checked when it runs
    two = apply_node.validate_inputs(strength=NAN, layer_weights="decoder=1e30")
    assert two.count("\n") == 1 and "strength is nan" in two and "decoder=1e30" in two
    assert env["Guider"].validate_inputs(text_cfg=101.0).startswith("text_cfg is 101.0, outside its range")
    assert env["Guider"].validate_inputs(image_cfg=-INF).startswith("image_cfg is -inf, not a finite number")
    assert env["Combine"].validate_inputs(weight_1=2.0, weight_2=0.0) is True
    assert env["Save"].validate_inputs(filename_prefix="dreamcache/ref") is True


def test_non_finite_values_arriving_through_links_fail_when_the_node_runs(env):
    """A linked value skips validate_inputs; the node's own code refuses it before any sampling."""
    from comfyui_dreamcache.dreamcache_core.comfy_bridge import combined_guider
    from comfyui_dreamcache.dreamcache_core.method.guidance import REFERENCE_CHUNKS

    build = env["build_injections"]
    for name in ("strength", "start_percent", "end_percent", "middle_weight", "decoder_weight"):
        with pytest.raises(ValueError, match=f"{name} is nan, not a finite number"):
            build(env["model"], env["adapter"], env["cache"], **{name: NAN})
    (injection,) = build(env["model"], env["adapter"], env["cache"], chunks=REFERENCE_CHUNKS)
    with pytest.raises(ValueError, match="image_cfg is inf, not a finite number"):
        combined_guider(env["model"], injection, text_conditioning(1), text_conditioning(2), 7.5, INF)


def nan_at(tensor, index):
    tensor = tensor.clone()
    tensor.view(-1)[index] = NAN
    return tensor


@pytest.mark.parametrize("node, make, match", [
    ("Encode", lambda e: dict(reference={"samples": nan_at(e["reference"]["samples"], 7)}),
     r"The reference LATENT holds 1 NaN value\(s\) out of 256.*VAE Encode"),
    ("Encode", lambda e: dict(mask=torch.full((1, 64, 64), INF)), r"The Encode DreamCache mask holds 4096 infinite"),
    ("Encode", lambda e: dict(reference={"samples": torch.randn(1, 4, 2, 2)}),
     r"reference latent is 2x2, too small for this U-Net's 3 downsamplings: it needs at least 4x4 latent pixels"),
    ("MaskReference", lambda e: dict(image=nan_at(torch.rand(1, 32, 32, 3), 100), mask=torch.ones(32, 32)),
     r"The Mask Reference image holds 1 NaN value"),
    ("MaskReference", lambda e: dict(image=torch.rand(1, 32, 32, 3), mask=nan_at(torch.ones(32, 32), 0)),
     r"The Mask Reference mask holds 1 NaN value"),
    ("Apply", lambda e: dict(attn_mask=nan_at(torch.ones(1, 64, 64), 5)), r"attention mask \(attn_mask\) holds 1 NaN"),
])
def test_bad_tensors_given_to_nodes_are_refused_naming_them(env, node, make, match):
    if node == "Encode":
        inputs = dict(model=env["model"], reference=env["reference"], conditioning=text_conditioning(0), seed=0)
    elif node == "MaskReference":
        inputs = dict(size=64)
    else:
        inputs = apply_inputs(env)
    inputs.update(make(env))
    with pytest.raises(ValueError, match=match):
        run_node(env[node], **inputs)


def test_the_smallest_latent_encode_accepts_still_encodes(env):
    cache = run_node(env["Encode"], env["model"], {"samples": torch.randn(1, 4, 4, 4)}, text_conditioning(0), 0)[0]
    assert all(bool(torch.isfinite(f.float()).all()) for f in cache.features.values())
    assert math.prod(cache.features["middle_block.1"].shape[2:]) == 1
