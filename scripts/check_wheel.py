"""Builds the crf-rnn-3d wheel and proves it works installed, outside the repository.

    .venv/bin/python scripts/check_wheel.py [--full] [--keep DIR]

1. Copies the files git tracks (and the untracked ones it does not ignore) to a temporary
   folder, so the build sees exactly what a clone has, and runs `pip wheel` there: the build
   backend (setup.py) compiles the op libraries with TensorFlow's flags into the wheel.
2. Creates a fresh virtual environment in the temporary folder and installs the wheel into it:
   - default (`make test`): `--no-deps`, the dependencies taken from this environment through a
     .pth file (no download, no editable finder: .pth files in that folder are not processed);
   - `--full` (`make wheel-check`): the wheel with its `[cpu,phantoms]` extras, its
     dependencies resolved by pip as a user's would be.
3. In that environment, from a folder outside the repository: imports crf_rnn_3d from the
   installed wheel (not from the clone), runs a lattice filter, a CrfRnn layer and dense_crf on
   small inputs with known answers, and composes a config with the `crf3d-train` entry point.

Exits 0 when every check passes; prints each step.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run inside the fresh environment, from a folder outside the repository.
PROBE = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    import numpy as np
    import crf_rnn_3d
    from crf_rnn_3d.crf import CrfRnn
    from crf_rnn_3d.crf.dense_crf import dense_crf
    from crf_rnn_3d.lattice_op import Lattice
    from crf_rnn_3d.lattice_op import _library

    where = Path(crf_rnn_3d.__file__).resolve()
    venv = Path(sys.prefix).resolve()
    assert venv in where.parents, f"crf_rnn_3d imported from {where}, not from {venv}"
    lib = _library.library_path().resolve()
    assert venv in lib.parents, f"op library {lib} is not inside {venv}"
    print("imported", where.parent, "library", lib.name)

    # A normalised filter of a constant is that constant (a weighted average of equal values).
    rng = np.random.default_rng(0)
    features = rng.normal(size=(1, 6, 5, 4, 3)).astype(np.float32)
    values = np.full((1, 6, 5, 4, 2), 3.5, np.float32)
    lattice = Lattice(features)
    out = lattice.filter(values).numpy() / lattice.filter(np.ones_like(values[..., :1])).numpy()
    np.testing.assert_allclose(out, 3.5, rtol=1e-5)
    print("filter: normalised average of a constant is the constant")

    # The CRF head keeps the shape of the unaries and gives finite logits.
    unaries = rng.normal(size=(2, 6, 5, 4, 3)).astype(np.float32)
    image = rng.normal(size=(2, 6, 5, 4, 1)).astype(np.float32)
    refined = CrfRnn(spacing=(2.0, 1.0, 1.0), num_iterations=2)([unaries, image]).numpy()
    assert refined.shape == unaries.shape and np.isfinite(refined).all()
    print("CrfRnn: logits", refined.shape)

    # dense_crf removes a single flipped voxel inside a uniform region of one class.
    probs = np.zeros((8, 8, 8, 2), np.float32)
    probs[..., 0] = 0.8
    probs[..., 1] = 0.2
    probs[4, 4, 4] = (0.45, 0.55)
    labels = dense_crf(probs, np.zeros((8, 8, 8), np.float32), (1.0, 1.0, 1.0)).argmax(-1)
    assert (labels == 0).all(), "dense_crf kept the flipped voxel"
    print("dense_crf: the flipped voxel is removed")
    """
)


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("$", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def copy_sources(dest: Path) -> None:
    """The files a clone has (tracked, or untracked and not ignored), copied to dest."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True,
    ).stdout.decode()  # fmt: skip
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="install the dependencies too")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="crf3d-wheel-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        source, dist, venv, outside = (work / n for n in ("source", "dist", "venv", "outside"))
        copy_sources(source)
        run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
             "--quiet", "-w", dist, source])  # fmt: skip
        wheels = sorted(dist.glob("crf_rnn_3d-*.whl"))
        if len(wheels) != 1:
            print(f"error: expected one crf_rnn_3d wheel in {dist}, found {wheels}")
            return 1
        wheel = wheels[0]
        print("wheel:", wheel.name, f"{wheel.stat().st_size / 1e6:.1f} MB")
        run([sys.executable, "-m", "venv", venv])
        pip = [venv / "bin" / "python", "-m", "pip", "install", "--quiet"]
        if args.full:
            run([*pip, f"{wheel}[cpu,phantoms]"])
        else:
            ask = "import sysconfig; print(sysconfig.get_path('purelib'))"
            site = Path(
                subprocess.run([venv / "bin" / "python", "-c", ask],
                               check=True, capture_output=True, text=True).stdout.strip()
            )  # fmt: skip
            # the dependencies from this environment, after the fresh one's own packages
            (site / "zz_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
            run([*pip, "--no-deps", "--no-index", wheel])
        outside.mkdir(exist_ok=True)
        env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "2",
               "HOME": str(outside)}  # fmt: skip
        run([venv / "bin" / "python", "-c", PROBE], cwd=outside, env=env)
        shown = run(
            [venv / "bin" / "crf3d-train", "--cfg", "job", "experiment=smoke", "fold=1"],
            cwd=outside, env=env, capture_output=True, text=True,
        )  # fmt: skip
        if "fold: 1" not in shown.stdout or "name: smoke" not in shown.stdout:
            print(shown.stdout[-2000:])
            print("error: crf3d-train did not compose the packaged configs")
            return 1
        print("crf3d-train: composed the packaged configs (experiment=smoke fold=1)")
        print("wheel check passed")
        return 0
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
