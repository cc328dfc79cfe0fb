"""SAM: checkpoint reading, variant detection, building, segmenting, and the nodes.

No weights are downloaded: state dicts are random (or shapes only, on the meta
device).  Segmenting with a real-sized ViT-B takes 15-30 s on a small CPU, so
that test runs only with DREAMCACHE_SLOW_TESTS=1; the default suite segments
with a tiny SAM assembled from segment-anything's own classes, which runs the
same predictor code.
"""
import os
from functools import partial

import numpy as np
import pytest
import torch

from comfyui_dreamcache.dreamcache_core.masking.sam_segmenter import (
    build_sam_from_state_dict,
    detect_sam_variant,
    load_sam_checkpoint,
    segment_subject,
    strip_sam_prefix,
)

segment_anything = pytest.importorskip("segment_anything")


def meta_state_dict(variant):
    """The state dict of a SAM variant, as shapes only (meta tensors: no memory, no time)."""
    with torch.device("meta"):
        return segment_anything.sam_model_registry[variant](checkpoint=None).state_dict()


@pytest.fixture(scope="module")
def random_vit_b_state_dict():
    """A randomly initialised SAM ViT-B state dict, in float16 to halve its 360 MB."""
    torch.manual_seed(0)
    model = segment_anything.sam_model_registry["vit_b"](checkpoint=None)
    return {key: value.half() for key, value in model.state_dict().items()}


def tiny_sam(full_mask=False):
    """A SAM with a 32-wide, one-block image encoder: the real predictor path in well under a second.

    With ``full_mask`` the mask decoder is rigged to answer "everything" for
    any prompt, so that a test can know what the segmentation is.
    """
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(0)
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=1024, patch_size=16, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=(), window_size=14, out_chans=256,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=256, mlp_dim=256, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=32,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()
    if full_mask:
        with torch.no_grad():
            last_upscaling = sam.mask_decoder.output_upscaling[-2]
            last_upscaling.weight.zero_()
            last_upscaling.bias.fill_(1.0)
            for hypernetwork in sam.mask_decoder.output_hypernetworks_mlps:
                hypernetwork.layers[-1].weight.zero_()
                hypernetwork.layers[-1].bias.fill_(1.0)
    return sam


def subject_image(height=96, width=128):
    image = torch.full((height, width, 3), 0.9)
    image[30:70, 40:90] = torch.tensor([0.1, 0.5, 0.2])
    return image


# --------------------------------------------------------------------------
# Variant detection
# --------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_detect_variant_from_weight_shapes(variant):
    assert detect_sam_variant(meta_state_dict(variant)) == variant


def test_detect_variant_through_a_key_prefix():
    prefixed = {"model." + key: value for key, value in meta_state_dict("vit_l").items()}
    assert detect_sam_variant(prefixed) == "vit_l"
    assert set(strip_sam_prefix(prefixed)) == set(meta_state_dict("vit_l"))


