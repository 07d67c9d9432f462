"""Screenshots of TensorBoard in a real browser for docs/tensorboard.md.

Runs the digits rank sweep and the default run as the page writes them, serves each with
TensorBoard and photographs its tabs with headless Chromium (``apt-get install chromium``):

    python scripts/tensorboard_screenshots.py --out docs/tensorboard
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

#: the commands of docs/tensorboard.md, run from a scratch folder
SWEEP = (
    "nmf-train -m data=digits data.holdout=0.1 model.rank=2,4,6,8,10,12,14,16,20,24,32,48 optimizer=hals "
    "model.tol=1e-4 trainer.max_steps=1000 model.l2_W=1 model.l2_H=1 optimized_metric=val_relative_error "
    "hydra.sweep.dir=multirun/digits_rank"
)
SINGLE = "nmf-train hydra.run.dir=outputs/digits"
#: (file, run folder, TensorBoard's tab and filter)
SHOTS = (
    ("scalars_rank_sweep.png", "multirun/digits_rank", "scalars"),
    ("scalars_errors_rank_sweep.png", "multirun/digits_rank", "scalars&tagFilter=relative_error"),
    ("hparams_rank_sweep.png", "multirun/digits_rank", "hparams"),
    ("images_digits.png", "outputs/digits", "images"),
)


def _serve(logdir: Path, port: int) -> subprocess.Popen:
    tensorboard = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--port", str(port)]
    server = subprocess.Popen(tensorboard, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://localhost:{port}", timeout=1)
            return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError(f"TensorBoard did not start on port {port}")


def main() -> None:
    """Run the commands, then photograph each tab."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/tensorboard"))
    ap.add_argument("--port", type=int, default=6106)
    args = ap.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        sys.exit("error: no Chromium on PATH (apt-get install chromium)")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        for command in (SWEEP, SINGLE):
            subprocess.run(command.split(), cwd=scratch, check=True, capture_output=True)
        for i, (name, logdir, tab) in enumerate(SHOTS):
            port = args.port + i
            server = _serve(Path(scratch) / logdir, port)
            try:
                shot = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
                shot += ["--window-size=1600,1000", "--virtual-time-budget=20000", f"--screenshot={args.out / name}"]
                subprocess.run(
                    [*shot, f"http://localhost:{port}/?darkMode=false#{tab}"], check=True, capture_output=True
                )
            finally:
                server.kill()
            print(args.out / name)


if __name__ == "__main__":
    main()
