"""Why does pykeops 2.3 crash on CUDA 13, and which environment makes it work? One diagnosis run.

    python3 benchmarks/keops_cuda13.py --device cuda --json keops.json --log keops.log --env-file keops_env.sh
    python3 benchmarks/keops_cuda13.py --device cpu ...     # the same code paths without a GPU (dry run)

Tests the hypotheses of README.md, "KeOps on CUDA 13", one environment per attempt, each attempt in its own
process group with its own time limit and a FRESH empty ``KEOPS_CACHE_FOLDER`` (the cached ``nvrtc_jit.so``
is keyed by host and Python version, not by the environment that built it). The attempts are cumulative:

    a  as it is: ``import pykeops; pykeops.test_torch_bindings()``, then a small ``LazyTensor``
       ``Kmin_argKmin`` on the device compared with ``torch.cdist``;
    b  a, with every ``.../stubs`` folder removed from ``LD_LIBRARY_PATH`` and ``LIBRARY_PATH``;
    c  b, with ``LD_PRELOAD`` = the driver's ``libcuda.so.1`` and the CUDA 13 ``libnvrtc.so.13``;
    d  c, with ``CUDA_PATH``/``CUDA_HOME`` = a folder holding ``include/cuda.h``, ``include/nvrtc.h`` and
       ``lib64/libnvrtc.so`` (made of symlinks when no folder has them together), that folder's ``lib64``
       also first in ``LD_LIBRARY_PATH``/``LIBRARY_PATH``: keopscore finds nvrtc with ctypes' ``find_library``
       (ldconfig, then gcc with ``LIBRARY_PATH``, then ld with ``LD_LIBRARY_PATH``), never via ``CUDA_PATH``,
       and links ``-lcuda -lnvrtc``, which needs unversioned ``libcuda.so``/``libnvrtc.so``;
    e  d, with ``CXX`` = a wrapper of g++ (keopscore 2.3 compiles ``nvrtc_jit.so`` and the pybind11 module
       with ``$CXX``: the only compiler knob its source reads) that links with ``-Wl,--no-as-needed``
       and appends the absolute paths of the driver's ``libcuda.so.1`` and of ``libnvrtc.so.13`` plus an
       rpath, so the JIT library records both as ``NEEDED`` instead of binding to whatever was loaded first;
    f  e, linking the shared libraries with ``-Wl,-Bsymbolic -Wl,--exclude-libs,ALL``. On the H200 of
       2026-11-29 attempts a, d and e crashed inside ``Compile`` of ``nvrtc_jit.so``, in ``std::ostream``'s
       ``operator<<(int)`` (cuda-gdb: ``_M_insert<long>`` -> ``codecvt::do_unshift``): the compiler there
       (``/opt/gcc``) links its libstdc++ statically into the JIT library, whose locale symbols then bind to
       the Python process's own libstdc++.so.6 (a facet table of another version). Binding them inside the
       library keeps one consistent copy;
    g  e, with the system's ``/usr/bin/g++`` (linking the libstdc++.so.6 the process already uses) when it
       is another compiler than the one found first.

On a GPU whose compute mode is ``Default`` the attempts run at the same time (the working one is the first in
the order above that worked; the others are stopped once it is known); elsewhere (a CPU dry run, or an
exclusive compute mode) one after the other, stopping at the first that works. A separate run of attempt
a's environment with ``LD_DEBUG=bindings`` shows which ``libcuda`` the symbols of ``nvrtc_jit.so`` bind to.
At the end ``dn2_lightning.knn.keops_probe`` runs once in the working environment (else in attempt a's).

Writes ``--json`` (``{"attempts": [...], "working_env": {VAR: value or null (unset)} or null, "versions":
{...}, ...}``, rewritten after every attempt so a time-out still leaves the attempts done so far), a
readable ``--log``, and, when an attempt worked, ``--env-file``: ``export``/``unset`` lines for ``source``.
Standard library only in this process: torch and pykeops are imported in the children.
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T0 = time.monotonic()
ORDER = ("a", "b", "c", "d", "e", "f", "g")
TITLES = {
    "a": "as it is",
    "b": "without .../stubs in LD_LIBRARY_PATH and LIBRARY_PATH",
    "c": "+ LD_PRELOAD of the driver's libcuda.so.1 and libnvrtc.so.13",
    "d": "+ CUDA_PATH/CUDA_HOME with include/cuda.h, include/nvrtc.h, lib64/libnvrtc.so together",
    "e": "+ CXX wrapper: g++ -Wl,--no-as-needed ... <libcuda.so.1> <libnvrtc.so.13> -Wl,-rpath",
    "f": "e + -Wl,-Bsymbolic -Wl,--exclude-libs,ALL (the JIT library's static libstdc++ bound inside it)",
    "g": "e with the system's /usr/bin/g++ (the process's own libstdc++.so.6)",
}
SELF_CONTAINED = "-Wl,-Bsymbolic -Wl,--exclude-libs,ALL"
LIB_DIRS = [
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/nvidia/lib64",
    "/usr/local/nvidia/lib",
    "/usr/lib/wsl/lib",
    "/usr/local/cuda/lib64",
    "/usr/local/cuda/lib",
    "/usr/local/cuda/lib64/stubs",
    "/usr/local/cuda/lib/stubs",
    "/usr/local/cuda/targets/x86_64-linux/lib",
    "/usr/local/cuda/targets/x86_64-linux/lib/stubs",
    "/usr/local/cuda/compat",
    "/usr/local/cuda/compat/lib",
    "/opt/cuda/lib64",
]
INCLUDE_DIRS = [
    "/usr/local/cuda/include",
    "/usr/local/cuda/targets/x86_64-linux/include",
    "/opt/cuda/include",
    "/usr/include",
]

CHILD = r"""
import faulthandler, json, os, sys, time
faulthandler.enable()
T0 = time.time()
def stage(name):
    print(f"STAGE {name} (t={time.time() - T0:.1f}s)", file=sys.stderr, flush=True)
    print(f"STAGE {name}", flush=True)
