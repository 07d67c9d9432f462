"""The GPU proof in one run: install, ``pytest -m gpu``, the GPU benchmark and the kernel profile.

Made for a machine lent for minutes (Python 3.12 with torch and CUDA, no network): it
installs the project without touching the machine's torch, the packages it lacks from the
wheels in ``.whl/`` (``bash scripts/gpu_wheels.sh`` fetches them where pip can), then runs
each step under its share of one time budget, killing a step that outlasts it and going
on, and prints a short table last. Everything lands in ``--out`` (ten files at most):
``env.json``, ``log.txt``, ``junit.xml``, ``benchmark.md``/``.json``, ``streaming.md``/``.json``
(streamed passes against whole-X updates), ``profile.md``/``.json``, ``summary.md``.

    python scripts/gpu_proof.py --out "$OUT"               # on the GPU machine
    python scripts/gpu_proof.py --dry-run --out /tmp/proof  # here: every step, on the CPU, in under 2 minutes
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: each step's share of the budget (they add to 1); a step that ends early leaves its time to the next
SHARES = {"install": 0.12, "tests": 0.4, "benchmark": 0.3, "streaming": 0.1, "profile": 0.08}
GPU_BENCH = [
    "--device", "cuda", "--problems", "sparse-33m,dense-large", "--restarts", "8,32",
    "--steps", "100", "--sk-max-iter", "100",
    "--methods", "nmf-lightning hals,nmf-lightning mu,nmf-lightning als,nmf-lightning adam,"
    "torch loop adam (gram),torchnmf,nmf-torch halsvar,nmf-torch mu",
]  # fmt: skip
CPU_BENCH = [
    "--device", "cpu", "--problems", "digits,sparse-33m", "--restarts", "8", "--steps", "50", "--sk-max-iter", "50",
    "--methods", "nmf-lightning hals,nmf-lightning adam,torchnmf,nmf-torch halsvar",
]  # fmt: skip


class Log:
    """Everything the steps print, into log.txt and (the headlines) to the console."""

    def __init__(self, path: Path):
        self.file = path.open("w")

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.file.write(text + "\n")
        self.file.flush()  # before a step's process writes after it


def step(log: Log, name: str, command: list[str], seconds: float, env: dict[str, str]) -> dict:
    """Run one step's command within ``seconds`` (then kill it and all it started); its output goes to the log."""
    log.say(f"== {name} ({seconds:.0f} s at most): {' '.join(command)}")
    start = time.perf_counter()
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=log.file, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        code: int | str = proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # pytest's workers, the benchmark's children: the whole group
        proc.wait()
        code = "timeout"
    elapsed = time.perf_counter() - start
    log.say(f"== {name}: exit {code} after {elapsed:.0f} s")
    return {"step": name, "exit": code, "seconds": round(elapsed, 1)}


def install(log: Log, site: Path, seconds: float, env: dict[str, str]) -> list[dict]:
    """The missing packages from .whl/ into ``site`` (never torch), then the project itself, without its deps."""
    results, wheels = [], sorted(glob.glob(str(ROOT / ".whl" / "*.whl")))
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir"]
    deadline = time.perf_counter() + seconds
    if wheels:
        results.append(step(log, "wheels", [*pip, "--upgrade", "--target", str(site), *wheels], seconds / 3, env))
    for sdist in sorted(glob.glob(str(ROOT / ".whl" / "*.tar.gz"))):  # packages with a C extension: built here
        left = max(deadline - time.perf_counter(), 1)
        build = [*pip, "--no-build-isolation", "--target", str(site), sdist]
        results.append(step(log, f"build {Path(sdist).name}", build, left / 2, env))
    spec = importlib.util.find_spec("nmf_lightning")
    if spec is not None and Path(spec.origin).resolve().is_relative_to(ROOT):
        log.say(f"== project: installed from {ROOT} already")
        return results
    left = max(deadline - time.perf_counter(), 1)
    results.append(step(log, "project", [*pip, "--no-build-isolation", "-e", str(ROOT)], left, env))
    return results


def _version(name: str) -> tuple[int, ...]:
    from importlib.metadata import version

    return tuple(int(part) for part in version(name).split(".")[:2] if part.isdigit())


def environment(dry_run: bool) -> dict:
    """The device, its driver, and the versions that matter."""
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "dry_run": dry_run,
    }
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        info["nvidia_smi"] = subprocess.run(query, capture_output=True, text=True).stdout.strip()
    return info


