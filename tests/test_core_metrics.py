"""DreamBench data and metric arithmetic (no ComfyUI): tiny random transformers models saved to tmp folders."""
import json
import math
import os

import pytest
import torch

from comfyui_dreamcache.dreamcache_core.evaluation import evaluate

from comfyui_dreamcache.dreamcache_core.evaluation import metrics
from comfyui_dreamcache.dreamcache_core.data import (
    dreambench_prompts,
    dreambench_subject,
    dreambench_subjects,
    dreambench_templates,
    fill_template,
)

IMAGE = 32  # model input side of the tiny models


# ------------------------------------------------------------------------------------------------------------
# shipped DreamBench data
# ------------------------------------------------------------------------------------------------------------

def test_dreambench_subjects_are_the_30_of_the_benchmark():
    subjects = dreambench_subjects()
    assert len(subjects) == 30
    assert len({s.name for s in subjects}) == 30
    assert len({s.class_name for s in subjects}) == 15
    live = [s for s in subjects if s.kind == "live"]
    assert sorted(s.name for s in live) == ["cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]
    assert all(s.class_name in ("cat", "dog") for s in live)
    assert all(s.kind == "object" and s.class_name not in ("cat", "dog") for s in subjects if s not in live)
    assert dreambench_subject("bear_plushie").class_name == "stuffed animal"
    with pytest.raises(ValueError, match="not a DreamBench subject"):
        dreambench_subject("unicorn")


@pytest.mark.parametrize("kind", ["object", "live"])
def test_dreambench_prompt_lists_are_25_well_formed_templates(kind):
    templates = dreambench_templates(kind)
    assert len(templates) == 25 and len(set(templates)) == 25
    for template in templates:
        assert template.startswith("a ") and "{0} {1}" in template and template == template.strip()
    assert templates[0] == "a {0} {1} in the jungle" and templates[-1] == "a cube shaped {0} {1}"
    assert templates[:10] == dreambench_templates("object")[:10]  # shared context prompts
    assert templates[20:] == dreambench_templates("object")[20:]  # shared property prompts


def test_dreambench_prompts_are_filled_per_subject_kind():
    dog = dreambench_prompts("dog2")
    assert dog[0] == "a dog in the jungle" and "a dog wearing a santa hat" in dog
    plush = dreambench_prompts("wolf_plushie", unique_token="sks")
    assert plush[0] == "a sks stuffed animal in the jungle" and "a sks stuffed animal floating on top of water" in plush
    assert all("  " not in p and p == p.strip() for s in dreambench_subjects() for p in dreambench_prompts(s))
    assert fill_template("a red {0} {1}", "vase") == "a red vase"


def test_prompt_files_name_their_source():
    from comfyui_dreamcache.dreamcache_core.data import PROMPT_FILES, SUBJECTS_FILE

    for path in PROMPT_FILES.values():
        with open(path, encoding="utf-8") as handle:
            assert "google/dreambooth" in handle.readline()
    with open(SUBJECTS_FILE, encoding="utf-8") as handle:
        assert "prompts_and_classes.txt" in json.load(handle)["source"]


# ------------------------------------------------------------------------------------------------------------
# arithmetic
# ------------------------------------------------------------------------------------------------------------

def test_cosines_of_known_embeddings():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 3.0], [0.0, -1.0], [5.0, 0.0]])
    expected = torch.tensor([[1 / math.sqrt(2), 0.0, 1.0], [1 / math.sqrt(2), -1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(metrics.cosine_matrix(a, b), expected)
    torch.testing.assert_close(metrics.mean_cosine_to_set(a, b), expected.mean(1))
    torch.testing.assert_close(metrics.rowwise_cosine(a, b[:2]), torch.tensor([1 / math.sqrt(2), -1.0],
                                                                              dtype=torch.float64))
    x = torch.randn(4, 7)
    torch.testing.assert_close(torch.diagonal(metrics.cosine_matrix(x, x)), torch.ones(4, dtype=torch.float64))


def test_composite_on_white_keeps_the_subject_and_whitens_the_rest():
    images = torch.rand(2, 6, 8, 3)
    masks = torch.zeros(2, 6, 8)
    masks[:, 2:4, 3:6] = 1.0
    out = metrics.composite_on_white(images, masks)
    torch.testing.assert_close(out[:, 2:4, 3:6], images[:, 2:4, 3:6])
    assert torch.all(out[:, :2] == 1.0) and torch.all(out[:, :, :3] == 1.0)
    half = metrics.composite_on_white(images[:1], torch.full((1, 6, 8), 0.5))
    torch.testing.assert_close(half, images[:1] * 0.5 + 0.5)


def test_aggregate_per_subject_and_overall():
    records = [{"subject": "a", "dino": 0.2}, {"subject": "a", "dino": 0.4}, {"subject": "b", "dino": 0.9}]
    result = metrics.aggregate(records, ["dino"])
    assert result["subjects"]["a"]["dino"]["mean"] == pytest.approx(0.3)
    assert result["subjects"]["a"]["dino"]["std"] == pytest.approx(0.1)
    assert result["subjects"]["b"]["images"] == 1
    assert result["overall"]["dino"]["mean"] == pytest.approx(0.5)  # mean over images
    assert result["overall"]["subject_mean"]["dino"]["mean"] == pytest.approx(0.6)  # mean of subject means
    assert result["overall"]["images"] == 3


class AngleEmbedder:
    """An image of constant grey v embeds as (cos(v pi/2), sin(v pi/2)): known cosines cos((v1 - v2) pi/2)."""

    def __call__(self, images):
        images = images if isinstance(images, torch.Tensor) else torch.stack(list(images))
        angle = images.float().mean(dim=(1, 2, 3)) * math.pi / 2
        return torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)


class AngleClip:
    def __init__(self):
        self.images = AngleEmbedder()

    def texts(self, prompts):
        return torch.tensor([[1.0, 0.0] if "zero" in p else [0.0, 1.0] for p in prompts])


def test_score_subject_with_known_embeddings():
    grey = lambda v: torch.full((5, 5, 3), v)  # noqa: E731
    generated = [grey(0.0), grey(0.5)]
    real = [grey(0.0), grey(1.0)]
    scores = metrics.score_subject(generated, ["zero", "one"], real, dino=AngleEmbedder(), clip=AngleClip())
    c = math.cos(math.pi / 4)
    assert scores[0]["dino"] == pytest.approx((1.0 + 0.0) / 2)
    assert scores[1]["dino"] == pytest.approx((c + c) / 2)
    assert scores[0]["clip_i"] == pytest.approx(scores[0]["dino"])
    assert scores[0]["clip_t"] == pytest.approx(1.0)  # (1, 0) vs text (1, 0)
    assert scores[1]["clip_t"] == pytest.approx(math.sin(math.pi / 4))  # (c, c) vs (0, 1)
    assert "mdino" not in scores[0]
    # masks: everything white except a subject of grey 0 -> both images become the same
    mask = torch.zeros(5, 5)
    mask[2, 2] = 1.0
    masked = metrics.score_subject(generated, ["zero", "one"], real, dino=AngleEmbedder(), clip=AngleClip(),
                                   generated_masks=[mask, mask], real_masks=[mask, mask])
    assert "mdino" in masked[0] and "mclip_i" in masked[0]
    assert masked[0]["dino"] == pytest.approx(scores[0]["dino"])


# ------------------------------------------------------------------------------------------------------------
# tiny random transformers models in local folders
# ------------------------------------------------------------------------------------------------------------

def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@pytest.fixture(scope="module")
def tiny_dino_folder(tmp_path_factory):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("dino")
    config = ViTConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       image_size=IMAGE, patch_size=8)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": IMAGE, "width": IMAGE}).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_clip_folder(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("clip")
    vocab_dir = tmp_path_factory.mktemp("clip_vocab")
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with open(vocab_dir / "vocab.json", "w", encoding="utf-8") as handle:
        json.dump(vocab, handle)
    (vocab_dir / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt"))
    tokenizer.save_pretrained(folder)
    eos = vocab["<|endoftext|>"]
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMAGE, patch_size=8),
        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def dino(tiny_dino_folder):
    return metrics.DinoEmbedder(tiny_dino_folder)


@pytest.fixture(scope="module")
def clip(tiny_clip_folder):
    return metrics.ClipEmbedder(tiny_clip_folder)


def test_dino_embedding_is_the_cls_token_of_the_local_model(dino, tiny_dino_folder):
    from transformers import ViTImageProcessor, ViTModel

    images = torch.rand(3, 40, 48, 3, generator=torch.Generator().manual_seed(2))
    model = ViTModel.from_pretrained(tiny_dino_folder, add_pooling_layer=False).eval()
    processor = ViTImageProcessor.from_pretrained(tiny_dino_folder)
    pixels = processor(images=[i.permute(2, 0, 1) for i in images], return_tensors="pt", do_rescale=False)["pixel_values"]
    with torch.no_grad():
        expected = model(pixel_values=pixels).last_hidden_state[:, 0]
    torch.testing.assert_close(dino(images), expected)
    assert pixels.shape[-2:] == (IMAGE, IMAGE)


def test_identical_images_score_one(dino, clip):
    images = torch.rand(2, 36, 36, 3, generator=torch.Generator().manual_seed(3))
    scores = metrics.score_subject(images, ["a dog", "a cat"], images[:1].repeat(3, 1, 1, 1), dino=dino, clip=clip)
    assert scores[0]["dino"] == pytest.approx(1.0, abs=1e-6)
    assert scores[0]["clip_i"] == pytest.approx(1.0, abs=1e-6)
    assert scores[1]["dino"] < 0.9999
    masks = torch.ones(2, 36, 36)
    masked = metrics.score_subject(images, ["a dog", "a cat"], images[:1].repeat(3, 1, 1, 1), dino=dino, clip=clip,
                                   generated_masks=masks, real_masks=masks[:1].repeat(3, 1, 1))
    assert masked[0]["mdino"] == pytest.approx(1.0, abs=1e-6)
    assert masked[0]["mclip_i"] == pytest.approx(1.0, abs=1e-6)
    assert masked[1]["mdino"] == pytest.approx(masked[1]["dino"], abs=1e-6)  # full masks: the images unchanged


def test_clip_t_is_the_plain_cosine_of_the_projected_embeddings(clip, tiny_clip_folder):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    images = torch.rand(2, 40, 32, 3, generator=torch.Generator().manual_seed(4))
    prompts = ["a dog in the jungle", "a red vase"]
    scores = metrics.score_subject(images, prompts, images, clip=clip)
    model = CLIPModel.from_pretrained(tiny_clip_folder).eval()
    tokens = AutoTokenizer.from_pretrained(tiny_clip_folder)(prompts, padding=True, return_tensors="pt")
    pixels = CLIPImageProcessor.from_pretrained(tiny_clip_folder)(
        images=[i.permute(2, 0, 1) for i in images], return_tensors="pt", do_rescale=False)["pixel_values"]
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
        # CLIPModel's own logits are logit_scale * cosine of the projected, normalised embeddings
        cosines = out.logits_per_image / model.logit_scale.exp()
    for i in range(2):
        assert scores[i]["clip_t"] == pytest.approx(float(cosines[i, i]), abs=1e-5)
        assert -1.0 <= scores[i]["clip_t"] <= 1.0
    manual = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
    assert [s["clip_t"] for s in scores] == pytest.approx(manual.tolist(), abs=1e-5)


def test_model_folders_are_local_only(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        metrics.DinoEmbedder(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        metrics.ClipEmbedder(str(tmp_path / "empty"))


def _write_png(path, array):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray((array.numpy() * 255).astype("uint8")).save(path)


def test_evaluate_command_on_a_dreambench_layout_folder(tmp_path, tiny_dino_folder, tiny_clip_folder, capsys):
    generator = torch.Generator().manual_seed(5)
    dataset, generations = tmp_path / "dataset", tmp_path / "generations"
    real = {name: [torch.rand(40, 40, 3, generator=generator) for _ in range(2)] for name in ("dog", "vase")}
    for name, images in real.items():
        for i, image in enumerate(images):
            _write_png(str(dataset / name / f"{i:02d}.png"), image)
    # dog: image 0 of prompt 0 is a copy of real image 0; its mask files cover everything
    _write_png(str(generations / "dog" / "00_00.png"), real["dog"][0])
    _write_png(str(generations / "dog" / "03_00.png"), torch.rand(40, 40, 3, generator=generator))
    _write_png(str(generations / "vase" / "24_00.png"), torch.rand(40, 40, 3, generator=generator))
    _write_png(str(generations / "vase" / "reference.png"), torch.rand(40, 40, 3, generator=generator))  # ignored
    out = tmp_path / "scores.json"
    result = evaluate.main(["--generations", str(generations), "--dino", tiny_dino_folder, "--clip", tiny_clip_folder,
                            "--dataset", str(dataset), "--json", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert "paper, DreamCache SD1.5" in printed and "0.713" in printed and "0.810" in printed and "0.298" in printed
    saved = json.loads(out.read_text())
    assert saved["overall"]["images"] == 3 and set(saved["subjects"]) == {"dog", "vase"}
    assert saved["metrics"] == ["dino", "clip_i", "clip_t"]  # no masks, no SAM: masked metrics skipped
    by_file = {os.path.basename(r["file"]) + r["subject"]: r for r in result["records"]}
    assert by_file["00_00.pngdog"]["prompt"] == "a dog in the jungle"
    assert by_file["24_00.pngvase"]["prompt"] == "a cube shaped vase"
    # real image 0 of 2 is the same image: mean cosine = (1 + cos(other)) / 2 > cosine to a random image
    dino_copy = by_file["00_00.pngdog"]["dino"]
    assert dino_copy > by_file["03_00.pngdog"]["dino"]
    assert saved["overall"]["dino"]["mean"] == pytest.approx(sum(r["dino"] for r in result["records"]) / 3)
