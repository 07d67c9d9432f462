"""The documentation cannot drift: its commands parse, its Python runs, its figures are what commands print.

Every shell command in README.md and docs/*.md (fenced, or inline code that starts with
an entry point) is checked here: ``nmf-train`` overrides compose against the configs and
pass the configuration check; ``nmf-transform``, ``nmf-sweep-report`` and the scripts
accept their arguments; extras named in ``pip install`` exist. Every Python block runs.
The figures in ``FIGURES`` are rerun and compared with the digits the page prints.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import sys
from dataclasses import dataclass
from importlib.metadata import metadata
from pathlib import Path

import numpy as np
import pytest
from conftest import make_config
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, RangeSweep
from omegaconf import open_dict

from nmf_lightning.train import check_config, config_dir, train

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ENTRY_POINTS = ("nmf-train", "nmf-transform", "nmf-sweep-report")
#: commands the documentation may show that are not this project's to check
FOREIGN = ("tensorboard", "pytest", "mkdocs", "srun", "sbatch")


def _blocks(text: str, langs: tuple[str, ...]) -> list[str]:
    return [m.group(2) for m in re.finditer(r"```(\w*)\n(.*?)```", text, re.S) if m.group(1) in langs]


def _shell_lines(text: str) -> list[str]:
    """Commands of the page: lines of its shell blocks (continuations joined, comments dropped) and inline ones."""
    lines = []
    for block in _blocks(text, ("bash", "sh", "")):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            lines.extend(" ".join(shlex.quote(w) for w in part) for part in _split_and(words))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for code in (" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)):  # a span may wrap lines
        if code.split(" ", 1)[0] in ENTRY_POINTS and " " in code or code.startswith("python scripts/"):
            lines.append(code)
    return [line for line in lines if line]


def _split_and(words: list[str]) -> list[list[str]]:
    parts: list[list[str]] = [[]]
    for word in words:
        if word == "&&":
            parts.append([])
        else:
            parts[-1].append(word)
    return parts


def commands() -> list[tuple[str, str]]:
    return [(page.name, line) for page in PAGES for line in _shell_lines(page.read_text())]


def _first_values(overrides: list[str]) -> list[str]:
    """A sweep's first job: each choice or range sweep at its first value; search spaces left to the sweeper."""
    parser = OverridesParser.create()
    chosen = []
    for item in overrides:
        if item == "...":  # a table's "same as above"
            continue
        override = parser.parse_override(item)
        value = override.value()
        if isinstance(value, (ChoiceSweep, RangeSweep)):
            item = f"{override.get_key_element()}={next(override.sweep_string_iterator())}"
        elif override.is_sweep_override():
            continue
        chosen.append(item)
    return chosen


def check_train_command(words: list[str], tmp_path: Path) -> None:
    overrides = [w for w in words if w not in ("-m", "--multirun")]
    if overrides == ["--help"]:
        return
    overrides = _first_values(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.ckpt_path = None  # a resume command names a run that is not here
        cfg.trainer.accelerator = "cpu"  # a GPU command is checked as far as a CPU can
        cfg.trainer.devices = 1
        cfg.paths.output_dir = str(tmp_path)
    check_config(cfg)


class _ParsedError(Exception):
    """The arguments parsed: stop before the command runs."""


def check_arguments(main, argv: list[str]) -> None:
    """Run an argparse ``main`` as far as its parse: wrong or unknown arguments fail here."""
    real = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        real(self, args, namespace)
        raise _ParsedError

    old = sys.argv
    sys.argv = argv
    argparse.ArgumentParser.parse_args = parse_only
    try:
        with pytest.raises(_ParsedError):
            main()
    finally:
        argparse.ArgumentParser.parse_args = real
        sys.argv = old


def _script_main(path: Path):
    spec = importlib.util.spec_from_file_location(f"doc_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module.main


def check_command(line: str, tmp_path: Path) -> None:
    words = shlex.split(re.sub(r"<[^<>]*>", "placeholder", line))  # multirun/<date>/<time> and the like
    head, args = words[0], words[1:]
    if head == "nmf-train":
        check_train_command(args, tmp_path)
    elif head == "nmf-transform":
        from nmf_lightning.transform import main

        check_arguments(main, words)
    elif head == "nmf-sweep-report":
        from nmf_lightning.report import main

        check_arguments(main, words)
    elif head == "python" and args[:2] == ["-m", "nmf_lightning.train"]:
        check_train_command(args[2:], tmp_path)
    elif head == "python" and args[0] == "-c":
        here = Path.cwd()
        os.chdir(tmp_path)
        try:
            exec(compile(args[1], "<doc>", "exec"), {})
        finally:
            os.chdir(here)
    elif head == "python":
        script = ROOT / args[0]
        assert script.is_file(), f"{args[0]} is not a file"
        check_arguments(_script_main(script), [str(script), *args[1:]])
    elif head == "torchrun":
        i = words.index("nmf_lightning.train")
        check_train_command(words[i + 1 :], tmp_path)
    elif head == "bash":
        assert (ROOT / args[0]).is_file(), f"{args[0]} is not a file"
    elif head == "pip":
        extras = metadata("nmf-lightning").get_all("Provides-Extra") or []
        for wanted in re.findall(r"\.\[([\w,]+)\]", line):
            for extra in wanted.split(","):
                assert extra in extras, f"pip install names the extra {extra!r}, which pyproject.toml lacks"
    else:
        assert head in FOREIGN, f"a command the documentation tests do not know how to check: {line}"


@pytest.mark.parametrize(("page", "line"), commands())
def test_every_documented_command_is_valid(page, line, tmp_path):
    check_command(line, tmp_path)


def test_the_checker_refuses_what_drifted(tmp_path):
    with pytest.raises(Exception, match="model.rnak"):
        check_command("nmf-train model.rnak=8", tmp_path)
    with pytest.raises(Exception, match="optimizer"):
        check_command("nmf-train optimizer=nope", tmp_path)
    with pytest.raises(SystemExit):
        check_command("nmf-transform run new.npy --no-such-flag", tmp_path)
    with pytest.raises(AssertionError, match="a command the documentation"):
        check_command("nmf-fit model.rank=8", tmp_path)
    page = "```bash\nnmf-train -m model.rank=2,4 \\\n  seed=1   # a comment\n```\nthen `nmf-train seed=3`"
    lines = _shell_lines(page)
    assert lines == ["nmf-train -m model.rank=2,4 seed=1", "nmf-train seed=3"]


def _namespace() -> dict:
    """What the documentation's Python examples assume they have: a matrix, new rows, texts, batches."""
    from sklearn.datasets import load_digits

    X = load_digits().data[:300]
    words = ["space", "nasa", "orbit", "launch", "god", "faith", "belief", "church", "image", "file", "format", "color"]
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(words, 12)) for _ in range(40)]
    return {"X": X, "X_new": X[:20], "docs": docs, "batches": np.array_split(X, 3), "np": np}