def summary(out: Path, info: dict, steps: list[dict]) -> str:
    """The short table printed last: the steps, the tests, the benchmark's and the profile's rows."""
    versions = ", ".join(f"{k} {v}" for k, v in info.items() if k != "device")
    lines = [f"# GPU proof: {info['device']}", "", versions, "", "| step | exit | s |", "|---|---|---|"]
    lines += [f"| {s['step']} | {s['exit']} | {s['seconds']} |" for s in steps]
    junit = out / "junit.xml"
    if junit.is_file():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        lines += ["", f"tests: {counts}"]
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                lines.append(f"- FAILED {case.get('classname')}::{case.get('name')}")
    bench = out / "benchmark.json"
    if bench.is_file():
        lines += ["", "| problem | method | updates/s | ms/update | rel. error | status |", "|---|---|---|---|---|---|"]
        for r in json.loads(bench.read_text())["rows"]:
            rate, error = r.get("updates_per_s"), r.get("final_rel_err")
            cells = [f"{rate:.1f}" if rate else "-", f"{1000 / rate:.2f}" if rate else "-"]
            cells.append(f"{error:.4f}" if error is not None else "-")
            lines.append(f"| {r['problem']} | {r['method']} | {' | '.join(cells)} | {r.get('status')} |")
    streaming = out / "streaming.md"
    if streaming.is_file():
        lines += ["", *(line for line in streaming.read_text().splitlines() if line.startswith("|"))]
    profile = out / "profile.json"
    if profile.is_file():
        rows = json.loads(profile.read_text())
        keys = [k for k in ("ops", "kernels", "wall ms", "kernel ms", "wall / kernels") if rows and k in rows[0]]
        lines += ["", "| problem | method | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
        lines += [f"| {r['problem']} | {r['method']} | " + " | ".join(f"{r[k]:.3g}" for k in keys) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="where the results go ($OUT on the GPU machine)")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for everything (default 8 minutes)")
    ap.add_argument("--dry-run", action="store_true", help="every step on the CPU, small: checks the script here")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log, start = Log(out / "log.txt"), time.perf_counter()
    site = Path(os.environ.get("TMPDIR", "/tmp")) / "nmf_proof_site"
    paths = [str(site), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(p for p in paths if p)}

    def left(name: str) -> float:  # this step's share of what remains, the steps before it having ended
        names = list(SHARES)
        rest = sum(SHARES[n] for n in names[names.index(name) :])
        return max((args.budget - (time.perf_counter() - start)) * SHARES[name] / rest, 5.0)

    steps = install(log, site, left("install"), env)
    info = environment(args.dry_run)
    (out / "env.json").write_text(json.dumps(info, indent=2) + "\n")
    log.say(json.dumps(info))
    tests = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={out}/junit.xml"]
    budget = left("tests")
    if importlib.util.find_spec("pytest_timeout"):
        tests.append("--timeout=120")  # one stuck test must not take the whole budget
        if _version("pytest-timeout") >= (2, 3):  # pytest ends itself in time, and still writes junit.xml
            tests.append(f"--session-timeout={max(budget - 20, 10):.0f}")
    if importlib.util.find_spec("xdist") and not args.dry_run:
        tests += ["-n", "4"]  # small tests, one GPU: four at a time keep it busy
    steps.append(step(log, "tests", tests, budget, env))
    bench = [sys.executable, "scripts/benchmark.py", *(CPU_BENCH if args.dry_run else GPU_BENCH), "--out", str(out)]
    steps.append(step(log, "benchmark", bench, left("benchmark"), env))
    # streamed passes against whole-X updates on the device: each block copied from pinned host memory
    grid = ["--grid-rows", "3000", "--grid-cols", "200", "--grid-ranks", "10", "--grid-steps", "3"]
    accelerator = ["--accelerator", "cpu" if args.dry_run else "gpu"]
    stream = [sys.executable, "scripts/benchmark_streaming.py", "--parts", "grid", *accelerator, "--out", str(out)]
    stream += grid if args.dry_run else ["--grid-rows", "50000", "--grid-steps", "10", "--grid-layouts", "npy,npz"]
    steps.append(step(log, "streaming", stream + ["--dir", str(out / "streaming-work")], left("streaming"), env))
    shutil.rmtree(out / "streaming-work", ignore_errors=True)  # the generated files do not come back
    device = "cpu" if args.dry_run else "cuda"
    profile = [sys.executable, "scripts/profile_update.py", "--device", device, "--out", str(out)]
    steps.append(step(log, "profile", profile + (["--updates", "3"] if args.dry_run else []), left("profile"), env))
    log.say(summary(out, info, steps))
    log.say(f"total {time.perf_counter() - start:.0f} s of a {args.budget:.0f} s budget; results in {out}")


if __name__ == "__main__":
    main()
