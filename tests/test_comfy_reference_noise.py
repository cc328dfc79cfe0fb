"""Reference Noise (DreamCache) as ComfyUI runs it (run_node: a prompt validated and executed by ComfyUI's
executor): the node's output is the core function's, and bad widget values are refused when the
prompt is queued. Skipped (with the reason) when COMFYUI_PATH is unset."""
import math

import pytest
import torch

from run_as_comfyui import linked, run_node

pytestmark = pytest.mark.comfy  # every test here needs ComfyUI (COMFYUI_PATH)

NAN = float("nan")


@pytest.fixture(scope="module")
def node():
    from conftest import import_comfy
    import_comfy()
    from comfyui_dreamcache.nodes.reference_noise import DreamCacheReferenceNoise
    return DreamCacheReferenceNoise


def photo(batch=2, height=32, width=48, channels=3, seed=0):
    return torch.rand(batch, height, width, channels, generator=torch.Generator().manual_seed(seed))


def test_schema_as_comfyui_reads_it(node):
    from comfyui_dreamcache.nodes import io_types
    schema = node.define_schema()
    assert schema.node_id == "DreamCacheReferenceNoise"
    assert schema.display_name == "Reference Noise (DreamCache)"
    assert schema.category == io_types.CATEGORY_REFERENCE
    declared = node.INPUT_TYPES()
    assert list(declared["required"]) == ["image", "mode", "strength", "seed"]
    assert list(declared["optional"]) == ["mask"]
    assert declared["required"]["strength"][1]["min"] == 0.0 and declared["required"]["strength"][1]["max"] == 1.0
    assert declared["required"]["strength"][1]["default"] == 0.5
    assert declared["required"]["mode"][1]["options"] == ["gaussian", "shuffle", "fade", "blur"]
    assert declared["required"]["mode"][1]["default"] == "gaussian"
    assert declared["required"]["seed"][1]["control_after_generate"] is True
    assert list(node.RETURN_TYPES) == ["IMAGE"]


@pytest.mark.parametrize("mode", ["gaussian", "shuffle", "fade", "blur"])
def test_node_gives_the_core_functions_image(node, mode):
    from comfyui_dreamcache.dreamcache_core.masking.reference_noise import noised_reference
    image = photo()
    (out,) = run_node(node, image, mode, 0.6, 123)
    assert out.shape == image.shape and out.dtype == image.dtype
    assert torch.equal(out, noised_reference(image, mode, 0.6, 123))
    assert not torch.equal(out, image)
    (again,) = run_node(node, image, mode, 0.6, 123)
    assert torch.equal(again, out)


def test_node_with_mask_alpha_and_strength_0(node):
    from comfyui_dreamcache.dreamcache_core.masking.reference_noise import noised_reference
    image = photo(batch=1, channels=4, seed=3)
    mask = torch.zeros(1, 32, 48)
    mask[:, 8:24, 12:36] = 1.0
    (out,) = run_node(node, image, "gaussian", 0.5, 7, mask=mask)
    assert torch.equal(out, noised_reference(image, "gaussian", 0.5, 7, mask))
    assert torch.equal(out[..., 3], image[..., 3])
    assert torch.equal(out[:, mask[0] == 0], image[:, mask[0] == 0])
    difference = (out - image)[:, mask[0] > 0, :3]
    assert 0.3 < float(difference.std()) < 0.5  # noise of std 0.5, a little less where 0..1 clamps it
    (unchanged,) = run_node(node, image, "blur", 0.0, 7)
    assert torch.equal(unchanged, image)


def test_output_of_one_node_feeds_the_next(node):
    """In a prompt the input is an inference tensor made by the previous node."""
    with torch.inference_mode():
        image = photo(seed=5) * 1.0
    (once,) = run_node(node, image, "fade", 0.5, 0)
    (twice,) = run_node(node, once, "fade", 1.0, 0)
    torch.testing.assert_close(once, 0.5 * image + 0.25, rtol=0, atol=1e-7)
    assert torch.equal(twice, torch.full_like(image, 0.5))


OWN_CHECK = r"ComfyUI refuses the prompt: DreamCacheReferenceNoise\.validate_inputs says "


@pytest.mark.parametrize("inputs, match", [
    (dict(strength=1.5), OWN_CHECK + r"'strength is 1\.5, outside its range"),
    (dict(strength=-0.01), OWN_CHECK + r"'strength is -0\.01, outside its range"),
    (dict(seed=-1), OWN_CHECK + r"'seed is -1, outside its range"),
    (dict(strength=NAN), OWN_CHECK + r"'strength is nan, not a finite number\. Set it to a finite number between 0 "
                                     r"and 1\. Its default is 0\.5\.'"),
    (dict(mode="noise"), OWN_CHECK + r"\"mode: Reference Noise mode is 'noise', which is not a mode\. Choose one of "
                                     r"'gaussian', 'shuffle', 'fade', 'blur'\.\""),
])
def test_bad_widget_values_are_refused_when_the_prompt_is_queued(node, inputs, match):
    """Out of range, NaN and an unknown mode: refused by validate_inputs (ComfyUI leaves the schema's min/max of
    the inputs validate_inputs names to it)."""
    arguments = dict(image=photo(), mode="gaussian", strength=0.5, seed=0)
    arguments.update(inputs)
    with pytest.raises(ValueError, match=match):
        run_node(node, **arguments)


def test_validate_inputs_called_as_comfyui_calls_it(node):
    assert node.validate_inputs() is True  # every widget linked: checked when the node runs
    assert node.validate_inputs(mode="shuffle", strength=1.0, seed=0xffffffffffffffff) is True
    assert node.validate_inputs(strength=2.0) == ("strength is 2.0, outside its range. Set it to a number between 0 "
                                                  "and 1. Its default is 0.5.")
    assert node.validate_inputs(strength=-0.5).startswith("strength is -0.5, outside its range")
    assert node.validate_inputs(seed=-1).startswith("seed is -1, outside its range")
    assert node.validate_inputs(seed=2 ** 64).startswith("seed is 18446744073709551616, outside its range")
    both = node.validate_inputs(strength=math.inf, mode="grain")
    assert both.splitlines()[0].startswith("strength is inf, not a finite number")
    assert both.splitlines()[1].startswith("mode: Reference Noise mode is 'grain'")


def test_linked_bad_values_are_refused_when_the_node_runs(node):
    """A linked value skips validate_inputs; the node's own code refuses it."""
    with pytest.raises(ValueError, match=r"strength is nan, not a finite number"):
        run_node(node, photo(), "gaussian", linked(NAN), 0)
    with pytest.raises(ValueError, match=r"The Reference Noise image holds 1 NaN value\(s\)"):
        image = photo()
        image[0, 0, 0, 0] = NAN
        run_node(node, image, "gaussian", 0.5, 0)
    with pytest.raises(ValueError, match=r"The Reference Noise mask has shape \[1, 16, 16\] but the image is 48x32"):
        run_node(node, photo(), "blur", 0.5, 0, mask=torch.ones(1, 16, 16))
