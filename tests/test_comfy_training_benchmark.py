"""The training-throughput benchmark on the tiny shape (ComfyUI's real code); skipped without COMFYUI_PATH."""
import json
import math

import pytest
import torch

pytestmark = pytest.mark.comfy  # every test here needs ComfyUI (COMFYUI_PATH)


def test_training_benchmark_times_every_configuration_and_writes_its_table(comfy, tmp_path):
    from comfyui_dreamcache.dreamcache_core.evaluation import training_benchmark

    argv = ["--shape", "tiny", "--device", "cpu", "--precision", "fp32", "--checkpointing",
            "both", "--batch", "1", "--repeats", "2", "--warmup", "0", "--json", str(tmp_path / "t.json"),
            "--markdown", str(tmp_path / "t.md"), "--threads", "1"]  # one thread: tiny steps on a busy machine
    threads = torch.get_num_threads()
    try:
        results = training_benchmark.main(argv)
        forward = training_benchmark.forward_flops("tiny", torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert training_benchmark.meta_forward_flops("tiny") == forward  # the meta count is the real path's count
    assert [(r["precision"], r["gradient_checkpointing"]) for r in results] == [("fp32", False), ("fp32", True)]
    for r in results:
        for name in ("plain", "adapter", "adapter_cached"):
            assert len(r["all_seconds"][name]) == 2 and all(t > 0 for t in r["all_seconds"][name])
            assert r["samples_per_second"][name] == 1 / r["seconds"][name]
        assert r["adapter_parameters"] > 0 and r["unet_parameters"] > r["adapter_parameters"]
        # the plain step is forward + backward into every weight (about 3 forwards; checkpointing recomputes the
        # middle and decoder blocks' forward); the cached DreamCache step back-propagates only from the output to
        # the first memory layer; the Encode pass adds one forward
        f = r["flops_per_sample"]
        assert 2.5 * forward < f["plain"] < (4.5 if r["gradient_checkpointing"] else 3.5) * forward
        assert f["adapter_cached"] < f["plain"]
        assert f["adapter"] - f["adapter_cached"] == pytest.approx(forward, rel=0.05)
    saved = json.loads((tmp_path / "t.json").read_text())
    assert len(saved["results"]) == 2
    table = [line for line in (tmp_path / "t.md").read_text().splitlines() if line.startswith("| tiny")]
    assert len(table) == 2
    cells = [c.strip() for c in table[0].strip("|").split("|")]
    assert cells[:4] == ["tiny (128px)", "fp32", "off", "1"]
    assert math.isclose(float(cells[4].split()[0]), results[0]["samples_per_second"]["plain"], rel_tol=0.01,
                        abs_tol=0.01)

