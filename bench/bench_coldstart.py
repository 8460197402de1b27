"""Cold start budget of the built Lambda artifacts: import time per function and unzipped sizes.

    .venv/bin/python bench/bench_coldstart.py [--runs 9]

Builds with `sam build` when its inputs changed (infra/deploy/sam_build.py), lays the artifacts out as
Lambda does (task folder + layer's python/ folder, outside the repository), and imports each function's
handler module in a fresh Python 3.12 process with `-X importtime` (`-I -S`: nothing from this machine's
site-packages), --runs times: the verdict takes the best run (the least disturbed by other work on the
machine, as bench_api.py does), the median is shown beside it. The stream function's import is what
run.sh loads before the Web Adapter's readiness check can pass: uvicorn's server and the ASGI app.
Baseline, same run: the bare interpreter's start-up (`python3.12 -I -S -c pass`), which every cold
start pays before any import.

Also shown: each process's CPU time (user + system, start-up included), which a busy machine disturbs
less than wall time. Targets: API <= 300 ms, worker <= 300 ms, stream <= 400 ms import; layer <= 50 MB
unzipped. Sizes are file bytes (MB = 10^6 bytes), and a deflate zip of each, as `sam deploy` uploads it.
"""

from __future__ import annotations

import argparse
import io
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from minichat_local.functions import load_path

ROOT = Path(__file__).resolve().parents[1]
MB = 1_000_000
# function: (modules the cold start imports, target ms)
IMPORTS = {
    "ApiFunction": (["app"], 300),
    "StreamFunction": (["uvicorn.main", "uvicorn.server", "uvicorn.protocols.http.h11_impl", "app"], 400),
    "WorkerFunction": (["handler"], 300),
    "RelayFunction": (["jobs"], 300),
}
LAYER_TARGET_MB = 50
DRIVER = (
    "import sys; sys.path[:0] = sys.argv[1:3]\n"
    "import importlib\n"
    "for name in sys.argv[3:]: importlib.import_module(name)\n"
)


def sam_build() -> tuple[Path, str]:
    """The up-to-date build folder and the Python 3.12 it is built for (infra/deploy/sam_build.py)."""
    module = load_path(ROOT / "infra" / "deploy" / "sam_build.py")
    return module.ensure_built(), module.python312()


def env_for(function: str, task: Path) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "AWS_LAMBDA_FUNCTION_NAME": f"bench-{function}",
        "AWS_REGION": "us-east-1",
        "LAMBDA_TASK_ROOT": str(task),
        "MINICHAT_LOG_LEVEL": "WARNING",
    }


def parse_line(line: str) -> tuple[int, int, str]:
    """`import time:   self |   cumulative | name` -> (self µs, cumulative µs, name with its indent)."""
    body = line.split(":", 1)[1]
    self_us, cumulative_us, name = body.split("|", 2)
    return int(self_us), int(cumulative_us), name[1:]


def measure(
    python: str, task: Path, opt: Path, modules: list[str], env: dict[str, str]
) -> tuple[float, float, str]:
    """Import time of `modules` (their top-level cumulative times added), the process's CPU time (user +
    system, whole process: less disturbed than wall time when the machine is busy), the heaviest module."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(
        [python, "-I", "-S", "-B", "-X", "importtime", "-c", DRIVER, str(task), str(opt), *modules],
        env=env,
        cwd=task,
        capture_output=True,
        text=True,
        check=False,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"import of {modules} failed:\n{result.stderr[-3000:]}")
    cpu_ms = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1000
    total_us = 0
    heaviest = (0, "")
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_us, cumulative_us, name = parse_line(line)
        if not name.startswith(" "):  # imported by the driver itself: a top-level entry
            total_us += cumulative_us
        heaviest = max(heaviest, (self_us, name.strip()))
    return total_us / 1000, cpu_ms, f"{heaviest[1]} ({heaviest[0] / 1000:.0f} ms self)"


def interpreter_start_ms(python: str, runs: int) -> float:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([python, "-I", "-S", "-c", "pass"], check=True)
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def zipped_bytes(path: Path) -> int:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            archive.write(file, file.relative_to(path))
    return buffer.tell()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()

    build, python = sam_build()
    failed = []
    with tempfile.TemporaryDirectory(prefix="coldstart-") as tmp:
        root = Path(tmp)
        opt = root / "opt" / "python"
        shutil.copytree(build / "CoreLayer" / "python", opt)
        baseline = interpreter_start_ms(python, args.runs)
        print(f"Python {python}; {args.runs} cold processes per figure")
        print(f"baseline: interpreter start-up (-I -S -c pass), median {baseline:4.0f} ms")
        print(
            f"{'function':16} {'best':>7} {'median':>7} {'cpu':>7} {'target':>7}  heaviest module (first run)"
        )
        for function, (modules, target) in IMPORTS.items():
            task = root / "task" / function
            shutil.copytree(build / function, task)
            samples = [measure(python, task, opt, modules, env_for(function, task)) for _ in range(args.runs)]
            best = min(ms for ms, _, _ in samples)
            median = statistics.median(ms for ms, _, _ in samples)
            cpu = statistics.median(cpu for _, cpu, _ in samples)
            verdict = "ok" if best <= target else "OVER"
            if best > target:
                failed.append(function)
            print(
                f"{function:16} {best:4.0f} ms {median:4.0f} ms {cpu:4.0f} ms {target:4d} ms"
                f"  {verdict:4} {samples[0][2]}"
            )
        print("(best, median: -X importtime, wall clock; cpu: median CPU time of the whole process)")

        print(f"\n{'artifact':16} {'unzipped':>10} {'zipped':>9}")
        layer_mb = tree_bytes(build / "CoreLayer") / MB
        for name in ("CoreLayer", "ApiFunction", "StreamFunction", "WorkerFunction"):
            size = tree_bytes(build / name) / MB
            print(f"{name:16} {size:7.1f} MB {zipped_bytes(build / name) / MB:6.1f} MB")
        verdict = "ok" if layer_mb <= LAYER_TARGET_MB else "OVER"
        print(f"layer target {LAYER_TARGET_MB} MB unzipped: {layer_mb:.1f} MB {verdict}")
        if layer_mb > LAYER_TARGET_MB:
            failed.append("CoreLayer size")
        biggest = tree_bytes(build / "StreamFunction") / MB + layer_mb
        print(f"largest function + its layers (Lambda's limit: 250 MB): {biggest:.1f} MB", flush=True)
    if failed:
        print(f"over budget: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