def python_blocks() -> list[tuple[str, int, str]]:
    return [(page.name, i, block) for page in PAGES for i, block in enumerate(_blocks(page.read_text(), ("python",)))]


@pytest.mark.parametrize(("page", "index", "block"), python_blocks(), ids=[f"{p}-{i}" for p, i, _ in python_blocks()])
def test_every_python_example_runs(page, index, block, monkeypatch):
    namespace = _namespace()
    if "H" not in block.split("=")[0] and "(X_new, H" in block:
        from nmf_lightning import NMF

        namespace["H"] = NMF(8, random_state=0).fit(namespace["X"]).components_
    monkeypatch.setattr("builtins.print", lambda *a, **k: None)
    exec(compile(block, f"{page}[{index}]", "exec"), namespace)


@dataclass(frozen=True)
class Figure:
    """A command the documentation quotes with the figures it prints (metrics.json keys and the digits shown)."""

    page: str
    command: str
    printed: dict[str, str]
    slow: bool = False


FIGURES = [
    Figure("README.md", "nmf-train", {"relative_error": "0.257192", "steps": "2000"}),
    Figure("README.md", "nmf-train optimizer=hals model.tol=1e-4", {"relative_error": "0.2581", "steps": "180"}),
    Figure(
        "solvers.md",
        "nmf-train optimizer=hals model.init=nndsvda model.tol=1e-4",
        {"relative_error": "0.2574", "steps": "110"},
    ),
    Figure(
        "solvers.md",
        "nmf-train data=spectrogram model.loss=is optimizer=mu model.rank=4 trainer.max_steps=300",
        {"divergence_per_entry": "0.265"},
    ),
    Figure("bad-input.md", "nmf-train data=file data.path=bc.npy model.rank=5", {"relative_error": "0.00264"}),
    Figure(
        "bad-input.md",
        "nmf-train data=file data.path=bc.npy model.rank=5 optimizer.lr=0.001",
        {"relative_error": "0.866"},
    ),
    Figure("notebooks.md", "nmf-train experiment=synthetic_known_factors", {"relative_error": "2.17e-4"}, slow=True),
]


def _matches(printed: str, value: float) -> bool:
    """``value`` rounds to the digits printed (one unit of the last digit either way, for rounding across machines)."""
    mantissa = printed.lower().split("e")[0]
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    exponent = int(printed.lower().split("e")[1]) if "e" in printed.lower() else 0
    return abs(value - float(printed)) <= 10.0 ** (exponent - decimals) * 1.0001