device = sys.argv[1]
stage("import torch")
import torch
info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
stage("import pykeops (compiles the JIT binaries on a fresh cache)")
import pykeops
info["pykeops"] = pykeops.__version__
info["pykeops_file"] = pykeops.__file__
try:
    from keopscore.config import config, cuda_config
    info.update(
        keops_use_cuda=cuda_config.get_use_cuda(), libcuda_folder=cuda_config.libcuda_folder,
        libnvrtc_folder=cuda_config.libnvrtc_folder, cuda_include_path=cuda_config.cuda_include_path,
        keops_cuda_version=cuda_config.cuda_version, n_gpus=cuda_config.n_gpus,
        cxx=getattr(cuda_config, "cxx_compiler", None), nvrtc_flags=cuda_config.nvrtc_flags,
        build_folder=config.get_build_folder(),
    )
except Exception as err:  # the config layout is an implementation detail of keopscore 2.3
    info["config_error"] = repr(err)
print("KEOPS_INFO " + json.dumps(info, default=str), flush=True)
stage("pykeops.test_torch_bindings()")
pykeops.test_torch_bindings()
stage(f"LazyTensor Kmin_argKmin on {device}")
from pykeops.torch import LazyTensor
g = torch.Generator().manual_seed(0)
# the formula, dimension and K of dn2_lightning.knn's probe, so that its later run reuses this compilation
x = torch.randn(500, 3, generator=g).to(device)
y = torch.randn(700, 3, generator=g).to(device)
d = ((LazyTensor(x[:, None, :]) - LazyTensor(y[None, :, :])) ** 2).sum(-1)
values, indices = d.Kmin_argKmin(K=2, dim=1)
ref = torch.cdist(x.double(), y.double()).square().topk(2, dim=1, largest=False)
err = (values.double() - ref.values).abs().max().item()
same = (indices.long().cpu() == ref.indices.cpu()).all(1).float().mean().item()
print(f"LAZY result device={values.device} max_abs_err={err:.3g} rows_with_same_indices={100 * same:.1f}%", flush=True)
assert values.device.type == torch.device(device).type, f"KeOps answered on {values.device}, not {device}"
assert err < 1e-3, f"KeOps distances differ from torch.cdist by {err}"
stage("done")
print("KEOPS_ATTEMPT_OK", flush=True)
"""

PROBE = r"""
import sys, time
t = time.time()
from dn2_lightning.knn import keops_probe
verdict = keops_probe(sys.argv[1], timeout_s=float(sys.argv[2]))
print("KEOPS_PROBE_VERDICT " + repr(verdict) + f" ({time.time() - t:.1f} s)", flush=True)
"""


def now() -> float:
    return time.monotonic() - T0


def say(msg: str) -> None:
    print(f"[keops_cuda13 {time.strftime('%H:%M:%S')} +{now():5.1f}s] {msg}", flush=True)


def run_quiet(cmd: list[str] | str, timeout: float = 20, **kw) -> str:
    """stdout+stderr of a short command, or a one-line reason why there is none."""
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, shell=isinstance(cmd, str), errors="replace", **kw
        )
        return (proc.stdout + proc.stderr).strip()
    except (OSError, subprocess.SubprocessError) as err:
        return f"<{type(err).__name__}: {err}>"


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def dist_location(dist: str) -> str | None:
    try:
        files = importlib.metadata.distribution(dist).locate_file("")
        return str(files)
    except importlib.metadata.PackageNotFoundError:
        return None


def nvidia_dirs() -> list[str]:
    """Folders of the ``nvidia`` namespace package (pip CUDA wheels), found without importing torch."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    return list(spec.submodule_search_locations or []) if spec else []


def path_list(value: str | None) -> list[str]:
    return [p for p in (value or "").split(":") if p]


def ldconfig_lines(pattern: str) -> list[str]:
    out = run_quiet("ldconfig -p 2>/dev/null || /sbin/ldconfig -p", timeout=10)
    return [line.strip() for line in out.splitlines() if re.search(pattern, line)]


def find_files(patterns: list[str], dirs: list[str]) -> list[str]:
    seen, found = set(), []
    for folder in dirs:
        for pattern in patterns:
            for path in sorted(glob.glob(os.path.join(folder, pattern))):
                if path not in seen:
                    seen.add(path)
                    found.append(path)
    return found


def describe(path: str) -> str:
    real = os.path.realpath(path)
    return path if real == path else f"{path} -> {real}"


