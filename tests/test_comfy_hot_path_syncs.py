"""The personalised step reads nothing back from the device inside the U-Net call.

Which rows, tokens and strengths a memory layer personalises is decided on the host from host values: the rows'
sigmas are read once per model call by the apply_model wrapper the injection registers, before the U-Net runs.
A device read inside the U-Net (``.item()``, ``bool(tensor)``, ``.cpu()``, ``.tolist()``, ``nonzero``) would stall
kernel launch on a GPU at every memory layer (``.to(device)`` copies towards the device are not reads and are
not counted; on the CPU a ``.to("cpu")`` cannot be told from them). On the CPU the test counts such reads with a TorchFunctionMode and
a TorchDispatchMode around the diffusion model's forward (a DIFFUSION_MODEL wrapper, ComfyUI's public extension
point); where CUDA exists, torch.cuda.set_sync_debug_mode("error") would refuse them outright.
"""
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from tiny_models import ksample, tiny_setup_with_caches

pytestmark = pytest.mark.comfy

READ_METHODS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
                torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero,
                torch.nonzero}
READ_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal"}


class HostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in READ_METHODS:
            self.reads.append(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


class HostReadOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in READ_OPS:
            self.reads.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def counting_reads(model, calls):
    """A clone of ``model`` whose diffusion model forward records the host reads made inside it, per call."""
    import comfy.patcher_extension

    def wrapper(executor, *args, **kwargs):
        functions, ops = HostReads(), HostReadOps()
        with functions, ops:
            out = executor(*args, **kwargs)
        calls.append(functions.reads + ops.reads)
        return out

    counted = model.clone()
    counted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "count_host_reads", wrapper)
    return counted


@pytest.fixture(scope="module")
def sd15():
    return tiny_setup_with_caches(1)


@pytest.mark.parametrize("controls", [
    {},
    {"start_percent": 0.2, "end_percent": 0.8, "weight_schedule": "ease in", "layer_preset": "appearance (decoder)"},
    {"attn_mask": "left half", "frame_weights": "1, 0.5"},
])
def test_a_personalised_step_reads_nothing_back_inside_the_unet(sd15, controls):
    from comfyui_dreamcache.nodes.apply import DreamCacheApply
    from run_as_comfyui import run_node

    controls = dict(controls)
    start, end = controls.pop("start_percent", 0.0), controls.pop("end_percent", 1.0)
    if controls.get("attn_mask") == "left half":
        mask = torch.zeros(16, 16)
        mask[:, :8] = 1
        controls["attn_mask"] = mask
    latent = torch.zeros(2, 4, 8, 8)
    plain_calls, personalised_calls = [], []
    ksample(counting_reads(sd15["model"], plain_calls), sd15["positive"], sd15["negative"], latent, seed=1, steps=4)
    (patched,) = run_node(DreamCacheApply, sd15["model"], sd15["trained"], sd15["caches"][0], 1.0, start, end,
                          "positive only", **controls)
    # a first run builds what the injection memoises from host tensors (the region's token weights and the tokens
    # each mask covers, from the MASK on the host); later runs find them
    ksample(patched, sd15["positive"], sd15["negative"], latent, seed=1, steps=4)
    out = ksample(counting_reads(patched, personalised_calls), sd15["positive"], sd15["negative"], latent, seed=1,
                  steps=4)
    plain = ksample(sd15["model"], sd15["positive"], sd15["negative"], latent, seed=1, steps=4)
    assert not torch.equal(out, plain)  # the adapter did act on these steps
    assert len(personalised_calls) == len(plain_calls) >= 3
    assert all(not reads for reads in plain_calls), plain_calls[0]
    assert all(not reads for reads in personalised_calls), personalised_calls


def test_the_count_sees_a_read_inside_the_unet(sd15):
    """The counter catches what it is for: a patch that branches on a device value is seen."""
    calls = []
    model = sd15["model"].clone()
    model.set_model_attn1_output_patch(lambda a1, extra_options: a1 if bool(a1.abs().sum() >= 0) else -a1)
    ksample(counting_reads(model, calls), sd15["positive"], sd15["negative"], torch.zeros(1, 4, 8, 8), seed=1,
            steps=2)
    assert calls and all("__bool__" in reads or "aten::_local_scalar_dense" in reads for reads in calls)
