"""Build of the compiled TensorFlow ops (the rest of the metadata is in pyproject.toml).

`pip install .` (or `pip wheel .`) compiles each op library below (the lattice ops; the CRF's
fused mean-field op) with the compiler flags that the installed TensorFlow reports through
`tf.sysconfig`, and ships it inside the package:
- the framework-free C++ core (no TensorFlow include) with the core flags, held to
  `-Wall -Wextra` (`make lint` turns them into errors);
- the TensorFlow adapter (op registrations and kernels) with TensorFlow's compile flags;
- linked into one shared library with TensorFlow's link flags.

The import package is `crf_rnn_3d`, mapped onto the `src/` folder; the Hydra configs ship as
`crf_rnn_3d.configs`, mapped onto `configs/`. Environment: CXX picks the compiler (g++ by
default); CRF3D_BUILD_JOBS the number of parallel compile jobs (default: the CPU count).
"""

from __future__ import annotations

import os
import shlex
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
PACKAGE = "crf_rnn_3d"
CORE_FLAGS = ["-std=c++17", "-O3", "-fPIC", "-pthread", "-Wall", "-Wextra"]
ADAPTER_FLAGS = ["-std=c++17", "-O3", "-fPIC", "-pthread", "-Wall", "-Wno-deprecated-declarations"]


class OpLibrary(Extension):
    """A TensorFlow op library: framework-free core sources plus TensorFlow adapter sources."""

    def __init__(self, name: str, core: list[str], adapter: list[str], include: list[str]):
        super().__init__(name, sources=core + adapter, include_dirs=include, language="c++")
        self.core = core
        self.adapter = adapter
        self.depends = sorted(
            str(p.relative_to(ROOT)) for d in include for p in (ROOT / d).glob("*.h")
        )


# One entry per compiled library: (module name, core sources, adapter sources, include dirs).
# The lattice op knows nothing of the CRF; the CRF's fused mean-field op links the lattice core
# as well, so that each library is self-contained (crf -> lattice_op is the allowed direction).
LATTICE_CORE = ["src/lattice_op/csrc/permutohedral.cc", "src/lattice_op/csrc/gaussian.cc"]
OP_LIBRARIES = [
    OpLibrary(
        f"{PACKAGE}.lattice_op._lattice_ops",
        core=LATTICE_CORE,
        adapter=["src/lattice_op/tf_op/ops.cc", "src/lattice_op/tf_op/kernels.cc"],
        include=["src/lattice_op/csrc", "src/lattice_op/tf_op"],
    ),
    OpLibrary(
        f"{PACKAGE}.crf._crf_ops",
        core=[*LATTICE_CORE, "src/crf/csrc/mean_field.cc"],
        adapter=["src/crf/tf_op/ops.cc", "src/crf/tf_op/kernels.cc"],
        include=["src/lattice_op/csrc", "src/lattice_op/tf_op", "src/crf/csrc"],
    ),
]


class BuildOps(build_ext):
    """Compiles each OpLibrary with TensorFlow's flags, sources in parallel."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, OpLibrary):
            super().build_extension(ext)
            return
        try:
            import tensorflow as tf
        except ImportError as exc:  # the build needs TensorFlow's headers and libraries
            raise RuntimeError(
                "building crf-rnn-3d's op libraries needs TensorFlow 2.21 in the build "
                "environment: install it first and build with --no-build-isolation, or let pip "
                "build in isolation (pyproject.toml's build requirements)"
            ) from exc
        cxx = shlex.split(os.environ.get("CXX", "g++"))
        includes = [f"-I{ROOT / d}" for d in ext.include_dirs]
        tf_compile = list(tf.sysconfig.get_compile_flags())
        tf_link = list(tf.sysconfig.get_link_flags())
        temp = Path(self.build_temp) / ext.name
        temp.mkdir(parents=True, exist_ok=True)
        jobs = []
        for source in ext.core:
            jobs.append((source, CORE_FLAGS + includes))
        for source in ext.adapter:
            jobs.append((source, ADAPTER_FLAGS + includes + tf_compile))

        def compile_one(job: tuple[str, list[str]]) -> str:
            source, flags = job
            obj = temp / (Path(source).stem + ".o")
            self._run([*cxx, *flags, "-c", str(ROOT / source), "-o", str(obj)])
            return str(obj)

        workers = int(os.environ.get("CRF3D_BUILD_JOBS", os.cpu_count() or 1))
        with ThreadPoolExecutor(max(workers, 1)) as pool:
            objects = list(pool.map(compile_one, jobs))
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".tmp")
        self._run([*cxx, "-shared", "-pthread", *objects, "-o", str(partial), *tf_link])
        os.replace(partial, target)

    @staticmethod
    def _run(cmd: list[str]) -> None:
        print(" ".join(shlex.quote(c) for c in cmd), flush=True)
        subprocess.run(cmd, check=True)


def packages() -> tuple[list[str], dict[str, str]]:
    """crf_rnn_3d and its subpackages (folders under src/ with an __init__.py), and configs."""
    names, dirs = [PACKAGE], {PACKAGE: "src", f"{PACKAGE}.configs": "configs"}
    for init in sorted((ROOT / "src").rglob("__init__.py")):
        rel = init.parent.relative_to(ROOT / "src")
        if rel.parts:
            names.append(".".join((PACKAGE, *rel.parts)))
    names.append(f"{PACKAGE}.configs")
    return names, dirs


PACKAGES, PACKAGE_DIRS = packages()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIRS,
    package_data={f"{PACKAGE}.configs": ["*.yaml", "**/*.yaml"]},
    ext_modules=OP_LIBRARIES,
    cmdclass={"build_ext": BuildOps},
)