def library_dirs() -> list[str]:
    dirs = list(LIB_DIRS)
    for base in nvidia_dirs():
        dirs += sorted(glob.glob(os.path.join(base, "*", "lib"))) + sorted(glob.glob(os.path.join(base, "*", "lib64")))
    dirs += glob.glob("/usr/local/cuda-*/lib64") + glob.glob("/usr/local/cuda-*/lib")
    dirs += path_list(os.environ.get("LD_LIBRARY_PATH")) + path_list(os.environ.get("LIBRARY_PATH"))
    for var in ("CUDA_PATH", "CUDA_HOME", "CONDA_PREFIX"):
        if os.environ.get(var):
            dirs += [os.path.join(os.environ[var], "lib64"), os.path.join(os.environ[var], "lib")]
    out = []
    for d in dirs:
        if d not in out and os.path.isdir(d):
            out.append(d)
    return out


def include_dirs() -> list[str]:
    dirs = list(INCLUDE_DIRS)
    for base in nvidia_dirs():
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    dirs += glob.glob("/usr/local/cuda-*/include")
    for var in ("CUDA_PATH", "CUDA_HOME", "CONDA_PREFIX"):
        if os.environ.get(var):
            dirs.append(os.path.join(os.environ[var], "include"))
    out = []
    for d in dirs:
        if d not in out and os.path.isdir(d):
            out.append(d)
    return out


def is_stub(path: str) -> bool:
    return "/stubs" in path or "/stubs" in os.path.realpath(path)


def driver_libcuda(libcudas: list[str]) -> str | None:
    """The driver's libcuda.so.1 (never a stub): ldconfig's first, else the first file found."""
    for line in ldconfig_lines(r"\blibcuda\.so\.1\b"):
        path = line.split("=>")[-1].strip()
        if os.path.exists(path) and not is_stub(path):
            return path
    for path in libcudas:
        if os.path.basename(path) == "libcuda.so.1" and not is_stub(path) and os.path.exists(path):
            return path
    for path in libcudas:
        if re.fullmatch(r"libcuda\.so\.\d+\.\d+.*", os.path.basename(path)) and not is_stub(path):
            return path
    return None


def cuda13_nvrtc(nvrtcs: list[str]) -> str | None:
    """libnvrtc.so.13* of the pip CUDA 13 wheel first (nvidia/cu13, nvidia/cuda_nvrtc), else any found."""
    main = [p for p in nvrtcs if re.fullmatch(r"libnvrtc\.so\.13(\.[\d.]+)?", os.path.basename(p))]
    for preferred in ("/nvidia/cu13/", "/nvidia/cuda_nvrtc/", "/usr/local/cuda"):
        for path in main:
            if preferred in path and os.path.exists(path):
                return path
    return next((p for p in main if os.path.exists(p)), None)


def collect_facts(device: str) -> dict:
    libs = find_files(["libcuda.so*", "libnvrtc*.so*", "libcudart.so*"], library_dirs())
    incs = find_files(["cuda.h", "nvrtc.h", "cuda_fp16.h"], include_dirs())
    from ctypes.util import find_library

    facts = {
        "device": device,
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "versions": {d: version(d) for d in ("keopscore", "pykeops", "pybind11", "torch", "numpy")},
        "locations": {d: dist_location(d) for d in ("keopscore", "pykeops", "pybind11")},
        "env": {
            v: os.environ.get(v)
            for v in (
                "LD_LIBRARY_PATH",
                "LIBRARY_PATH",
                "LD_PRELOAD",
                "CUDA_PATH",
                "CUDA_HOME",
                "CUDA_VISIBLE_DEVICES",
                "CXX",
                "CXXFLAGS",
                "KEOPS_CACHE_FOLDER",
                "PYTHONPATH",
                "CONDA_PREFIX",
            )
        },  # fmt: skip
        "ctypes_find_library": {n: find_library(n) for n in ("cuda", "nvrtc", "cudart")},
        "ldconfig": ldconfig_lines(r"libcuda\.so|libnvrtc|libcudart"),
        "libraries": [describe(p) for p in libs],
        "headers": [describe(p) for p in incs],
        "nvidia_package_dirs": nvidia_dirs(),
        "python_h": None,
        "cxx": run_quiet("g++ --version | head -n 1", timeout=10),
        "gcc_default_as_needed": run_quiet("g++ -dumpspecs 2>/dev/null | grep -c -- --as-needed", timeout=10),
        "ld": run_quiet("ld --version | head -n 1", timeout=10),
        "objdump": shutil.which("objdump"),
        "readelf": shutil.which("readelf"),
    }
    import sysconfig

    include = sysconfig.get_paths().get("include", "")
    facts["python_h"] = (
        os.path.join(include, "Python.h")
        if os.path.isfile(os.path.join(include, "Python.h"))
        else (f"missing: {include}/Python.h (pykeops' pybind11 module cannot compile)")
    )
    if device == "cuda":
        facts["nvidia_smi"] = run_quiet(
            "nvidia-smi --query-gpu=name,driver_version,compute_mode,memory.total --format=csv,noheader", timeout=20
        )
    facts["_libcudas"] = [p for p in libs if os.path.basename(p).startswith("libcuda.so")]
    facts["_nvrtcs"] = [p for p in libs if os.path.basename(p).startswith("libnvrtc")]
    facts["_headers"] = incs
    return facts