def test_non_sam_state_dicts_are_clear_errors():
    with pytest.raises(ValueError, match="not a Segment Anything .*first keys: layer.weight.*sam_vit_b_01ec64.pth"):
        detect_sam_variant({"layer.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="SAM 2"):
        detect_sam_variant({"image_encoder.trunk.patch_embed.proj.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="diffusion model"):
        detect_sam_variant({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)})

    missing_blocks = {key: value for key, value in meta_state_dict("vit_b").items()
                      if not key.startswith("image_encoder.blocks.11.")}
    with pytest.raises(ValueError, match="11 transformer blocks instead of 12"):
        detect_sam_variant(missing_blocks)
    odd_width = dict(meta_state_dict("vit_b"))
    odd_width["image_encoder.patch_embed.proj.weight"] = torch.zeros(384, 3, 16, 16, device="meta")
    with pytest.raises(ValueError, match="384 channels wide"):
        detect_sam_variant(odd_width)
    hq = dict(meta_state_dict("vit_b"))
    hq["mask_decoder.hf_token.weight"] = torch.zeros(1, 256, device="meta")
    with pytest.raises(ValueError, match="HQ-SAM"):
        detect_sam_variant(hq)


# --------------------------------------------------------------------------
# Reading and building
# --------------------------------------------------------------------------

class NotATensor:
    pass


def test_load_checkpoint_reads_safetensors_and_plain_torch_files(tmp_path):
    import safetensors.torch

    weights = {"image_encoder.patch_embed.proj.weight": torch.arange(6.0).view(2, 3)}
    safetensors.torch.save_file(weights, str(tmp_path / "a.safetensors"))
    torch.save({"model": weights}, str(tmp_path / "b.pth"))  # a wrapper is unwrapped
    for name in ("a.safetensors", "b.pth"):
        loaded = load_sam_checkpoint(str(tmp_path / name))
        assert set(loaded) == set(weights)
        torch.testing.assert_close(loaded["image_encoder.patch_embed.proj.weight"], weights["image_encoder.patch_embed.proj.weight"])


def test_load_checkpoint_refuses_corrupt_and_unsafe_files(tmp_path):
    (tmp_path / "corrupt.safetensors").write_bytes(os.urandom(256))
    (tmp_path / "corrupt.pth").write_bytes(os.urandom(256))
    torch.save({"weight": torch.zeros(1), "payload": NotATensor()}, str(tmp_path / "pickled.pth"))
    with pytest.raises(ValueError, match="corrupt.safetensors' could not be read as a safetensors file"):
        load_sam_checkpoint(str(tmp_path / "corrupt.safetensors"))
    with pytest.raises(ValueError, match="corrupt.pth' could not be loaded: it is corrupt"):
        load_sam_checkpoint(str(tmp_path / "corrupt.pth"))
    with pytest.raises(ValueError, match="pickled.pth' could not be loaded: it contains Python objects"):
        load_sam_checkpoint(str(tmp_path / "pickled.pth"))


def test_build_vit_b_from_a_random_state_dict(random_vit_b_state_dict):
    model = build_sam_from_state_dict(random_vit_b_state_dict)
    assert type(model).__name__ == "Sam" and not model.training
    loaded = model.state_dict()
    assert set(loaded) == set(random_vit_b_state_dict)
    for key in ("image_encoder.patch_embed.proj.weight", "mask_decoder.iou_token.weight"):
        assert loaded[key].dtype == torch.float32
        torch.testing.assert_close(loaded[key], random_vit_b_state_dict[key].float())
    assert not any(tensor.is_meta for tensor in list(model.parameters()) + list(model.buffers()))
    torch.testing.assert_close(model.pixel_mean.flatten(), torch.tensor([123.675, 116.28, 103.53]))
    assert not any(parameter.requires_grad for parameter in model.parameters())


def test_build_refuses_weights_that_do_not_fit(random_vit_b_state_dict):
    extra = dict(random_vit_b_state_dict)
    extra["mask_decoder.unexpected.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="do not fit segment-anything's vit_b model"):
        build_sam_from_state_dict(extra)


# --------------------------------------------------------------------------
# Segmenting
# --------------------------------------------------------------------------

def check_mask(mask, height, width):
    assert mask.shape == (height, width) and mask.dtype == torch.float32 and mask.device.type == "cpu"
    assert set(torch.unique(mask).tolist()) <= {0.0, 1.0}


def test_segment_subject_end_to_end_with_a_tiny_sam():
    sam = tiny_sam()
    image = subject_image()
    check_mask(segment_subject(sam, image), 96, 128)
    check_mask(segment_subject(sam, (image.numpy() * 255).astype(np.uint8), box=(40, 30, 90, 70)), 96, 128)
    full = segment_subject(tiny_sam(full_mask=True), image[..., :1])  # grey input, rigged "everything" answer
    assert torch.all(full == 1.0)


@pytest.mark.skipif(not os.environ.get("DREAMCACHE_SLOW_TESTS"), reason="set DREAMCACHE_SLOW_TESTS=1: ViT-B on CPU takes 15-30 s")
def test_segment_subject_end_to_end_with_a_random_vit_b(random_vit_b_state_dict):
    model = build_sam_from_state_dict(random_vit_b_state_dict)
    check_mask(segment_subject(model, subject_image()), 96, 128)


# --------------------------------------------------------------------------
# The nodes, called as ComfyUI calls them
# --------------------------------------------------------------------------

@pytest.mark.comfy
@pytest.mark.parametrize("choice", ["auto", "gpu", "cpu"])
def test_sam_is_a_model_patcher_that_comfyui_loads(comfy, choice):
    """The SAM_MODEL holds a ModelPatcher with the loader's devices; segmenting loads it with load_models_gpu, so
    ComfyUI's memory manager (not the node) decides when it leaves the compute device."""
    import comfy.model_management
    import comfy.model_patcher
    from comfyui_dreamcache.nodes.mask_reference import DreamCacheMaskReference
    from comfyui_dreamcache.nodes.sam_loader import DreamCacheSamModel, resolve_sam_devices

    compute, storage = resolve_sam_devices(choice)
    expected = {"auto": (comfy.model_management.get_torch_device(), comfy.model_management.unet_offload_device()),
                "gpu": (comfy.model_management.get_torch_device(),) * 2,
                "cpu": (torch.device("cpu"),) * 2}[choice]
    assert (compute, storage) == expected
    sam_model = DreamCacheSamModel(tiny_sam(full_mask=True), "tiny", compute, storage)
    patcher = sam_model.patcher
    assert isinstance(patcher, comfy.model_patcher.ModelPatcher)
    assert (patcher.load_device, patcher.offload_device) == (compute, storage)
    assert patcher.model.sam is sam_model.sam
    comfy.model_management.unload_all_models()
    _, mask = call_node(DreamCacheMaskReference, image=subject_image().unsqueeze(0), size=64, sam_model=sam_model)
    assert mask.shape == (1, 64, 64) and mask.max() == 1.0
    assert any(loaded.model is patcher for loaded in comfy.model_management.current_loaded_models)
    assert next(sam_model.sam.parameters()).device == compute
    comfy.model_management.unload_all_models()
    assert next(sam_model.sam.parameters()).device == storage


def call_node(node_class, **inputs):
    from run_as_comfyui import run_node
    return run_node(node_class, **inputs)


@pytest.fixture
def sams_folder(comfy, tmp_path, monkeypatch):
    """A temporary ``sams`` model folder registered with folder_paths (and unregistered after)."""
    import folder_paths
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "sams", ([str(tmp_path)], set(folder_paths.supported_pt_extensions)))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return tmp_path


@pytest.mark.comfy
def test_sam_loader_node_declaration(comfy):
    from comfyui_dreamcache import nodes as pack_nodes
    from comfyui_dreamcache.nodes.sam_loader import DreamCacheSAMLoader
    from node_contract import in_pack_category
    import folder_paths

    assert "sams" in folder_paths.folder_names_and_paths
    assert pack_nodes.NODE_CLASS_MAPPINGS["DreamCacheSAMLoader"] is DreamCacheSAMLoader
    assert pack_nodes.NODE_DISPLAY_NAME_MAPPINGS["DreamCacheSAMLoader"] == "Load SAM Model (DreamCache)"
    required = DreamCacheSAMLoader.INPUT_TYPES()["required"]
    assert list(required) == ["model_name", "device"]
    assert required["device"][1]["options"] == ["auto", "cpu", "gpu"]
    assert all(options.get("tooltip") for _, options in required.values())
    assert tuple(DreamCacheSAMLoader.RETURN_TYPES) == ("SAM_MODEL",)
    assert len(DreamCacheSAMLoader.OUTPUT_TOOLTIPS) == 1
    assert in_pack_category(DreamCacheSAMLoader.CATEGORY) and DreamCacheSAMLoader.DESCRIPTION


@pytest.mark.parametrize("file_name", ["sam_vit_b_random.safetensors", "sam_vit_b_random.pth"])
@pytest.mark.comfy
def test_sam_loader_loads_a_vit_b_file(sams_folder, random_vit_b_state_dict, file_name):
    import safetensors.torch
    from comfyui_dreamcache.nodes.sam_loader import DreamCacheSAMLoader, DreamCacheSamModel

    path = str(sams_folder / file_name)
    if file_name.endswith(".safetensors"):
        safetensors.torch.save_file(random_vit_b_state_dict, path)
    else:
        torch.save(random_vit_b_state_dict, path)
    (sams_folder / "readme.txt").write_text("not a model")

    assert DreamCacheSAMLoader.INPUT_TYPES()["required"]["model_name"][1]["options"] == [file_name]
    (sam_model,) = call_node(DreamCacheSAMLoader, model_name=file_name, device="cpu")
    assert isinstance(sam_model, DreamCacheSamModel)
    assert sam_model.variant == "vit_b" and sam_model.name == file_name
    assert sam_model.compute_device.type == "cpu" and sam_model.storage_device.type == "cpu"
    assert next(sam_model.sam.parameters()).device.type == "cpu"
    (auto_model,) = call_node(DreamCacheSAMLoader, model_name=file_name, device="auto")
    assert auto_model.compute_device.type == "cpu"  # the tests run ComfyUI in CPU mode


@pytest.mark.comfy
def test_sam_loader_refuses_non_sam_and_corrupt_files(sams_folder):
    import safetensors.torch
    from comfyui_dreamcache.nodes.sam_loader import DreamCacheSAMLoader

    safetensors.torch.save_file({"layer.weight": torch.zeros(2)}, str(sams_folder / "other.safetensors"))
    (sams_folder / "broken.pth").write_bytes(os.urandom(128))
    with pytest.raises(ValueError, match="'other.safetensors': This is not a Segment Anything"):
        call_node(DreamCacheSAMLoader, model_name="other.safetensors", device="cpu")
    with pytest.raises(ValueError, match="'broken.pth' could not be loaded"):
        call_node(DreamCacheSAMLoader, model_name="broken.pth", device="cpu")


@pytest.mark.comfy
def test_mask_reference_node_segments_with_sam(comfy):
    from comfyui_dreamcache.nodes.mask_reference import DreamCacheMaskReference
    from comfyui_dreamcache.nodes.sam_loader import DreamCacheSamModel

    cpu = torch.device("cpu")
    images = torch.stack([subject_image(), subject_image()])
    wrapped = DreamCacheSamModel(tiny_sam(full_mask=True), "tiny", cpu, cpu)
    for sam_model in (wrapped, tiny_sam(full_mask=True)):  # ours, or another pack's bare Sam
        out_image, out_mask = call_node(DreamCacheMaskReference, image=images, size=64, sam_model=sam_model)
        assert out_image.shape == (2, 64, 64, 3) and out_mask.shape == (2, 64, 64)
        # "Everything" is the subject: the 128 x 96 photo, 53 x 40 px on the square.
        assert torch.all(out_mask[:, 14:50, 8:56] == 1.0)
        assert torch.all(out_image[:, :4] == 1.0)

    with pytest.raises(ValueError, match="not a Segment Anything model"):
        call_node(DreamCacheMaskReference, image=images, size=64, sam_model="sam")

    from run_as_comfyui import recorded_progress
    with recorded_progress() as reports:
        call_node(DreamCacheMaskReference, image=images, size=64, sam_model=wrapped)
    assert reports == [(1, 2), (2, 2)], "the SAM batch reports one step per image"

    class EmptySamModel(DreamCacheSamModel):
        def segment(self, images_rgb):
            return torch.zeros(images_rgb.shape[:3])

    with pytest.raises(ValueError, match="SAM found no subject in image 1 of 2.*mask drawn by hand"):
        call_node(DreamCacheMaskReference, image=images, size=64, sam_model=EmptySamModel(None, "empty", cpu, cpu))
