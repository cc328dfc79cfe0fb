"""Apply DreamCache stacked with the other model patches artists use, through ComfyUI's stock nodes.

For each patch, in both orders (the patch on the model Apply gets, and Apply on the patched model): the graph
runs; Apply at strength 0 gives exactly (bit for bit) the patch's own result; Apply at strength 1 changes it.
Tiny SD1.5-shaped U-Net, 16x16 latents, 2 KSampler steps. Skipped (with the reason) when COMFYUI_PATH is unset.
"""
import pytest
import torch

from tiny_models import ksample, tiny_setup_with_caches
from run_as_comfyui import run_node

pytestmark = pytest.mark.comfy  # every test here needs ComfyUI (COMFYUI_PATH)

LATENT = 16  # 128 px: big enough for HyperTile to cut the highest-resolution tokens into tiles
STEPS = 2


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    setup = tiny_setup_with_caches(1)
    return dict(setup, cache=setup["caches"][0], loras=tmp_path_factory.mktemp("loras"))


def sample(model, env, positive=None, negative=None, steps=STEPS):
    latent = torch.zeros(1, 4, LATENT, LATENT)
    return ksample(model, positive or env["positive"], negative or env["negative"], latent, seed=3, steps=steps)


def apply(model, env, strength):
    from comfyui_dreamcache.nodes.apply import DreamCacheApply

    (patched,) = run_node(DreamCacheApply, model, env["trained"], env["cache"], strength, 0.0, 1.0,
                          "positive and negative")
    return patched


# --- the other patches, each through the stock node (or the call a pack makes) --------------------------------

def perturbed_attention_guidance(model, env):
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance

    return run_node(PerturbedAttentionGuidance, model, 3.0)[0]


def self_attention_guidance(model, env):
    from comfy_extras.nodes_sag import SelfAttentionGuidance

    return run_node(SelfAttentionGuidance, model, 0.5, 2.0)[0]


def freeu_v2(model, env):
    from comfy_extras.nodes_freelunch import FreeU_V2

    return run_node(FreeU_V2, model, 1.3, 1.4, 0.9, 0.2)[0]


def hypertile(model, env):
    from comfy_extras.nodes_hypertile import HyperTile

    return run_node(HyperTile, model, 32, 2, 0, False)[0]


def token_merging(model, env):
    from comfy_extras.nodes_tomesd import TomePatchModel

    return run_node(TomePatchModel, model, 0.5)[0]


def easycache(model, env):
    nodes_easycache = pytest.importorskip("comfy_extras.nodes_easycache",
                                          reason="this ComfyUI has no EasyCache node (comfy_extras.nodes_easycache)")
    return run_node(nodes_easycache.EasyCacheNode, model, 0.2, 0.0, 1.0, False)[0]


def random_lora_file(env) -> str:
    """A rank-4 LoRA in the kohya layout ComfyUI reads (lora_unet_<key>.lora_down/up/alpha) on every attention
    projection of the tiny U-Net, seeded random weights; written once into the module's loras folder."""
    from safetensors.torch import save_file

    name = "random-lora-rank4.safetensors"
    path = env["loras"] / name
    if not path.exists():
        generator = torch.Generator().manual_seed(17)
        tensors = {}
        for key, weight in env["unet"].state_dict().items():
            if weight.dim() == 2 and any(f".{part}.weight" in f".{key}" for part in ("to_q", "to_k", "to_v")):
                stem = "lora_unet_" + key[:-len(".weight")].replace(".", "_")
                tensors[f"{stem}.lora_down.weight"] = torch.randn(4, weight.shape[1], generator=generator) * 0.2
                tensors[f"{stem}.lora_up.weight"] = torch.randn(weight.shape[0], 4, generator=generator) * 0.2
                tensors[f"{stem}.alpha"] = torch.tensor(4.0)
        assert len(tensors) > 30, "the tiny U-Net should have attention projections"
        save_file(tensors, str(path))
    return name


def lora(model, env):
    import folder_paths
    import nodes

    name = random_lora_file(env)
    folder = str(env["loras"])
    folder_paths.add_model_folder_path("loras", folder)
    try:
        return run_node(nodes.LoraLoaderModelOnly, model, name, 1.0)[0]
    finally:
        folder_paths.folder_names_and_paths["loras"][0].remove(folder)