# --------------------------------------------------------------------------------------------------
# the environments


def without_stubs(value: str | None) -> str | None:
    kept = [p for p in path_list(value) if "/stubs" not in p]
    return ":".join(kept) if kept else None


def prepend(value: str | None, *paths: str) -> str:
    return ":".join([*paths, *(p for p in path_list(value) if p not in paths)])


def cuda_folder(facts: dict, nvrtc: str | None, libcuda: str | None, scratch: Path) -> tuple[str | None, str]:
    """A folder with include/cuda.h, include/nvrtc.h and lib64/libnvrtc.so; made of symlinks unless one exists."""
    for base in ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-13*")), "/opt/cuda"]:
        b = Path(base)
        wanted = ["include/cuda.h", "include/nvrtc.h", "lib64/libnvrtc.so"]
        wanted += [] if libcuda is None else ["lib64/libcuda.so"]
        if all((b / w).exists() for w in wanted):
            return str(b), f"{base} has them all"
    headers = facts["_headers"]
    cuda_h = [h for h in headers if h.endswith("/cuda.h") and "/torch/" not in h and "/triton/" not in h]
    nvrtc_h = [h for h in headers if h.endswith("/nvrtc.h")]
    if nvrtc is None or not cuda_h or not nvrtc_h:
        return None, f"cannot build one: libnvrtc.so.13={nvrtc}, cuda.h={cuda_h[:3]}, nvrtc.h={nvrtc_h[:3]}"
    # prefer the include folder that holds both headers (the pip wheel's nvidia/cu13/include does)
    both = [os.path.dirname(h) for h in cuda_h if os.path.dirname(h) in {os.path.dirname(n) for n in nvrtc_h}]
    root = scratch / "cuda_path"
    (root / "lib64").mkdir(parents=True, exist_ok=True)
    if both:
        (root / "include").symlink_to(both[0], target_is_directory=True)
        how = f"include -> {both[0]}"
    else:  # the whole cuda.h folder, plus the nvrtc headers beside it
        inc = root / "include"
        inc.mkdir()
        src = os.path.dirname(cuda_h[0])
        for entry in os.listdir(src):
            (inc / entry).symlink_to(os.path.join(src, entry))
        for h in glob.glob(os.path.join(os.path.dirname(nvrtc_h[0]), "nvrtc*.h")):
            if not (inc / os.path.basename(h)).exists():
                (inc / os.path.basename(h)).symlink_to(h)
        how = f"include = {src} + {os.path.dirname(nvrtc_h[0])}/nvrtc*.h"
    lib = root / "lib64"
    for path in glob.glob(os.path.join(os.path.dirname(nvrtc), "libnvrtc*")):
        (lib / os.path.basename(path)).symlink_to(path)
    if not (lib / "libnvrtc.so").exists():
        (lib / "libnvrtc.so").symlink_to(nvrtc)
    if libcuda is not None:
        for name in ("libcuda.so", "libcuda.so.1"):
            if not (lib / name).exists():
                (lib / name).symlink_to(libcuda)
    return str(root), f"symlinks: {how}; lib64 = {os.path.dirname(nvrtc)}/libnvrtc* (+ libnvrtc.so, libcuda.so)"


def default_cxx() -> str | None:
    """The compiler keopscore picks: ``$CXX`` if it names one, else the first ``g++`` on the PATH."""
    return os.environ.get("CXX") if os.environ.get("CXX") and shutil.which(os.environ["CXX"]) else shutil.which("g++")


def cxx_wrapper(
    scratch: Path,
    libcuda: str | None,
    nvrtc: str | None,
    gxx: str | None = None,
    link_flags: str = "",
    name: str = "cxx_no_as_needed.sh",
) -> tuple[str | None, str]:
    gxx = gxx or default_cxx()
    if gxx is None:
        return None, "no g++ found"
    extra = " ".join(shlex.quote(p) for p in (libcuda, nvrtc) if p)
    rpath = ":".join(sorted({os.path.dirname(p) for p in (libcuda, nvrtc) if p}))
    rpath_flag = f" -Wl,-rpath,{shlex.quote(rpath)}" if rpath else ""
    script = scratch / name
    script.write_text(
        "#!/bin/sh\n"
        "# keopscore 2.3 links its CUDA JIT libraries with '-lcuda -lnvrtc' BEFORE the source file; under the\n"
        "# --as-needed default neither is recorded. Record the real libraries, by absolute path, with an rpath.\n"
        'case " $* " in\n'
        f'  *" -lnvrtc "*) exec {shlex.quote(gxx)} -Wl,--no-as-needed {link_flags} "$@" {extra}{rpath_flag} ;;\n'
        "esac\n"
        f'exec {shlex.quote(gxx)} "$@"\n'
    )
    script.chmod(0o755)
    return str(
        script
    ), f"{script} wraps {gxx}, {link_flags + ', ' if link_flags else ''}appends {extra or 'nothing'}{rpath_flag}"


