"""README.md's commands for a newcomer's own image folder, run exactly as written.

The block is read from README.md itself (the fenced ``bash`` block after the marker comment),
so the README and this test cannot drift apart: only the values of ``IMAGES`` and ``OUT`` are
replaced, by a tiny image folder and a temporary output folder; every other line runs verbatim
in ``bash -e`` from the repository root, with the console scripts of this interpreter on PATH.
That run trains for the README's 100 steps and is marked ``slow``; the default suite runs the
same block with only the training cut to 4 steps.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

for _module in ("yaml", "tqdm", "open_clip", "faiss"):  # the pipeline extra
    pytest.importorskip(_module)

from test_pipeline_train import write_bar_images  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
MARKER = "<!-- the block below is run by tests/test_readme_commands.py -->"
PLACEHOLDERS = ("IMAGES", "OUT")


def readme_block(text: str) -> str:
    """The fenced ``bash`` block right after :data:`MARKER` in ``text``."""
    assert text.count(MARKER) == 1, f"README.md must hold the marker {MARKER!r} exactly once"
    after = text.split(MARKER, 1)[1]
    found = re.match(r"\s*```bash\n(.*?)\n```", after, re.DOTALL)
    assert found, "the marker must be followed by a ```bash fenced block"
    return found.group(1)


def substitute(block: str, values: dict[str, str]) -> str:
    """``block`` with the value of each ``NAME=...`` placeholder line replaced; nothing else changes."""
    lines = block.splitlines()
    for name, value in values.items():
        hits = [i for i, line in enumerate(lines) if line.startswith(f"{name}=")]
        assert len(hits) == 1, f"the README block must set {name}= on exactly one line"
        lines[hits[0]] = f"{name}={value}"
    return "\n".join(lines) + "\n"


def test_block_parsing_and_substitution():
    text = f'intro\n\n{MARKER}\n```bash\nIMAGES=a/b\nOUT=runs/x\necho "$IMAGES" $OUT\n```\nlater\n'
    block = readme_block(text)
    assert block == 'IMAGES=a/b\nOUT=runs/x\necho "$IMAGES" $OUT'
    assert (
        substitute(block, {"IMAGES": "/tmp/i", "OUT": "/tmp/o"}) == 'IMAGES=/tmp/i\nOUT=/tmp/o\necho "$IMAGES" $OUT\n'
    )
    with pytest.raises(AssertionError, match="exactly once"):
        readme_block(text + MARKER)
    with pytest.raises(AssertionError, match="OUT="):
        substitute("IMAGES=a\n", {"OUT": "x"})


def test_readme_block_names_only_the_placeholders_as_paths():
    """The only folder-dependent parts of the block are the two placeholders (so a reader's
    substitution of these two lines is all it takes)."""
    block = readme_block(README.read_text(encoding="utf-8"))
    assert [line.split("=", 1)[0] for line in block.splitlines()[:2]] == list(PLACEHOLDERS)
    commands = [line.split()[0] for line in block.splitlines()[2:] if line and not line.startswith(" ")]
    assert commands == ["unicom-features", "unicom-cluster", "unicom-train", "unicom-evaluate", "cat"]


# The CI variant: the same block with only the length of the training run cut.
SHORTER = {"--max-steps 100": "--max-steps 4", "--warmup-steps 10": "--warmup-steps 2"}


def run_block(script: str, tmp_path: Path, steps: int) -> None:
    """Runs ``script`` (the README block, placeholders substituted) and checks what it leaves."""
    out = tmp_path / "out"
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    done = subprocess.run(["bash", "-e", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"README commands failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert (out / "clusters" / "labels.npy").is_file()
    assert (out / "train" / "final.pt").is_file() and (out / "train" / "loss.png").is_file()
    assert f"step {steps}/{steps}" in done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "checkpoint"
    # The last command prints the markdown table.
    table = done.stdout[done.stdout.index("| method |") :]
    assert "Recall@1" in table and "mAP@R" in table and "| checkpoint |" in table


def tiny_script(tmp_path: Path) -> str:
    """The README block on 4 class folders of 10 noisy 8x8 images, output under ``tmp_path``."""
    images = write_bar_images(tmp_path, 4, 10) / "imgs"
    values = {"IMAGES": str(images), "OUT": str(tmp_path / "out")}
    return substitute(readme_block(README.read_text(encoding="utf-8")), values)


@pytest.mark.slow
def test_readme_commands_on_a_tiny_image_folder(tmp_path):
    """Exactly the README commands (100 training steps): ~45 s on an idle 2-core machine."""
    run_block(tiny_script(tmp_path), tmp_path, 100)


def test_readme_commands_with_a_shorter_training_run(tmp_path):
    """The README commands with 4 training steps instead of 100 (nothing else changed)."""
    script = tiny_script(tmp_path)
    shorter = script
    for long, short in SHORTER.items():
        assert shorter.count(long) == 1, f"README's unicom-train line no longer holds {long!r}"
        shorter = shorter.replace(long, short)
    changed = [(a, b) for a, b in zip(script.splitlines(), shorter.splitlines(), strict=True) if a != b]
    assert len(changed) == 1 and changed[0][0].lstrip().startswith("--embedding-dim"), changed
    run_block(shorter, tmp_path, 4)