class ImagePromptAttention:
    """What IP-Adapter packs put in attn2 replace: the text cross-attention plus the attention over extra image
    tokens with their own keys and values (here seeded random tokens at the block's inner width)."""

    def __init__(self, scale=1.0, tokens=4):
        self.scale, self.tokens, self.memory = scale, tokens, {}

    def keys_values(self, width, like):
        if width not in self.memory:
            generator = torch.Generator().manual_seed(width)
            self.memory[width] = torch.randn(2, 1, self.tokens, width, generator=generator)
        return self.memory[width].to(like.device, like.dtype)

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        heads = extra_options["n_heads"]
        out = optimized_attention(q, k, v, heads)
        ip_k, ip_v = self.keys_values(q.shape[-1], q).expand(-1, q.shape[0], -1, -1)
        return out + self.scale * optimized_attention(q, ip_k, ip_v, heads)


def ip_adapter_attn2(model, env):
    """set_model_attn2_replace on every cross-attention of the U-Net, as IP-Adapter packs do."""
    from comfy.ldm.modules.attention import SpatialTransformer

    patched = model.clone()
    patch = ImagePromptAttention()
    unet = patched.model.diffusion_model
    count = 0
    for block_name, blocks in (("input", unet.input_blocks), ("middle", [unet.middle_block]),
                               ("output", unet.output_blocks)):
        for number, block in enumerate(blocks):
            for module in block:
                if isinstance(module, SpatialTransformer):
                    for index in range(len(module.transformer_blocks)):
                        patched.set_model_attn2_replace(patch, block_name, number, index)
                        count += 1
    assert count > 0
    return patched


MODEL_PATCHES = {
    "PerturbedAttentionGuidance": perturbed_attention_guidance,
    "SelfAttentionGuidance": self_attention_guidance,
    "FreeU_V2": freeu_v2,
    "HyperTile": hypertile,
    "TomePatchModel": token_merging,
    "EasyCache": easycache,
    "LoraLoaderModelOnly": lora,
    "IP-Adapter-style attn2 replace": ip_adapter_attn2,
}


@pytest.fixture(scope="module")
def plain(env):
    return sample(env["model"], env)


@pytest.mark.parametrize("name", list(MODEL_PATCHES))
def test_dreamcache_stacks_with_a_model_patch_in_both_orders(env, plain, name):
    patch = MODEL_PATCHES[name]
    steps = 4 if name == "EasyCache" else STEPS  # EasyCache starts reusing steps only after its first ones
    alone = sample(patch(env["model"], env), env, steps=steps)
    if name != "EasyCache":
        assert not torch.equal(alone, sample(env["model"], env) if steps != STEPS else plain), \
            f"{name} should change the tiny model's result"
    for order, build in (("patch after Apply", lambda s: patch(apply(env["model"], env, s), env)),
                         ("Apply after patch", lambda s: apply(patch(env["model"], env), env, s))):
        at_zero = sample(build(0.0), env, steps=steps)
        assert torch.equal(at_zero, alone), f"{name}, {order}: strength 0 must give the patch's result bit for bit"
        at_one = sample(build(1.0), env, steps=steps)
        assert torch.isfinite(at_one).all(), f"{name}, {order}"
        assert (at_one - alone).abs().max() > 1e-3, f"{name}, {order}: strength 1 must personalise"


def random_controlnet(model):
    """A ControlNet of the tiny U-Net's shape (comfy.cldm) with seeded random weights, zero convolutions
    included, wrapped as the ControlNet Loader wraps one."""
    import comfy.cldm.cldm
    import comfy.controlnet
    from comfyui_dreamcache.dreamcache_core.comfy_bridge.models import initialise_seeded

    config = dict(model.model.model_config.unet_config)
    config.pop("out_channels", None)
    config.update(hint_channels=3, dtype=torch.float32, device=torch.device("cpu"))
    control_model = comfy.cldm.cldm.ControlNet(**config)
    initialise_seeded(control_model, seed=23)
    return comfy.controlnet.ControlNet(control_model, load_device=torch.device("cpu"), manual_cast_dtype=None,
                                       latent_format=model.model.latent_format)


def test_dreamcache_stacks_with_a_controlnet(env, plain):
    """ControlNet Apply (Advanced) changes the conditioning, Apply DreamCache the model: either may come first
    in a graph (they are on separate paths), and the result is the same."""
    import nodes

    hint = torch.rand(1, LATENT * 8, LATENT * 8, 3, generator=torch.Generator().manual_seed(29))
    positive, negative = run_node(nodes.ControlNetApplyAdvanced, env["positive"], env["negative"],
                                  random_controlnet(env["model"]), hint, 1.0, 0.0, 1.0)
    alone = sample(env["model"], env, positive, negative)
    assert not torch.equal(alone, plain), "the ControlNet should change the tiny model's result"
    at_zero = sample(apply(env["model"], env, 0.0), env, positive, negative)
    assert torch.equal(at_zero, alone)
    at_one = sample(apply(env["model"], env, 1.0), env, positive, negative)
    assert (at_one - alone).abs().max() > 1e-3