def build_attempts(facts: dict, scratch: Path) -> list[dict]:
    base = dict(os.environ)
    libcuda = driver_libcuda(facts["_libcudas"])
    nvrtc = cuda13_nvrtc(facts["_nvrtcs"])
    facts["chosen_libcuda"], facts["chosen_nvrtc"] = libcuda, nvrtc
    attempts = []
    changes: dict[str, str | None] = {}

    def add(name: str, note: str, applicable: bool = True) -> None:
        attempt = {"name": name, "title": TITLES[name], "note": note, "changes": dict(changes), "run": applicable}
        attempts.append(attempt)

    add("a", "the environment as it is")
    for var in ("LD_LIBRARY_PATH", "LIBRARY_PATH"):
        if without_stubs(base.get(var)) != base.get(var):
            changes[var] = without_stubs(base.get(var))
    add("b", "stubs removed: " + (", ".join(changes) or "none were there (same as a)"), bool(changes))
    preload = [p for p in (libcuda, nvrtc) if p]
    if preload:
        changes["LD_PRELOAD"] = " ".join([*preload, *(p for p in (base.get("LD_PRELOAD") or "").split() if p)])
    add("c", f"LD_PRELOAD {preload or 'nothing found'} (libcuda.so.1={libcuda}, libnvrtc.so.13={nvrtc})", bool(preload))
    folder, how = cuda_folder(facts, nvrtc, libcuda, scratch)
    if folder:
        changes["CUDA_PATH"] = changes["CUDA_HOME"] = folder
        lib64 = os.path.join(folder, "lib64")
        for var in ("LD_LIBRARY_PATH", "LIBRARY_PATH"):
            changes[var] = prepend(changes.get(var, without_stubs(base.get(var))), lib64)
    add("d", f"CUDA_PATH={folder} ({how})", folder is not None)
    wrapper, how = cxx_wrapper(scratch, libcuda, nvrtc)
    if wrapper:
        changes["CXX"] = wrapper
    add("e", f"CXX={wrapper} ({how})", wrapper is not None and bool(preload))
    e_changes = dict(changes)
    wrapper, how = cxx_wrapper(scratch, libcuda, nvrtc, link_flags=SELF_CONTAINED, name="cxx_self_contained.sh")
    if wrapper:
        changes["CXX"] = wrapper
    add("f", f"CXX={wrapper} ({how})", wrapper is not None and bool(preload))
    changes = e_changes
    system = "/usr/bin/g++"
    other = os.path.exists(system) and os.path.realpath(system) != os.path.realpath(default_cxx() or "")
    wrapper, how = cxx_wrapper(scratch, libcuda, nvrtc, gxx=system, name="cxx_system.sh") if other else (None, "")
    if wrapper:
        changes["CXX"] = wrapper
    add("g", f"CXX={wrapper} ({how})" if wrapper else f"no other g++ than {default_cxx()}", wrapper is not None)
    # an attempt whose environment equals the previous one's adds nothing: record it, run it once
    for prev, cur in zip(attempts, attempts[1:], strict=False):
        if cur["run"] and cur["changes"] == prev["changes"]:
            cur["run"], cur["note"] = False, cur["note"] + f"; same environment as {prev['name']}"
    return attempts


def child_env(changes: dict[str, str | None], cache: str) -> dict[str, str]:
    env = dict(os.environ)
    for var, value in changes.items():
        if value is None:
            env.pop(var, None)
        else:
            env[var] = value
    env["KEOPS_CACHE_FOLDER"] = cache
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYKEOPS_VERBOSE", None)
    return env


# --------------------------------------------------------------------------------------------------
# running


class Job:
    def __init__(self, name: str, env: dict[str, str], argv: list[str], workdir: Path, limit: float):
        self.name, self.env, self.limit = name, env, limit
        self.out_path, self.err_path = workdir / f"{name}.out", workdir / f"{name}.err"
        self.start = time.monotonic()
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=err, start_new_session=True)
        self.rc: int | str | None = None
        self.seconds = 0.0

    def poll(self) -> bool:
        """True once finished (or killed for its time limit)."""
        if self.rc is not None:
            return True
        rc = self.proc.poll()
        if rc is None and time.monotonic() - self.start > self.limit:
            self.kill(f"timeout after {self.limit:.0f} s")
            return True
        if rc is not None:
            self.rc, self.seconds = rc, time.monotonic() - self.start
            return True
        return False

    def kill(self, why: str) -> None:
        with_group = True
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            with_group = False
        if not with_group:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.rc, self.seconds = why, time.monotonic() - self.start

    def text(self, which: str) -> str:
        path = self.out_path if which == "out" else self.err_path
        try:
            return path.read_text(errors="replace")
        except OSError:
            return ""


def needed_libs(cache: str) -> dict[str, list[str]]:
    """NEEDED entries of the JIT libraries KeOps built in ``cache`` (shows whether -lcuda/-lnvrtc were kept)."""
    out = {}
    for so in sorted(glob.glob(os.path.join(cache, "**", "*.so"), recursive=True)):
        base = os.path.basename(so)
        if not (base.startswith("nvrtc_jit") or base.startswith("pykeops_nvrtc")):
            continue
        tool = shutil.which("readelf") or shutil.which("objdump")
        if tool is None:
            out[base] = ["<no readelf/objdump>"]
            continue
        dump = run_quiet([tool, "-d", so] if tool.endswith("readelf") else [tool, "-p", so], timeout=10)
        libs = re.findall(r"NEEDED\)?\s+(?:Shared library: \[)?([^\]\s]+)", dump)
        runpath = re.findall(r"(?:RUNPATH|RPATH)\)?\s+(?:Library r(?:un)?path: \[)?([^\]\s]+)", dump)
        out[base] = libs + [f"(rpath {r})" for r in runpath]
    return out


