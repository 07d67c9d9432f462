"""Project new rows onto trained components: W_new >= 0 minimising ||X_new - W_new H||.

H stays fixed, so this is a non-negative least-squares problem per row, solved with the
W-update of a closed-form solver (HALS by default, as scikit-learn's ``transform`` does
with its coordinate descent); for a model trained on a beta-divergence (KL, IS), MU on
that divergence. ``nmf-transform`` runs it from the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from nmf_lightning.atomic import MATRIX_SUFFIXES, finish_pending, save_matrix
from nmf_lightning.console import NMFWarning
from nmf_lightning.data.files import from_file
from nmf_lightning.data.rows import materialize
from nmf_lightning.divergence import loss_beta
from nmf_lightning.engine.biases import Biases, predict
from nmf_lightning.engine.problem import FIXED_H_MAX_ITER, FIXED_H_TOL, solve_w
from nmf_lightning.params import Words
from nmf_lightning.solvers import registry
from nmf_lightning.validation import NMFInputError, check_matrix

#: how ``transform`` and ``nmf-transform`` name their parameters in messages
WORDS = Words(
    params={"loss": "beta"},
    quote=True,
    solver_key="solver",
    blocks=None,
    gradient=False,
    kl=1.0,
    unstored="pass unstored_missing=True (nmf-transform --unstored missing) to read them as missing (ratings)",
)


def transform(
    X: np.ndarray | sp.spmatrix,
    H: np.ndarray,
    solver: str | None = None,
    max_iter: int = FIXED_H_MAX_ITER,
    tol: float = FIXED_H_TOL,
    device: str = "cpu",
    l1_W: float = 0.0,
    l2_W: float = 0.0,
    return_n_iter: bool = False,
    beta: float = 2.0,
    biases: tuple[float, np.ndarray] | None = None,
    unstored_missing: bool = False,
) -> np.ndarray | tuple[np.ndarray, ...]:
    """Return W (n, k) >= 0 with X ~ W H for the fixed components H (k, m).

    NaN entries of a dense X are missing and do not count. HALS on a complete X solves
    each row's non-negative least squares (:func:`~nmf_lightning.solvers.hals.nnls`: passes
    on X H^T and H H^T formed once) until the projected gradient is ``tol`` times its start;
    the other solvers, and a masked X, run the training engine with H held fixed until the
    objective changes by less than ``tol`` (relative) over 10 updates. Either way at most
    ``max_iter`` passes, with an :class:`NMFWarning` if tol was not met. ``l1_W`` and
    ``l2_W`` weigh ``|W|_1`` and ``1/2 ||W||^2`` as in training; ``return_n_iter`` also
    returns the passes run. ``beta`` != 2 fits that beta-divergence instead (1 KL, 0 IS),
    with ``solver="mu"`` (the default then; HALS otherwise). ``biases`` (mu, c (m,)) are a
    biased model's, held fixed with H: X ~ mu + b + c + W H, each new row's bias b solved
    with its W (MU by default, or ALS); W and b (n,) are returned then. ``unstored_missing``
    reads a sparse X's unstored entries as missing, as a run with ``data.unstored=missing`` did.
    """
    observed = biases is not None or (unstored_missing and sp.issparse(X))
    solver = solver or registry.for_fixed_components(beta == 2, observed=observed).name
    closed_form = registry.names(closed_form=True)
    if solver not in closed_form:
        raise NMFInputError(f"solver={solver!r} is not one of {closed_form}.")
    check_matrix(X, totals=False)
    H = np.asarray(H)
    if H.ndim != 2 or H.shape[1] != X.shape[1]:
        raise NMFInputError(
            f"H has shape {H.shape} but X has {X.shape[1]} columns; H must be (k, {X.shape[1]}) "
            "from a model trained on the same columns."
        )
    if not np.issubdtype(H.dtype, np.number) or not np.isfinite(H).all() or (H < 0).any():
        raise NMFInputError(
            f"H must hold finite numbers >= 0 (the components of a trained model), but it holds "
            f"{'non-numbers' if not np.issubdtype(H.dtype, np.number) else 'NaN, infinite or negative values'}."
        )
    H = H if H.dtype in (np.float32, np.float64) else H.astype(np.float64)
    options = {"max_iter": max_iter, "tol": tol, "device": device, "l1_W": l1_W, "l2_W": l2_W, "beta": beta}
    words = dataclasses.replace(WORDS, values={"loss": beta})
    W, steps, converged, b = solve_w(X, H, solver, words, biases=biases, unstored_missing=unstored_missing, **options)
    if not converged and tol > 0:
        warnings.warn(
            f"solving W stopped at max_iter={max_iter} before tol={tol:g}; W may be far from the best fit: "
            "raise max_iter (nmf-transform --max-iter).",
            NMFWarning,
            stacklevel=2,
        )
    out = (W, b) if biases is not None else (W,)
    out += (steps,) if return_n_iter else ()
    return out if len(out) > 1 else W


def predictions(
    W: np.ndarray,
    H: np.ndarray,
    fitted: dict[str, np.ndarray],
    b: np.ndarray | None,
    entries: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """The model's values W H, plus mu + b + c, clipped: at every entry of the rows W stands for, (n, m).

    ``fitted`` is what a run's factors.npz holds beside W and H (``mu``, ``c``,
    ``rating_range``); ``entries`` (rows, cols) asks for those entries only, (len(rows),).
    """
    shape = (W.shape[0], H.shape[1])
    every = entries is None
    rows, cols = (torch.from_numpy(np.asarray(A, dtype=np.int64)) for A in (np.indices(shape) if every else entries))
    like = torch.from_numpy(W)
    biases = None if b is None else Biases.of(fitted["mu"], b, fitted["c"], like)
    clip = tuple(fitted["rating_range"]) if "rating_range" in fitted else None
    values = predict(rows.ravel(), cols.ravel(), like, torch.from_numpy(H).to(like.dtype), biases, clip).numpy()
    return values.reshape(shape) if every else values


def observed_entries(X: np.ndarray | sp.spmatrix, unstored_missing: bool) -> tuple[np.ndarray, ...]:
    """(rows, cols, values) of X's observed entries: not NaN, or stored when unstored entries are missing."""
    if sp.issparse(X) and unstored_missing:
        C = X.tocoo()
        return C.row, C.col, C.data
    dense = X.toarray() if sp.issparse(X) else np.asarray(X)
    rows, cols = np.nonzero(~np.isnan(dense))
    return rows, cols, dense[rows, cols]


