"""The README's "Train an adapter from public data" recipe cannot drift from the command line.

Every ``python -m dreamcache_core...`` command of the recipe is parsed by that module's own argument parser
(CI, no ComfyUI); then the recipe runs as written on tiny fixtures in a scratch folder laid out as the recipe
expects (Subjects200K parquet files, an authors'-layout folder, held-out object folders), with a tiny
SD-shaped U-Net and the toy encoders in place of ``--checkpoint`` and the sizes shrunk (ComfyUI needed).
"""
import json
import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "### Train an adapter from public data"

# what the tiny run changes: every other flag and value of a command is used as written
TINY_VALUES = {"--resolution": "32", "--batch-size": "2", "--steps": "2", "--validation-every": "2"}
TINY_EXTRA = ["--validation-steps", "2", "--no-progress"]  # 2 sampling steps for the grid instead of 20
TINY_CONTEXT = 32


def recipe_section() -> str:
    text = README.read_text(encoding="utf-8")
    assert text.count(SECTION) == 1, f"the README has no single '{SECTION}' section"
    start = text.index(SECTION)
    end = re.compile(r"^#{2,3} ", re.M).search(text, start + len(SECTION))
    return text[start:end.start() if end else len(text)]


def recipe_commands() -> list:
    """[(program, module or None, arguments)] of the section's bash blocks, continuation lines joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", recipe_section(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if "<" in line:  # a line with a placeholder (moving folders by hand) is not run
                continue
            words = shlex.split(line, comments=True)
            if not words:
                continue
            if words[0] == "python" and words[1] == "-m":
                commands.append(("python", words[2], words[3:]))
            else:
                commands.append((words[0], None, words[1:]))
    return commands


def parser_of(module: str):
    from comfyui_dreamcache.dreamcache_core.evaluation import evaluate, generate
    from comfyui_dreamcache.dreamcache_core.training import prepare_subjects200k, train

    parsers = {"dreamcache_core.training.train": train.build_parser,
               "dreamcache_core.training.prepare_subjects200k": prepare_subjects200k.build_parser,
               "dreamcache_core.evaluation.generate": generate.build_parser}
    if module == "dreamcache_core.evaluation.evaluate":
        return evaluate.parse_args
    assert module in parsers, f"the recipe runs {module}, which this test does not know: add its parser here"
    return parsers[module]().parse_args


def value_of(arguments: list, flag: str):
    return arguments[arguments.index(flag) + 1] if flag in arguments else None


def test_every_recipe_command_is_accepted_by_its_parser():
    commands = recipe_commands()
    modules = [module for _, module, _ in commands if module]
    assert modules.count("dreamcache_core.training.prepare_subjects200k") == 1
    assert modules.count("dreamcache_core.training.train") == 2  # SD1.5 and SDXL
    for _, module, arguments in commands:
        if module is None:
            continue
        try:
            parser_of(module)(arguments)
        except SystemExit as exit_:
            pytest.fail(f"README recipe: python -m {module} {' '.join(arguments)} is refused by its parser "
                        f"(exit {exit_.code})")
    trains = [arguments for _, module, arguments in commands if module == "dreamcache_core.training.train"]
    prepared = value_of(next(a for _, m, a in commands if m and m.endswith("prepare_subjects200k")), "--out")
    assert {value_of(a, "--data") for a in trains} == {prepared, "authors_dataset"}  # one run from each source
    assert {value_of(a, "--resolution") for a in trains} == {"512", "1024"}
    for arguments in trains:
        for flag in ("--augment", "--validation-data", "--validation-every", "--install-as", "--output-dir",
                     "--gradient-checkpointing", "--mixed-precision"):
            assert flag in arguments, flag
    board = [arguments for program, _, arguments in commands if program == "tensorboard"]
    assert len(board) == 1 and board[0][0] == "--logdir"
    assert all(Path(value_of(a, "--output-dir")).parent == Path(board[0][1]) for a in trains)


def tiny_train_arguments(arguments: list, model: list) -> list:
    """The recipe's train command with ``--checkpoint`` replaced by the tiny U-Net, TINY_VALUES applied and
    TINY_EXTRA added."""
    out, i = [], 0
    while i < len(arguments):
        flag = arguments[i]
        if flag == "--checkpoint":
            out += model
            i += 2
            continue
        out.append(flag)
        if flag in TINY_VALUES:
            out.append(TINY_VALUES[flag])
            i += 2
            continue
        i += 1
    return out + TINY_EXTRA


@pytest.mark.comfy
def test_the_recipe_runs_as_written_on_tiny_public_data(tmp_path, monkeypatch):
    from conftest import import_comfy
    import_comfy()
    import folder_paths
    from data_source_fixtures import colour_segmenter, subjects200k_record, write_authors_layout, write_subjects200k
    from comfyui_dreamcache.dreamcache_core.comfy_bridge.model_folders import ADAPTER_EXTENSIONS
    from comfyui_dreamcache.dreamcache_core.comfy_bridge.models import (initialise_seeded, model_from_unet_config,
                                                                       save_unet_weights)
    from comfyui_dreamcache.dreamcache_core.io.adapter_io import load_adapter
    from comfyui_dreamcache.dreamcache_core.toy import toy_world as tw
    from comfyui_dreamcache.dreamcache_core.training import prepare_subjects200k, train
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # the folders the recipe names, relative to the pack folder it runs from
    monkeypatch.chdir(tmp_path)
    write_subjects200k(tmp_path / "Subjects200K" / "data" / "train-00000-of-00001.parquet",
                       [subjects200k_record(n) for n in range(2)] + [subjects200k_record(2, quality=(5, 4, 5))])
    write_authors_layout(str(tmp_path / "authors_dataset"), objects=2, stems=2)
    write_authors_layout(str(tmp_path / "authors_heldout"), objects=2, stems=2)
    installed = tmp_path / "ComfyUI" / "models" / "dreamcache"
    installed.mkdir(parents=True)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "dreamcache", ([str(installed)], set(ADAPTER_EXTENSIONS)))
    monkeypatch.setattr("comfyui_dreamcache.dreamcache_core.comfy_bridge.model_folders.register_model_folders",
                        lambda: None)
    unet_config = tw.toy_unet_config(context_dim=TINY_CONTEXT)
    save_unet_weights(model_from_unet_config(unet_config, "eps", device="cpu",
                                             initialise=lambda unet: initialise_seeded(unet, 0)),
                      str(tmp_path / "unet.safetensors"))
    (tmp_path / "unet.json").write_text(json.dumps({"unet_config": unet_config, "prediction": "eps"}))
    model = ["--unet-config", "unet.json", "--unet-weights", "unet.safetensors", "--toy-encoders", "--cpu"]

    ran = []
    for program, module, arguments in recipe_commands():
        if module == "dreamcache_core.training.prepare_subjects200k":
            # the recipe's command; the test's segmenter stands in for the model folders it names
            summary = prepare_subjects200k.run_preparation(arguments + ["--quiet"], segmenter=colour_segmenter(),
                                                           log=lambda message: None)
            # two rows at quality 5, both directions; the quality-4 row is left out by --min-quality 5
            assert summary.rows == 4 and dict(summary.skipped) == {"low quality": 1}
            ran.append(module)
        elif module == "dreamcache_core.training.train":
            assert train.main(tiny_train_arguments(arguments, model)) == 0
            out = Path(value_of(arguments, "--output-dir"))
            assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-0000002.png"]
            gaps = (out / "reference_gap.csv").read_text().splitlines()
            assert len(gaps) == 2 and gaps[1].startswith("2,")
            name = value_of(arguments, "--install-as")
            assert (installed / name).read_bytes() == (out / "dreamcache_adapter.safetensors").read_bytes()
            assert load_adapter(str(installed / name)).parameter_count() > 0
            ran.append(module)
        elif program == "tensorboard":
            for run in Path(value_of(arguments, "--logdir")).iterdir():
                events = EventAccumulator(str(run / "tensorboard"))
                events.Reload()
                assert {"train/loss", "train/grad_norm", "reference_gap/gap"} <= set(events.Tags()["scalars"])
                assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
            ran.append(program)
    assert ran == ["dreamcache_core.training.prepare_subjects200k", "dreamcache_core.training.train",
                   "dreamcache_core.training.train", "tensorboard"]
