"""Compile the native attention kernel (a shared library ONNX Runtime loads) with the system compiler.

`python -m mistral_edge.kernels.build` (run by `make install`) prints one line: what it built, or
one notice saying why not; it exits 0 either way, since without the library the portable function
body runs. The onnxruntime wheel ships no C headers, so they come from the system
(/usr/include/onnxruntime), from $MISTRAL_EDGE_ORT_INCLUDE, or from Debian's libonnxruntime-dev
(API 21, which ONNX Runtime 1.21 and later load) fetched with `apt-get download` into
kernels/build/ (git-ignored; nothing is installed system-wide). One variant per instruction set
(AVX-512, AVX2, portable) is compiled into the library and picked by cpuid when it loads: the
binary never depends on the build machine's CPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from . import HERE, OUT

HEADER_CACHE = HERE / "build" / "include"
HEADER = "onnxruntime_lite_custom_op.h"
DEBIAN_SUITE = "deb http://deb.debian.org/debian trixie main"
VARIANTS = {  # entry point -> compiler flags of that instruction set
    "unit_portable": [],
    "unit_avx2": ["-mavx2", "-mfma", "-mf16c"],
    "unit_avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}
FLAGS = ["-std=c++17", "-O3", "-fPIC", "-fvisibility=hidden", "-fopenmp-simd"]


class BuildError(Exception):
    """Why the library cannot be built here (one line)."""


def _run(cmd: list[str], timeout: float = 300) -> None:
    try:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BuildError(f"{cmd[0]}: {e}") from None
    if done.returncode:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise BuildError(f"{' '.join(cmd[:2])} failed: {lines[0] if lines else done.returncode}")


def _fetch_headers() -> Path:
    """Download Debian's libonnxruntime-dev into the cache with a private apt source list."""
    for tool in ("apt-get", "dpkg-deb"):
        if not shutil.which(tool):
            raise BuildError(f"no onnxruntime C headers and no {tool} to fetch them "
                             "(set MISTRAL_EDGE_ORT_INCLUDE to a folder holding onnxruntime_c_api.h)")
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "lists" / "partial").mkdir(parents=True)
        (t / "sources.list").write_text(DEBIAN_SUITE + "\n")
        apt = ["apt-get", "-q", "-o", f"Dir::Etc::SourceList={t / 'sources.list'}", "-o", "Dir::Etc::SourceParts=/dev/null",
               "-o", f"Dir::State::Lists={t / 'lists'}", "-o", f"Dir::Cache::archives={t}"]
        _run([*apt, "update"])
        subprocess.run(["chmod", "a+rwx", tmp], check=False)  # apt's sandbox user writes the .deb here
        cwd = os.getcwd()
        try:
            os.chdir(t)
            _run([*apt, "download", "libonnxruntime-dev"])
        finally:
            os.chdir(cwd)
        debs = sorted(t.glob("libonnxruntime-dev_*.deb"))
        if not debs:
            raise BuildError("apt-get download libonnxruntime-dev fetched nothing")
        _run(["dpkg-deb", "-x", str(debs[0]), str(t / "root")])
        found = t / "root" / "usr" / "include" / "onnxruntime"
        if not (found / HEADER).is_file():
            raise BuildError(f"libonnxruntime-dev has no {HEADER}")
        if HEADER_CACHE.exists():
            shutil.rmtree(HEADER_CACHE)
        HEADER_CACHE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(found, HEADER_CACHE)
    return HEADER_CACHE


def headers() -> Path:
    """The folder holding onnxruntime's C/C++ headers, fetching them when none is found."""
    env = os.environ.get("MISTRAL_EDGE_ORT_INCLUDE")
    candidates = [Path(env)] if env else [Path("/usr/include/onnxruntime"), HEADER_CACHE]
    for folder in candidates:
        if (folder / HEADER).is_file():
            return folder
    if env:
        raise BuildError(f"MISTRAL_EDGE_ORT_INCLUDE={env} has no {HEADER}")
    return _fetch_headers()


def build() -> Path:
    """Compile the library into OUT (replaced only once complete) and return its path."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise BuildError("no C++ compiler (c++ or g++, or set CXX)")
    include = headers()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=OUT.parent) as tmp:
        objects = []
        for unit, flags in VARIANTS.items():
            obj = str(Path(tmp) / f"{unit}.o")
            _run([cxx, *FLAGS, *flags, f"-DWGQA_UNIT={unit}", "-c", str(HERE / "wgqa_impl.cc"), "-o", obj])
            objects.append(obj)
        glue = str(Path(tmp) / "wgqa.o")
        _run([cxx, *FLAGS, f"-I{include}", "-c", str(HERE / "wgqa.cc"), "-o", glue])
        lib = Path(tmp) / OUT.name
        _run([cxx, "-shared", "-o", str(lib), glue, *objects])
        os.replace(lib, OUT)
    return OUT


def main() -> int:
    try:
        path = build()
    except BuildError as e:
        print(f"notice: native attention kernel not built ({e}); ONNX Runtime will run the portable "
              "function body", file=sys.stderr)
        return 0
    print(f"built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