def summarise(job: Job, attempt: dict, cache: str, device: str) -> dict:
    out, err = job.text("out"), job.text("err")
    info = None
    for line in out.splitlines():
        if line.startswith("KEOPS_INFO "):
            try:
                info = json.loads(line[len("KEOPS_INFO ") :])
            except json.JSONDecodeError:
                info = line
    stages = [line[len("STAGE ") :] for line in out.splitlines() if line.startswith("STAGE ")]
    ok = job.rc == 0 and "KEOPS_ATTEMPT_OK" in out
    rc = job.rc
    if isinstance(rc, int) and rc < 0:
        try:
            signame = signal.Signals(-rc).name
        except ValueError:
            signame = "?"
        rc_text = f"{rc} (killed by {signame})"
    else:
        rc_text = str(rc)
    return {
        "name": attempt["name"],
        "title": attempt["title"],
        "note": attempt["note"],
        "device": device,
        "env": {**attempt["changes"], "KEOPS_CACHE_FOLDER": cache},
        "returncode": rc if isinstance(rc, int) else None,
        "status": "ok" if ok else (rc if isinstance(rc, str) else f"failed: rc {rc_text}"),
        "ok": ok,
        "seconds": round(job.seconds, 1),
        "last_stage": stages[-1] if stages else None,
        "bindings_working": "pyKeOps with torch bindings is working!" in out,
        "lazy": next((line for line in out.splitlines() if line.startswith("LAZY ")), None),
        "keops_info": info,
        "needed": needed_libs(cache),
        "stderr_tail": err.strip().splitlines()[-15:],
        "stdout_tail": [line for line in out.strip().splitlines() if not line.startswith("KEOPS_INFO")][-6:],
    }


def ld_debug_summary(folder: Path) -> dict:
    files = sorted(glob.glob(str(folder / "ld.*")))
    if not files:
        return {"files": 0, "lines": [], "targets": {}}
    grep = run_quiet(["grep", "-h", "-e", "nvrtc_jit", *files], timeout=60)
    lines = [line.strip() for line in grep.splitlines() if "binding file" in line and "nvrtc_jit" in line]
    targets: dict[str, str] = {}
    for line in lines:
        m = re.search(r"binding file (\S+) \[\d+\] to (\S+) \[\d+\]: \w+ symbol `([^']+)'", line)
        if m and "nvrtc_jit" in m.group(1) and re.match(r"(cu|nvrtc)[A-Z]", m.group(3)):
            targets.setdefault(m.group(3), m.group(2))
    size = sum(os.path.getsize(f) for f in files)
    return {
        "files": len(files),
        "megabytes": round(size / 2**20, 1),
        "lines": lines[:20],
        "nvrtc_jit_binding_lines": len(lines),
        "targets": targets,
    }


