"""Installation without triton: the base requirements, the imports, and the error of the triton backend.

The resolver tests run pip offline against a folder of stand-in wheels (metadata only), so
they show what pip would pick for a given torch without downloading anything.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run_python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (nothing imported yet); fails the test on a non-zero exit."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_torch_backend_never_imports_triton():
    _run_python(
        """
        import sys
        import unicom_kernels, unicom_kernels.ops
        assert "triton" not in sys.modules, "importing unicom_kernels imported triton"
        import torch
        from unicom_kernels import DualPartialMarginLoss, dual_partial_margin_loss
        x = torch.randn(6, 8, requires_grad=True)
        y = torch.randint(0, 5, (6,))
        dual_partial_margin_loss(x, torch.randn(5, 8), y, backend="torch").backward()
        DualPartialMarginLoss(5, 8)(x, y).backward()  # backend="auto": torch on the CPU
        assert "triton" not in sys.modules, "a CPU loss call imported triton"
        """
    )


def test_missing_triton_raises_a_clear_error():
    # None in sys.modules makes every ``import triton`` fail, as if it were not installed.
    _run_python(
        """
        import sys
        sys.modules["triton"] = None
        import torch
        from unicom_kernels import DualPartialMarginLoss, dual_partial_margin_loss
        from unicom_kernels.ops import check_backend, get_backend

        def raises(call, *words):
            try:
                call()
            except ValueError as exc:
                assert all(w in str(exc) for w in words), str(exc)
            else:
                raise AssertionError("no ValueError")

        x, w, y = torch.randn(6, 8), torch.randn(5, 8), torch.randint(0, 5, (6,))
        words = ("backend='triton'", "pip install triton", "backend='torch'")
        raises(lambda: dual_partial_margin_loss(x, w, y, backend="triton"), *words)
        raises(lambda: DualPartialMarginLoss(5, 8, backend="triton")(x, y), *words)
        raises(lambda: get_backend("triton", x.device), *words)
        # "auto" picks triton for CUDA tensors (the device is only inspected, no GPU needed).
        raises(lambda: check_backend("auto", torch.device("cuda"), torch.float32), "backend='auto'", "pip install")
        check_backend("auto", torch.device("cuda"), torch.float64)  # fp64 runs on the torch backend
        dual_partial_margin_loss(x, w, y, backend="torch")
        try:
            import unicom_kernels.triton  # noqa: F401
        except ModuleNotFoundError as exc:
            assert "pip install triton" in str(exc), str(exc)
        else:
            raise AssertionError("unicom_kernels.triton imported without triton")
        """
    )


def _wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> None:
    """A stand-in wheel: metadata only, enough for pip to resolve (never installed)."""
    info = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(f"{info}/METADATA", metadata)
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")


# The triton each torch build pins (Linux CUDA builds pin one, as the real ones do; CPU builds none).
TORCH_BUILDS = {"2.4.0+cpu": None, "2.5.0": "3.1.0", "2.9.0": "3.5.0", "2.14.1": "3.8.0"}


def _resolve(tmp_path: Path, torch_version: str, extras: str = "") -> dict[str, str]:
    """What ``pip install ".[extras]"`` would install next to ``torch==torch_version``, offline:
    ``{name: version}``. Fails the test when pip finds no solution."""
    wheels, project = tmp_path / "wheels", tmp_path / "project"
    wheels.mkdir(parents=True)
    project.mkdir()
    pin = TORCH_BUILDS[torch_version]
    _wheel(wheels, "torch", torch_version, () if pin is None else (f'triton=={pin}; platform_system == "Linux"',))
    for version in ("3.1.0", "3.5.0", "3.6.0", "3.8.0"):
        _wheel(wheels, "triton", version)
    _wheel(wheels, "numpy", "1.26.4")
    for name in ("setup.py", "pyproject.toml", "README.md"):  # the metadata only, built in a copy
        shutil.copy(ROOT / name, project)
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--quiet", "--ignore-installed"]
    cmd += ["--no-index", "--find-links", str(wheels), "--no-build-isolation", "--report", str(report)]
    cmd += [f"{project}{extras}", f"torch=={torch_version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"pip cannot install with torch {torch_version}:\n{proc.stdout}{proc.stderr}"
    return {i["metadata"]["name"]: i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}


@pytest.mark.parametrize("torch_version", ["2.4.0+cpu", "2.5.0", "2.9.0"])
def test_base_install_accepts_older_torch(tmp_path, torch_version):
    resolved = _resolve(tmp_path, torch_version)
    assert resolved["torch"] == torch_version
    # The triton of the torch build, if any: never one that the base requirements ask for.
    assert resolved.get("triton") == TORCH_BUILDS[torch_version]


def test_triton_extra_adds_triton(tmp_path):
    resolved = _resolve(tmp_path, "2.4.0+cpu", "[triton]")
    assert resolved["triton"] == "3.8.0"
    assert _resolve(tmp_path / "cuda", "2.14.1", "[triton]")["triton"] == "3.8.0"