def run_settings(run: Path) -> tuple[float, str]:
    """How a run read X, from its ``.hydra/config.yaml``: its loss's beta (2 where none) and ``data.unstored``."""
    config = run / ".hydra" / "config.yaml"
    if not config.is_file():
        return 2.0, "zero"
    from omegaconf import OmegaConf  # here: the estimator imports this module, and no config library

    cfg = OmegaConf.load(config)
    model, data = cfg.get("model", {}), cfg.get("data", {})
    beta = loss_beta(str(model.get("loss", "fro")), model.get("beta"))
    if beta is not None:
        print(f"the run trained model.loss={model.get('loss')}: solving W on the beta={beta:g} divergence")
    unstored = str(data.get("unstored", "zero"))
    if unstored == "missing":
        print("the run read data.unstored=missing: a sparse matrix's unstored entries are missing, not zeros")
    return 2.0 if beta is None else beta, unstored


def main(argv: list[str] | None = None) -> None:
    """``nmf-transform FACTORS NEW_MATRIX``: write W for the rows of a new matrix."""
    ap = argparse.ArgumentParser(prog="nmf-transform", description=main.__doc__)
    ap.add_argument("factors", help="factors.npz of a run (or the run directory)")
    ap.add_argument("matrix", help="new rows: .npy .npz .csv .tsv .mtx .pt, same columns as the training X")
    ap.add_argument("--out", default=None, help="output .npy, .csv, .tsv or .txt (default: <matrix stem>_W.npy here)")
    ap.add_argument(
        "--solver", default=None, choices=registry.names(closed_form=True), help="default: hals, or mu with --beta"
    )
    ap.add_argument(
        "--beta",
        type=float,
        default=None,
        help="the loss the model was trained on: 2 Frobenius, 1 KL, 0 IS (default: the run's model.loss, "
        "read from its .hydra/config.yaml, else 2)",
    )
    ap.add_argument("--max-iter", type=int, default=FIXED_H_MAX_ITER, help="passes at most (default: %(default)s)")
    ap.add_argument(
        "--tol",
        type=float,
        default=FIXED_H_TOL,
        help="hals: stop once the projected gradient is tol times its start; other solvers: once the "
        "objective changes by less (default: %(default)s)",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--unstored",
        default=None,
        choices=("zero", "missing"),
        help="a sparse matrix's unstored entries: observed zeros, or missing (ratings) (default: the run's "
        "data.unstored, else zero)",
    )
    ap.add_argument("--key", default=None, help="array name in a multi-array .npz or a .pt dict")
    ap.add_argument("--skip-header", type=int, default=0)
    ap.add_argument(
        "--predictions",
        default=None,
        help="also write the model's value at every entry of the new rows here (.npy, .csv, ...): a biased model's "
        "mu + b + c + W H, clipped to the run's data.rating_range (what a recommender ranks)",
    )
    args = ap.parse_args(argv)
    factors = Path(args.factors)
    if factors.is_dir():
        factors = factors / "factors.npz"
    finish_pending(factors.parent)  # a run killed as it renamed its results: they are whole, finish it
    if not factors.is_file():
        ap.error(f"{factors} does not exist: give a run's factors.npz or its directory.")
    out = Path(args.out) if args.out else Path(f"{Path(args.matrix).stem}_W.npy")
    for flag, path in (("--out", out), ("--predictions", args.predictions)):
        if path is None:
            continue
        if Path(path).suffix.lower() not in MATRIX_SUFFIXES:
            ap.error(f"{flag} {path}: write a matrix as {', '.join(MATRIX_SUFFIXES)} (numpy's binary, or text).")
        if not Path(path).parent.is_dir():
            ap.error(f"{flag} {path}: the folder {Path(path).parent} does not exist; create it or pick another path.")
    try:
        with np.load(factors, allow_pickle=False) as f:
            if "H" not in f:
                ap.error(f"{factors} has no array 'H' (it holds {list(f.keys())}).")
            H = f["H"]
            fitted = {k: f[k] for k in ("mu", "c", "rating_range") if k in f}  # a biased model's, its scale
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
        ap.error(f"could not read {factors} ({err}); a run's factors.npz holds W and H as numeric arrays.")
    try:
        beta, unstored = run_settings(factors.parent)
        beta = args.beta if args.beta is not None else beta
        matrix = from_file(args.matrix, key=args.key, skip_header=args.skip_header, unstored=args.unstored or unstored)
        X, missing = materialize(matrix.X), matrix.unstored_missing
        biases = (fitted["mu"], fitted["c"]) if "mu" in fitted else None
        options = {"beta": beta, "biases": biases, "unstored_missing": missing}
        solved = transform(X, H, args.solver, args.max_iter, args.tol, args.device, **options)
        W, b = solved if biases is not None else (solved, None)
    except (ValueError, FileNotFoundError) as err:  # in this command's own words, exit code 2 as argparse's
        flags = {"data.skip_header=": "--skip-header ", "data.key=": "--key ", "data.key": "--key"}
        flags.update({"data.unstored=": "--unstored ", "data.unstored": "--unstored", "data.path=": ""})
        text = str(err)
        for key, flag in flags.items():
            text = text.replace(key, flag)
        print(f"error: {text}", file=sys.stderr)
        raise SystemExit(2) from None
    save_matrix(out, W)  # written whole, then renamed: never a truncated W
    if args.predictions is not None or fitted:  # the model's values: with its biases, in its rating range
        rows, cols, truth = observed_entries(X, missing)
        if args.predictions is not None:
            values = predictions(W, H, fitted, b)
            save_matrix(Path(args.predictions), values)
            at = values[rows, cols]
        else:
            at = predictions(W, H, fitted, b, (rows, cols))
        rmse = math.sqrt(float(np.square(truth - at).mean())) if len(truth) else math.nan
        clip = f", predictions within {fitted['rating_range'].tolist()}" if "rating_range" in fitted else ""
        print(f"wrote {out}: W {W.shape[0]} x {W.shape[1]}; RMSE {rmse:.6g} at the {len(truth)} entries{clip}")
        return
    if sp.issparse(X) and not missing:  # Gram form: no dense copy of a large sparse X
        x2 = float((X.data**2).sum())
        sq = x2 - 2 * float((X @ H.T * W).sum()) + float(((W.T @ W) * (H @ H.T)).sum())
    elif sp.issparse(X):  # ratings: the stored entries alone
        rows, cols, truth = observed_entries(X, missing)
        model = predictions(W, H, {}, None, (rows, cols))  # (W H at them: no biases, no clip)
        x2, sq = float(np.square(truth).sum()), float(np.square(truth - model).sum())
    else:
        obs = ~np.isnan(X)
        x2, sq = float(np.square(X[obs]).sum()), float(np.square((np.nan_to_num(X) - W @ H)[obs]).sum())
    error = f"relative error {math.sqrt(max(sq, 0.0) / x2):.6g}" if x2 > 0 else "the new rows are all zero, and so is W"
    print(f"wrote {out}: W {W.shape[0]} x {W.shape[1]}, {error}")


if __name__ == "__main__":
    main()
