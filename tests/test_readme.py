"""The README's commands run as written: every ``patchdp`` command of its bash blocks is run in
order (training runs shrunk with ``--set`` to a few steps on small synthetic data; the privacy
commands unchanged), its Python recipe is executed, and no file refers to a document that is
not in the repository."""

from __future__ import annotations

import re
import shlex
from pathlib import Path


from patchdp_opacus.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

#: Appended to every `patchdp train` of the README: a few logical steps on small data.
SHRINK_TRAIN = ["--set", "dataset.train.num_samples=16", "--set", "dataset.val.num_samples=1",
                "--set", "training.batch_size=8", "--set", "training.max_physical_batch_size=8",
                "--set", "training.epochs=1", "--set", "training.num_workers=0", "--quiet"]
#: Appended to the figure commands: a coarser PLD (their numbers are not quoted).
SHRINK_FIGURE = ["--discretization", "1e-2"]
#: Also appended for configs of data sets that need a download: synthetic data and a small
#: model without pretrained weights (the command's own flags are still parsed and checked).
SHRINK_PAPER = ["--set", "dataset.name=synthetic", "--set", "dataset.root=null",
                "--set", "dataset.train={split: train, image_size: [64, 128]}",
                "--set", "dataset.val={split: val, image_size: [64, 128]}",
                "--set", "model.encoder_name=resnet18", "--set", "model.encoder_weights=null",
                "--set", "model.output_stride=16", "--set", "model.norm=group",
                "--set", "model.aspp_rates=[2,4,6]",
                "--set", "model.extra={encoder_depth: 3, decoder_channels: 64}",
                "--set", "privacy.crop=[32,32]", "--set", "training.grad_sample_mode=bk"]

#: Appended to every `patchdp train` of a classification config (generated MNIST idx files in
#: data/mnist, no pretrained weights): a step or two on a handful of images.
SHRINK_CLASSIFICATION = ["--set", "training.batch_size=4", "--set", "training.max_steps=2",
                         "--set", "training.max_physical_batch_size=2",
                         "--set", "training.epochs=1",
                         "--set", "training.num_workers=0", "--set", "training.eval_batch_size=8",
                         "--set", "model.weights=null", "--quiet"]
SHRINK_MNIST = ["--set", "dataset.train.val_size=8", "--set", "dataset.val.val_size=8"]

#: Output the README quotes next to its commands (checked in both).
STATED = [("epsilon", "patch-level  epsilon = 32.7277"),
          ("epsilon", "record-level epsilon = 118.3993"),
          ("epsilon", "p = 0.32906 = 66049/200720"),
          ("noise", "patch-level  z = 1.6621"),
          ("noise", "record-level z = 3.3972")]


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def patchdp_commands(text: str) -> list[list[str]]:
    """argv (after the program name) of every patchdp call in the bash blocks, in order."""
    commands = []
    for block in bash_blocks(text):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            if not line or line.startswith("#"):
                continue
            for part in line.split("&&"):
                argv = shlex.split(part)
                if argv and Path(argv[0]).name == "patchdp":
                    commands.append(argv[1:])
    return commands


#: Appended to `patchdp audit`: fewer neighbour pairs on fewer images.
SHRINK_AUDIT = ["--trials", "100", "--set", "dataset.train.num_samples=16"]


def shrink(argv: list[str]) -> list[str]:
    if argv[0] in ("profile", "sweep"):
        return [*argv, *SHRINK_FIGURE]
    if argv[0] == "audit":
        return [*argv, *SHRINK_AUDIT]
    if argv[0] != "train":
        return argv
    config = argv[argv.index("--config") + 1]
    if Path(config).parent.name in ("mnist", "dtd"):
        mnist = SHRINK_MNIST if Path(config).parent.name == "mnist" else []
        return [*argv, *mnist, *SHRINK_CLASSIFICATION]
    paper = "demo" not in config
    return [*argv, *(SHRINK_PAPER if paper else []), *SHRINK_TRAIN]


def test_readme_blocks_have_no_placeholders():
    for block in bash_blocks(README):
        assert "…" not in block and "..." not in block and "<" not in block, block
    commands = patchdp_commands(README)
    kinds = {argv[0] for argv in commands}
    assert kinds >= {"train", "evaluate", "plot", "epsilon", "noise", "profile", "sweep", "audit"}


def test_readme_patchdp_commands_run(tmp_path, monkeypatch, capsys):
    from classification_data import write_mnist

    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    write_mnist(tmp_path / "data" / "mnist")  # the MNIST commands' --data-root
    outputs = {}
    for argv in patchdp_commands(README):
        code = main(shrink(argv))
        out, err = capsys.readouterr()
        assert code == 0, f"patchdp {' '.join(argv)}\n{err[-2000:]}"
        outputs.setdefault(argv[0], []).append(out)
    for command, text in STATED:
        assert f"`{text}`" in README and text in outputs[command][0], (command, text)
    assert (tmp_path / "runs" / "demo" / "patch_eps8_seed0" / "prediction.png").is_file()
    assert (tmp_path / "runs" / "demo" / "record_eps8_seed0" / "final_metrics.json").is_file()
    for fig in ("fig2.png", "fig4.png", "fig5.png"):
        assert (tmp_path / fig).stat().st_size > 1000


def test_readme_recipe_for_an_own_smp_model_runs(capsys):
    (recipe,) = [b for b in re.findall(r"```python\n(.*?)```", README, flags=re.S)
                 if "make_private_compatible(" in b]
    exec(compile(recipe, "README recipe", "exec"), {"__name__": "readme_recipe"})
    out = capsys.readouterr().out
    eps = re.search(r"epsilon: patch level ([0-9.]+) record level ([0-9.]+)", out)
    assert eps and float(eps.group(1)) <= 8.0 < float(eps.group(2))


def _repository_text_files():
    skip = {".git", ".venv", "runs", "outputs", "__pycache__", ".pytest_cache", "build",
            ".hypothesis", "bench-out", ".whl"}
    for path in ROOT.rglob("*"):
        if path.is_file() and not skip & set(path.relative_to(ROOT).parts) and path.suffix in {
                ".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".cfg", ".txt", ""}:
            yield path


def test_no_file_refers_to_documents_outside_the_repository():
    present = {p.name for p in ROOT.rglob("*.md") if ".git" not in p.parts}
    for path in _repository_text_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for name in re.findall(r"([A-Za-z0-9_-]+\.md)\b", text):
            assert name in present, f"{path.relative_to(ROOT)} refers to {name}"
