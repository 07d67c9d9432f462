"""Project new rows onto trained components: W_new >= 0 minimising ||X_new - W_new H||.

H stays fixed, so this is a non-negative least-squares problem per row, solved with the
W-update of a closed-form solver (HALS by default, as scikit-learn's ``transform`` does
with its coordinate descent); for a model trained on a beta-divergence (KL, IS), MU on
that divergence. ``nmf-transform`` runs it from the command line.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from nmf_lightning.atomic import save_npy
from nmf_lightning.console import NMFWarning
from nmf_lightning.data.files import from_file
from nmf_lightning.data.rows import materialize
from nmf_lightning.divergence import loss_beta
from nmf_lightning.engine import SolverUpdate, Target, fit, to_target
from nmf_lightning.objective import Objective
from nmf_lightning.solvers import hals
from nmf_lightning.solvers.rules import RULES
from nmf_lightning.validation import NMFInputError, check_matrix, has_zeros


def transform(
    X: np.ndarray | sp.spmatrix,
    H: np.ndarray,
    solver: str | None = None,
    max_iter: int = 5000,
    tol: float = 1e-8,
    device: str = "cpu",
    l1_W: float = 0.0,
    l2_W: float = 0.0,
    return_n_iter: bool = False,
    beta: float = 2.0,
) -> np.ndarray | tuple[np.ndarray, int]:
    """Return W (n, k) >= 0 with X ~ W H for the fixed components H (k, m).

    NaN entries of a dense X are missing and do not count. HALS on a complete X runs
    :func:`nnls_hals` (passes on X H^T and H H^T formed once) until the projected gradient
    is ``tol`` times its start; the other solvers, and a masked X, run the training engine
    with H held fixed until the objective changes by less than ``tol`` (relative) over 10
    updates. Either way at most ``max_iter`` passes, with an :class:`NMFWarning` if tol was
    not met. ``l1_W`` and ``l2_W`` weigh ``|W|_1`` and ``1/2 ||W||^2`` as in training;
    ``return_n_iter`` also returns the passes run. ``beta`` != 2 fits that beta-divergence
    instead (1 KL, 0 IS), with ``solver="mu"`` (the default then; HALS otherwise).
    """
    solver = solver or ("hals" if beta == 2 else "mu")
    if solver not in RULES:
        raise NMFInputError(f"solver={solver!r} is not one of {sorted(RULES)}.")
    if beta != 2 and solver != "mu":
        raise NMFInputError(
            f"beta={beta:g} (a beta-divergence other than Frobenius) is solved by solver='mu', not {solver!r}."
        )
    check_matrix(X, totals=False)
    check_positive(X, beta)
    if solver == "kaczmarz" and not sp.issparse(X) and np.isnan(X).any():
        raise NMFInputError("solver='kaczmarz' cannot skip missing (NaN) entries; use hals, mu or als.")
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
    return solve_w(X, H, solver, max_iter, tol, device, l1_W, l2_W, return_n_iter, beta)


def check_positive(X: np.ndarray | sp.spmatrix, beta: float) -> None:
    """A beta <= 0 divergence (Itakura-Saito) divides by X: refuse a zero entry (a sparse X's unstored ones count)."""
    if beta <= 0 and has_zeros(X):
        name = "Itakura-Saito" if beta == 0 else f"beta={beta:g}"
        raise NMFInputError(
            f"the {name} divergence (beta <= 0) is defined for X > 0 only, and X has zero entries; "
            "add a small floor to X first."
        )


def solve_w(
    X: np.ndarray | sp.spmatrix,
    H: np.ndarray,
    solver: str = "hals",
    max_iter: int = 500,
    tol: float = 1e-6,
    device: str = "cpu",
    l1_W: float = 0.0,
    l2_W: float = 0.0,
    return_n_iter: bool = False,
    beta: float = 2.0,
    warn: bool = True,
) -> np.ndarray | tuple[np.ndarray, int]:
    """:func:`transform` for an X and H already checked (the estimator checks them its own way).

    ``warn``: an :class:`NMFWarning` when ``max_iter`` comes before ``tol``.
    """
    dtype = torch.float64 if H.dtype == np.float64 else torch.float32
    target = to_target(X, dtype, device, triplets=False)
    Ht = torch.from_numpy(H).to(device=device, dtype=dtype)
    k = H.shape[0]
    mean = float(X.sum() if sp.issparse(X) else np.nansum(X)) / max(target.n_obs, 1)
    W = torch.full((X.shape[0], k), math.sqrt(max(mean, 0.0) / k), dtype=dtype, device=device)
    if solver == "hals" and beta == 2 and not target.masked:
        W, steps, converged = nnls_hals(target, W, Ht, l1_W, l2_W, max_iter, tol)
    else:
        rule = RULES[solver](beta) if beta != 2 else RULES[solver]()
        step = SolverUpdate(rule, l1=(l1_W, 0.0), l2=(l2_W, 0.0), update_H=False)
        # 1/2 ||X - W H||^2 (or D_beta) + the W penalties
        objective = (
            Objective("fro2", l1_W=l1_W, l2_W=l2_W) if beta == 2 else Objective("beta", beta, l1_W=l1_W, l2_W=l2_W)
        )
        result = fit(target, W, Ht, step, max_iter, objective=objective, tol=tol)
        steps, converged = result.steps, result.steps < max_iter
    if not converged and tol > 0 and warn:
        warnings.warn(
            f"solving W stopped at max_iter={max_iter} before tol={tol:g}; W may be far from the best fit: "
            "raise max_iter (nmf-transform --max-iter).",
            NMFWarning,
            stacklevel=3,
        )
    W = W.cpu().numpy()
    return (W, steps) if return_n_iter else W


def nnls_hals(
    t: Target, W: Tensor, H: Tensor, l1: float, l2: float, max_iter: int, tol: float
) -> tuple[Tensor, int, bool]:
    """HALS passes for ``min_{W >= 0} 1/2 ||X - W H||^2 + l1 |W|_1 + l2/2 ||W||^2`` with H fixed.

    X H^T and H H^T are formed once, so a pass costs n k^2 and no product with X: the
    passes features of very different scales take are cheap. Every 10 passes each row
    takes Lawson-Hanson steps on its support (:func:`_on_support`), then the test:
    the projected gradient's norm at most ``tol`` times its value at the start
    (scikit-learn's test for ``cd``). Returns W, the passes run and whether tol was met.
    """
    k, dtype = H.shape[-2], torch.float64  # k x n work: float32 rounding would floor the gradient test
    G = (H @ H.mT).to(dtype) + l2 * torch.eye(k, dtype=dtype, device=H.device)
    B = (t.XHt(H).to(dtype) - l1).mT.contiguous()  # (k, n)
    A = W.mT.to(dtype).contiguous()

    def pg_norm(A: Tensor) -> float:
        grad = G @ A - B
        return float(torch.linalg.vector_norm(torch.where(A > 0, grad, grad.clamp_max(0))))

    start = pg_norm(A)
    for steps in range(1, max_iter + 1):
        A = hals.sweep(A, G, B)
        if steps % 10 == 0 or steps == max_iter:
            A = _on_support(A, G, B)
            if pg_norm(A) <= tol * start:
                return A.mT.to(W.dtype), steps, True
    return A.mT.to(W.dtype), max_iter, start == 0


def _on_support(A: Tensor, G: Tensor, B: Tensor, steps: int = 3, chunk: int = 1 << 22) -> Tensor:
    """Lawson-Hanson steps from each column of A (k, n): least squares on its support, stepping back to >= 0.

    Passes find which entries are 0 long before they settle the others when features
    differ in scale or components overlap; on the support the problem is a k x k solve.
    Where that solve leaves the support, the column moves towards it as far as it stays
    >= 0 (the objective falls all the way), the entry that reaches 0 leaves the support,
    and the solve is repeated, ``steps`` times at most. Entries of a component that is 0
    throughout (G[j, j] = 0) count as off the support.
    """
    k, n = A.shape
    rows = max(1, chunk // (k * k))  # columns solved at once: their (k, k) systems hold ~chunk numbers
    live = G.diagonal() > 0
    out = torch.empty_like(A)  # every column is written
    for lo in range(0, n, rows):
        a, b = A[:, lo : lo + rows].mT, B[:, lo : lo + rows].mT  # (c, k); a is replaced, never written into
        support = (a > 0) & live
        for _ in range(steps):
            d = support.to(A.dtype)
            M = d[:, :, None] * G * d[:, None, :] + torch.diag_embed(1 - d)  # G on the support, I off it
            x, info = torch.linalg.solve_ex(M, d * b)
            solved = (info == 0) & torch.isfinite(x).all(-1)
            below = support & (x < 0)
            # the step from a towards x that keeps every entry >= 0 (1: x itself)
            ratio = torch.where(below, a / (a - x).clamp_min(torch.finfo(a.dtype).tiny), torch.inf)
            step = torch.where(solved, ratio.amin(-1).clamp(max=1.0), 0.0)[:, None]
            a = torch.where(support, a + step * (x - a), 0.0).clamp_min(0)
            a = torch.where(below & (ratio <= step), 0.0, a)  # the entries that reached 0 leave
            support = support & (a > 0)
            if not bool((solved & below.any(-1)).any()):  # every solved column is >= 0: done
                break
        out[:, lo : lo + a.shape[0]] = a.mT
    return out


def run_beta(run: Path) -> float:
    """The beta of the loss a run trained (its ``.hydra/config.yaml``'s model.loss): 2 where it says none."""
    config = run / ".hydra" / "config.yaml"
    if not config.is_file():
        return 2.0
    from omegaconf import OmegaConf  # here: the estimator imports this module, and no config library

    model = OmegaConf.load(config).get("model", {})
    beta = loss_beta(str(model.get("loss", "fro")), model.get("beta"))
    if beta is not None:
        print(f"the run trained model.loss={model.get('loss')}: solving W on the beta={beta:g} divergence")
    return 2.0 if beta is None else beta


def main(argv: list[str] | None = None) -> None:
    """``nmf-transform FACTORS NEW_MATRIX``: write W for the rows of a new matrix."""
    ap = argparse.ArgumentParser(prog="nmf-transform", description=main.__doc__)
    ap.add_argument("factors", help="factors.npz of a run (or the run directory)")
    ap.add_argument("matrix", help="new rows: .npy .npz .csv .tsv .mtx .pt, same columns as the training X")
    ap.add_argument("--out", default=None, help="output .npy (default: <matrix stem>_W.npy here)")
    ap.add_argument("--solver", default=None, choices=sorted(RULES), help="default: hals, or mu with --beta")
    ap.add_argument(
        "--beta",
        type=float,
        default=None,
        help="the loss the model was trained on: 2 Frobenius, 1 KL, 0 IS (default: the run's model.loss, "
        "read from its .hydra/config.yaml, else 2)",
    )
    ap.add_argument("--max-iter", type=int, default=5000, help="passes at most (default: %(default)s)")
    ap.add_argument(
        "--tol",
        type=float,
        default=1e-8,
        help="hals: stop once the projected gradient is tol times its start; other solvers: once the "
        "objective changes by less (default: %(default)s)",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--key", default=None, help="array name in a multi-array .npz or a .pt dict")
    ap.add_argument("--skip-header", type=int, default=0)
    args = ap.parse_args(argv)
    factors = Path(args.factors)
    if factors.is_dir():
        factors = factors / "factors.npz"
    if not factors.is_file():
        ap.error(f"{factors} does not exist: give a run's factors.npz or its directory.")
    out = Path(args.out) if args.out else Path(f"{Path(args.matrix).stem}_W.npy")
    if not out.parent.is_dir():
        ap.error(f"--out {out}: the folder {out.parent} does not exist; create it or pick another path.")
    try:
        with np.load(factors, allow_pickle=False) as f:
            if "H" not in f:
                ap.error(f"{factors} has no array 'H' (it holds {list(f.keys())}).")
            H = f["H"]
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
        ap.error(f"could not read {factors} ({err}); a run's factors.npz holds W and H as numeric arrays.")
    try:
        beta = args.beta if args.beta is not None else run_beta(factors.parent)
        X = materialize(from_file(args.matrix, key=args.key, skip_header=args.skip_header).X)
        W = transform(X, H, args.solver, args.max_iter, args.tol, args.device, beta=beta)
    except (ValueError, FileNotFoundError) as err:  # in this command's own words, exit code 2 as argparse's
        flags = {"data.skip_header=": "--skip-header ", "data.key=": "--key ", "data.key": "--key"}
        text = str(err)
        for key, flag in flags.items():
            text = text.replace(key, flag)
        print(f"error: {text}", file=sys.stderr)
        raise SystemExit(2) from None
    save_npy(out, W)  # written whole, then renamed: never a truncated W
    if sp.issparse(X):  # Gram form: no dense copy of a large sparse X
        x2 = float((X.data**2).sum())
        sq = x2 - 2 * float((X @ H.T * W).sum()) + float(((W.T @ W) * (H @ H.T)).sum())
        rel = math.sqrt(max(sq, 0.0) / x2)
    else:
        obs = ~np.isnan(X)
        rel = np.linalg.norm((np.nan_to_num(X) - W @ H)[obs]) / np.linalg.norm(X[obs])
    print(f"wrote {out}: W {W.shape[0]} x {W.shape[1]}, relative error {rel:.6g}")


if __name__ == "__main__":
    main()