class Report:
    def __init__(self, json_path: Path, log_path: Path):
        self.json_path, self.log_path = json_path, log_path
        self.data: dict = {"attempts": [], "working_env": None, "working_attempt": None, "versions": {}}
        self.log_lines: list[str] = []

    def log(self, text: str = "") -> None:
        self.log_lines.append(text)

    def write(self) -> None:
        self.data["seconds"] = round(now(), 1)
        # written in place (no temporary file beside it: the output folder has a file-count limit)
        self.json_path.write_text(json.dumps(self.data, indent=1, default=str))
        self.log_path.write_text("\n".join(self.log_lines + self.attempt_lines()) + "\n")

    def attempt_lines(self) -> list[str]:
        lines = ["", "== attempts"]
        for a in self.data["attempts"]:
            lines.append(f"-- ({a['name']}) {a['title']}: {a['status']} in {a.get('seconds', 0)} s")
            lines.append(f"   note: {a['note']}")
            lines.append(f"   env: {json.dumps(a.get('env', {}))}")
            if a.get("last_stage"):
                lines.append(f"   last stage: {a['last_stage']}; bindings working: {a.get('bindings_working')}")
            if a.get("lazy"):
                lines.append(f"   {a['lazy']}")
            if a.get("keops_info"):
                lines.append(f"   keops config: {json.dumps(a['keops_info'], default=str)}")
            if a.get("needed"):
                lines.append(f"   NEEDED of the JIT libraries: {json.dumps(a['needed'])}")
            for line in a.get("stderr_tail", []):
                lines.append(f"   | {line}")
        ld = self.data.get("ld_debug")
        if ld:
            lines += ["", f"== LD_DEBUG=bindings, attempt a's environment: {ld.get('status')}"]
            lines.append(f"   symbols of nvrtc_jit.so bound to: {json.dumps(ld.get('targets', {}))}")
            lines += [f"   {line}" for line in ld.get("lines", [])]
            lines += [f"   | {line}" for line in ld.get("stderr_tail", [])]
        lines += ["", f"== working attempt: {self.data.get('working_attempt')}"]
        lines.append(f"   working env: {json.dumps(self.data.get('working_env'))}")
        if "keops_probe" in self.data:
            lines.append(f"== dn2_lightning.knn.keops_probe: {json.dumps(self.data['keops_probe'])}")
        return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--env-file", type=Path, default=None, help="export/unset lines of the working env")
    parser.add_argument("--attempt-timeout", type=float, default=None, help="seconds per attempt (cuda 55, cpu 150)")
    parser.add_argument("--budget", type=float, default=110.0, help="seconds for the whole diagnosis")
    parser.add_argument("--parallel", choices=["auto", "0", "1"], default="auto")
    parser.add_argument("--no-ld-debug", action="store_true")
    parser.add_argument("--no-probe", action="store_true")
    args = parser.parse_args()
    attempt_limit = args.attempt_timeout or (55.0 if args.device == "cuda" else 150.0)
    probe_reserve = 0.0 if args.no_probe else 15.0  # after a working attempt the probe reuses its compile
    scratch = Path(tempfile.mkdtemp(prefix="keops_cuda13_"))
    report = Report(args.json, args.log)
    if args.env_file is not None and args.env_file.exists():
        args.env_file.unlink()

    say(f"facts ({args.device}); scratch {scratch}")
    facts = collect_facts(args.device)
    report.data["versions"] = facts["versions"]
    report.data["facts"] = {k: v for k, v in facts.items() if not k.startswith("_")}
    report.log(f"KeOps on CUDA 13 diagnosis, device {args.device}, {time.strftime('%Y-%m-%d %H:%M:%S')}")
    report.log("== facts")
    for key, value in report.data["facts"].items():
        if isinstance(value, list):
            report.log(f"{key}:")
            report.log("\n".join(f"   {v}" for v in value) or "   (none)")
        elif isinstance(value, dict):
            report.log(f"{key}: " + json.dumps(value))
        else:
            report.log(f"{key}: {value}")
    report.write()

    attempts = build_attempts(facts, scratch)
    report.data["facts"]["chosen_libcuda"] = facts["chosen_libcuda"]
    report.data["facts"]["chosen_nvrtc"] = facts["chosen_nvrtc"]
    child = scratch / "attempt_child.py"
    child.write_text(CHILD)
    parallel = args.parallel == "1"
    if args.parallel == "auto" and args.device == "cuda":
        mode = facts.get("nvidia_smi", "").lower()
        parallel = "exclusive" not in mode and "prohibited" not in mode
    report.data["parallel"] = parallel
    say(f"{sum(a['run'] for a in attempts)} attempts to run, {'in parallel' if parallel else 'one after the other'}")
    for a in attempts:
        say(f"  ({a['name']}) {a['title']}: {a['note']}" + ("" if a["run"] else "  [not run]"))

    results: dict[str, dict] = {}
    for a in attempts:
        if not a["run"]:
            results[a["name"]] = {
                "name": a["name"], "title": a["title"], "note": a["note"], "env": a["changes"],
                "status": "not run", "ok": False, "seconds": 0.0,
            }  # fmt: skip

    def deadline_left() -> float:
        return args.budget - now()

    ld_dir = scratch / "lddebug"
    ld_dir.mkdir()
    ld_job: Job | None = None

    def start(a: dict, with_ld: bool = False) -> tuple[Job, str] | None:
        limit = min(attempt_limit, deadline_left() - probe_reserve)
        if limit < 10:
            results[a["name"]] = {
                "name": a["name"], "title": a["title"], "note": a["note"], "env": a["changes"],
                "status": "skipped: out of time", "ok": False, "seconds": 0.0,
            }  # fmt: skip
            return None
        cache = tempfile.mkdtemp(prefix=f"cache_{a['name']}_", dir=scratch)
        env = child_env(a["changes"], cache)
        if with_ld:
            env["LD_DEBUG"] = "bindings"
            env["LD_DEBUG_OUTPUT"] = str(ld_dir / "ld")
        return Job(a["name"], env, [sys.executable, str(child), args.device], scratch, limit), cache

    def record(a: dict, job: Job, cache: str) -> None:
        results[a["name"]] = summarise(job, a, cache, args.device)
        r = results[a["name"]]
        say(f"  ({a['name']}) {r['status']} in {r['seconds']} s; last stage: {r.get('last_stage')}")
        report.data["attempts"] = [results[x["name"]] for x in attempts if x["name"] in results]
        report.write()

    def record_ld(job: Job) -> None:
        summary = ld_debug_summary(ld_dir)
        rc = job.rc
        summary["status"] = f"rc {rc}" if isinstance(rc, int) else rc
        summary["stderr_tail"] = job.text("err").strip().splitlines()[-5:]
        report.data["ld_debug"] = summary
        say(f"  LD_DEBUG run: {summary['status']}; nvrtc_jit symbols bound to {summary.get('targets')}")
        shutil.rmtree(ld_dir, ignore_errors=True)
        report.write()

    runnable = [a for a in attempts if a["run"]]
    working: dict | None = None
    if parallel:
        jobs: dict[str, tuple[Job, str]] = {}
        for a in runnable:
            started = start(a)
            if started:
                jobs[a["name"]] = started
        if not args.no_ld_debug and runnable and runnable[0]["name"] == "a":
            started = start({**runnable[0], "name": "a_lddebug"}, with_ld=True)
            if started:
                ld_job = started[0]
        stop_at: float | None = None
        while True:
            for a in runnable:
                if a["name"] in jobs and a["name"] not in results and jobs[a["name"]][0].poll():
                    record(a, *jobs[a["name"]])
            if ld_job is not None and "ld_debug" not in report.data and ld_job.poll():
                record_ld(ld_job)
            ordered = [results.get(a["name"]) for a in runnable]
            if working is None:
                for r in ordered:
                    if r is None:
                        break  # an earlier attempt is still running: it may yet be the first that works
                    if r["ok"]:
                        working = r
                        stop_at = time.monotonic() + 10  # let the later ones finish briefly, for the record
                        say(f"  first working attempt: ({r['name']})")
                        break
            pending = [a for a in runnable if a["name"] in jobs and a["name"] not in results]
            ld_pending = ld_job is not None and "ld_debug" not in report.data
            if not pending and not ld_pending:
                break
            if stop_at is not None and time.monotonic() > stop_at:
                for a in pending:
                    jobs[a["name"]][0].kill("stopped: an earlier attempt worked")
                    record(a, *jobs[a["name"]])
                if ld_pending:
                    ld_job.kill("stopped: an earlier attempt worked")
                    record_ld(ld_job)
                break
            time.sleep(0.5)
    else:
        for i, a in enumerate(runnable):
            with_ld = i == 0 and a["name"] == "a" and not args.no_ld_debug
            started = start(a, with_ld=with_ld)
            if started is None:
                continue
            job, cache = started
            say(f"  ({a['name']}) running (limit {job.limit:.0f} s)")
            while not job.poll():
                time.sleep(0.5)
            record(a, job, cache)
            if with_ld:
                record_ld(job)
            if results[a["name"]]["ok"]:
                working = results[a["name"]]
                break
    for a in runnable:
        if a["name"] not in results:
            results[a["name"]] = {
                "name": a["name"], "title": a["title"], "note": a["note"], "env": a["changes"],
                "status": "not run: an earlier attempt worked", "ok": False, "seconds": 0.0,
            }  # fmt: skip
    report.data["attempts"] = [results[a["name"]] for a in attempts if a["name"] in results]
    if working is not None:
        base_changes = next(a["changes"] for a in attempts if a["name"] == working["name"])
        report.data["working_attempt"] = working["name"]
        report.data["working_env"] = {**base_changes, "KEOPS_CACHE_FOLDER": working["env"]["KEOPS_CACHE_FOLDER"]}
        if args.env_file is not None:
            lines = [f"# KeOps environment that worked: attempt ({working['name']}) {working['title']}"]
            for var, value in report.data["working_env"].items():
                lines.append(f"unset {var}" if value is None else f"export {var}={shlex.quote(value)}")
            args.env_file.write_text("\n".join(lines) + "\n")
    say(f"working attempt: {report.data['working_attempt']}; env {json.dumps(report.data['working_env'])}")
    report.write()

    # the repo's own probe, in the environment that worked (else attempt a's, in a fresh cache)
    if not args.no_probe:
        left = deadline_left() - 3
        if left < 10:
            report.data["keops_probe"] = {"verdict": "not run: out of time"}
        else:
            # no working env: attempt a's environment and cache (already compiled), so the probe reaches its
            # first formula at once instead of compiling the JIT binaries again
            fallback = results.get("a", {}).get("env") or {}
            if not fallback.get("KEOPS_CACHE_FOLDER"):
                fallback = {"KEOPS_CACHE_FOLDER": tempfile.mkdtemp(prefix="cache_probe_", dir=scratch)}
            changes = report.data["working_env"] or fallback
            cache = changes["KEOPS_CACHE_FOLDER"]
            env = child_env({k: v for k, v in changes.items() if k != "KEOPS_CACHE_FOLDER"}, cache)
            probe_limit = max(5.0, left - 15)
            which = "the working" if working else "attempt a's"
            say(f"dn2_lightning.knn.keops_probe({args.device!r}) in {which} env, cache {cache}")
            job = Job("keops_probe", env, [sys.executable, "-c", PROBE, args.device, str(probe_limit)], scratch, left)
            while not job.poll():
                time.sleep(0.5)
            out = job.text("out")
            line = next((x for x in out.splitlines() if x.startswith("KEOPS_PROBE_VERDICT ")), None)
            verdict = line[len("KEOPS_PROBE_VERDICT ") :] if line else f"no verdict (rc {job.rc})"
            report.data["keops_probe"] = {
                "device": args.device,
                "env": "working" if working else "attempt a's",
                "verdict": verdict,
                "usable": bool(line and line.startswith("KEOPS_PROBE_VERDICT None")),
                "seconds": round(job.seconds, 1),
                "stderr_tail": job.text("err").strip().splitlines()[-5:],
            }
            say(f"keops_probe verdict: {verdict}")
    report.write()
    return 0 if working is not None else 3


if __name__ == "__main__":
    sys.exit(main())