@pytest.mark.parametrize(
    "figure",
    [pytest.param(f, marks=pytest.mark.slow) if f.slow else f for f in FIGURES],
    ids=lambda f: f"{f.page}:{f.command}",
)
def test_documented_figures_are_what_the_commands_print(figure, tmp_path, monkeypatch):
    text = next(p for p in PAGES if p.name == figure.page).read_text()
    assert figure.command in text, f"{figure.page} no longer shows {figure.command!r}"
    for printed in figure.printed.values():
        assert printed in text, f"{figure.page} no longer prints {printed} beside {figure.command!r}"
    monkeypatch.chdir(tmp_path)
    if "bc.npy" in figure.command:
        from sklearn.datasets import load_breast_cancer

        np.save("bc.npy", load_breast_cancer().data)
    metrics = train(make_config(tmp_path / "run", *figure.command.split()[1:]))
    if "divergence" in metrics:
        metrics["divergence_per_entry"] = metrics["divergence"] / (300 * 256)
    for key, printed in figure.printed.items():
        value = float(metrics[key])
        assert _matches(printed, value), f"{figure.command}: {key} is {value}, the page says {printed}"


def test_the_documented_transform_figure_is_scipys_nnls(tmp_path, monkeypatch, capsys):
    from scipy.optimize import nnls
    from sklearn.datasets import load_breast_cancer

    from nmf_lightning.transform import main

    text = (ROOT / "docs/estimator.md").read_text()
    assert "nmf-train data=file data.path=bc.npy model.rank=5 hydra.run.dir=bc" in text
    assert "`nmf-transform bc bc.npy`: relative error 0.0025152, scipy `nnls` 0.0025152" in text
    monkeypatch.chdir(tmp_path)
    X = load_breast_cancer().data
    np.save("bc.npy", X)
    train(make_config(tmp_path / "bc", "data=file", "data.path=bc.npy", "model.rank=5"))
    monkeypatch.setattr(sys, "argv", ["nmf-transform", "bc", "bc.npy"])
    main()
    printed = float(re.search(r"relative error ([0-9.e-]+)", capsys.readouterr().out).group(1))
    H = np.load("bc/factors.npz")["H"].astype(np.float64)
    W = np.array([nnls(H.T, x)[0] for x in X])
    assert _matches("0.0025152", printed) and _matches("0.0025152", np.linalg.norm(X - W @ H) / np.linalg.norm(X))


def test_the_newsgroups_figures_are_the_penalty_scripts():
    """The notebook's newsgroups run needs the 20 newsgroups archive: its figures are the script's recorded ones."""
    import json

    rows = json.loads((ROOT / "results/cpu-penalty-schedule/penalty_schedule.json").read_text())
    notebook = next(r for r in rows if r["command"].startswith("nmf-train experiment=newsgroups_adam data."))
    text = (ROOT / "docs/notebooks.md").read_text()
    assert f"loss {notebook['loss']:.2f} after 1000 updates" in text
    assert f"{notebook['H_neg_fraction']:.0%} of H's entries negative, {notebook['H_neg_mass']:.0%} of its mass" in text
    assert f"relative error {notebook['relative_error']:.2f}, against {notebook['trained_relative_error']:.3f}" in text


NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e-?\d+)?(?![\w.])")


def quoted_tables() -> list[tuple[str, str, list[str]]]:
    """Tables of results a page quotes: (page, source file, rows), marked ``<!-- figures: FILE -->``."""
    found = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            mark = re.fullmatch(r"<!-- figures: (\S+) -->", line.strip())
            if mark:
                rows = []
                for row in lines[i + 1 :]:
                    if row.startswith("|"):
                        rows.append(row)
                    elif rows:
                        break
                found.append((page.name, mark.group(1), rows[2:]))  # (header and rule left out)
    return found


@pytest.mark.parametrize(("page", "source", "rows"), quoted_tables(), ids=lambda v: v if isinstance(v, str) else "")
def test_quoted_tables_are_the_scripts_results(page, source, rows):
    """Every number of a quoted table is one its results file holds (rounded as printed)."""
    assert rows, f"{page}: no table after the mark for {source}"
    recorded = [float(x) for x in re.findall(r"\d+(?:\.\d+)?(?:e-?\d+)?", (ROOT / source).read_text())]
    for row in rows:
        for printed in NUMBER.findall(row):
            assert any(_matches(printed, value) for value in recorded), f"{page}: {printed} is not in {source}: {row}"


def test_every_results_table_is_marked_with_its_source():
    assert len(quoted_tables()) >= 10


def test_a_figure_that_drifted_fails():
    assert _matches("0.2572", 0.25718) and _matches("2.17e-4", 2.171e-4) and _matches("180", 180)
    assert not _matches("0.2572", 0.2575) and not _matches("2.8e-4", 2.17e-4) and not _matches("110", 180)


def test_the_documentation_site_builds_without_a_warning(tmp_path, monkeypatch):
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    monkeypatch.setenv("NO_MKDOCS_2_WARNING", "1")
    monkeypatch.chdir(ROOT)
    build(load_config(str(ROOT / "mkdocs.yml"), strict=True, site_dir=str(tmp_path / "site")))
    assert (tmp_path / "site/api/index.html").read_text().count('id="nmf_lightning.') > 20
