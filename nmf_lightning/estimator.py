"""NMF as a scikit-learn estimator: ``from nmf_lightning import NMF``, on the training engine.

The estimator holds scikit-learn's parameters and ``_`` attributes and decides nothing
about the math: its parameters become an engine :class:`~nmf_lightning.engine.Spec`, and
a :class:`~nmf_lightning.engine.Problem` (the set-up ``nmf-train`` runs) fits it. It
imports neither Lightning nor Hydra, prints nothing and writes no file unless asked
(``verbose``, ``log_dir``).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from collections.abc import Callable, Iterable
from functools import partial

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import Tensor

from nmf_lightning.console import NMFWarning
from nmf_lightning.data.sources import Matrix
from nmf_lightning.engine import divergence, sq_error, to_block
from nmf_lightning.engine.biases import Biases, predict
from nmf_lightning.engine.problem import Problem, Source, Spec, solve_w
from nmf_lightning.init import INITS
from nmf_lightning.linalg import to_numpy
from nmf_lightning.params import (
    CONSTRAINTS,
    Boolean,
    Integer,
    Kind,
    Layout,
    Options,
    Real,
    Words,
    check_biases,
    check_compatible,
    check_params,
    check_restarts,
    one_of,
)
from nmf_lightning.rank import RankSearch, search
from nmf_lightning.recorder import Recorder
from nmf_lightning.solvers import registry
from nmf_lightning.validation import PRECISIONS, check_matrix, check_precision, check_sparse

#: updates between two checks of ``tol`` (and between two lines of ``verbose`` / ``log_dir``)
TOL_WINDOW = 10
#: scikit-learn's names of the beta-divergences
BETA_LOSSES = {"frobenius": 2.0, "kullback-leibler": 1.0, "itakura-saito": 0.0}
#: the precisions the estimator takes ("-mixed" ones are Lightning's autocast, which a fit here does not run)
ESTIMATOR_PRECISIONS = tuple(p for p in PRECISIONS if "mixed" not in p)
#: how the estimator names its parameters in messages
WORDS = Words(
    params={
        "rank": "n_components",
        "loss": "beta_loss",
        "steps": "max_iter",
        "forget": "forget_factor",
        "l1_W": "alpha_W",
        "l1_H": "alpha_H",
        "l2_W": "alpha_W",
        "l2_H": "alpha_H",
    },
    quote=True,
    solver_key="solver",
    aliases={"hals": "cd"},
    blocks="batch_rows",
    online="partial_fit",
    precision_fix="precision='32'",
    kl="kullback-leibler",
)


class NMF(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Non-negative matrix factorization X ~ W H on the nmf-lightning engine, CPU or GPU.

    Parameters shared with :class:`sklearn.decomposition.NMF` mean the same:
    ``n_components`` (None: from a custom H, else ``n_features``; ``"auto"``: from a custom H,
    else chosen by held-out error, see below), ``init``
    (None: ``"nndsvda"`` when ``n_components <= min(n_samples, n_features)``, else
    ``"random"``; also ``"normal_abs"``, ``"custom"`` with ``fit(X, W=W0, H=H0)``), ``solver`` (``"cd"`` is HALS, the
    same coordinate descent; ``"mu"``; and ours: ``"als"``, ``"kaczmarz"``, and the
    gradient optimizers ``"adam"``, ``"adamw"``, ``"rmsprop"``, ``"sgd"``), ``beta_loss``
    (``"frobenius"``, ``"kullback-leibler"``, ``"itakura-saito"`` or a float; other than
    Frobenius with ``"mu"`` or a gradient solver), ``max_iter``, ``random_state``, ``alpha_W``, ``alpha_H``,
    ``l1_ratio`` (scaled by the data's size as scikit-learn does; ``l2_scale="count"`` scales the L2
    terms by each row's and column's number of observed entries instead, ALS-WR's weighting) and ``verbose``.

    ``tol`` stops the fit once the objective changes by less than ``tol`` (relative) over
    10 updates (scikit-learn's ``cd`` measures a projected gradient instead).

    Ours: ``optimizer`` (a factory ``params -> torch.optim.Optimizer``, e.g.
    ``functools.partial(torch.optim.Adam, lr=1e-2)``; when given it replaces ``solver``),
    ``lr`` (gradient solvers; None: scale-aware), ``lam`` and ``project`` (gradient
    solvers: the clamp penalty's weight, and whether to clamp W, H at 0 after every step;
    with ``project=False`` the factors returned are the trained ones clamped at 0, and
    ``lam_growth`` > 1 multiplies ``lam`` every ``lam_every`` updates while the factors'
    negative mass is above ``neg_tol``, so that clamping costs the fit nothing),
    ``restarts`` (starts from seeds s, s+1, ... trained at once; the best is kept), ``consensus``
    (instead of the best restart, the consensus of all: cNMF's clustering of their components,
    outliers dropped above ``density_threshold`` of mean distance to the nearest ``neighbors``
    share of them; W solved for the consensus H, then ``consensus_refine`` updates of both;
    ``stability_`` is the clustering's silhouette, ``best_restart_err_`` the best restart's
    error), ``n_components="auto"``
    (the rank in ``rank_min``..``rank_max`` whose fit best predicts a held-out ``rank_holdout``
    share of the entries, or with ``rank_rule="1se"`` the smallest within one standard
    error of it; then a fit at that rank on all entries; ``rank_search_`` holds each
    candidate's row),
    ``device`` (``"auto"``: CUDA when visible), ``precision`` (None: X's dtype, float32 or
    float64; ``"64"``, ``"32"``, ``"bf16"``, ``"16"``), ``batch_rows`` (X stays in host
    memory and reaches the device in blocks of rows), ``forget_factor`` (``partial_fit``'s
    weight on the sums of earlier batches) and ``log_dir`` (TensorBoard curves there).

    NaN entries of a dense X are missing: the fit and ``reconstruction_err_`` skip them.

    Ratings: ``biases=True`` models X_ij as mu + b_i + c_j + (W H)_ij, the global mean and each
    row's and column's bias beside the factors (``intercept_``, ``row_bias_``, ``col_bias_``),
    fit in closed form in every update and shrunk by ``l2_bias`` (a row with n ratings keeps
    n / (n + l2_bias) of its mean residual); solvers ``"als"``, ``"mu"`` or a gradient one. The
    W of the rows fitted is kept (``W_``), so ``predict_entries(rows, cols)`` gives the model's
    value at (row, column) pairs of X, clipped to ``rating_range`` (low, high) when set.

    Beyond and beside scikit-learn's ``NMF``: ``score`` (minus the reconstruction error of
    ``transform``, so model selection needs no scorer); ``transform`` computes in the
    dtype of ``components_`` (X of another float dtype is converted); with ``restarts > 1``
    an SVD init (``init=None``'s nndsvda) starts the first restart and the others draw
    random starts, so the best is never a worse start than one fit's; random inits draw
    from torch's generator, so a ``random_state`` gives other numbers than scikit-learn's
    (and the same as ``nmf-train``'s ``seed``); ``shuffle`` is not offered (coordinates are
    swept in order).
    """

    def __init__(
        self,
        n_components: int | str | None = None,
        *,
        init: str | None = None,
        solver: str = "cd",
        beta_loss: str | float = "frobenius",
        tol: float = 1e-4,
        max_iter: int = 200,
        random_state: int | np.random.RandomState | None = None,
        alpha_W: float = 0.0,
        alpha_H: float | str = "same",
        l1_ratio: float = 0.0,
        l2_scale: str | None = None,
        biases: bool = False,
        l2_bias: float = 0.0,
        rating_range: tuple[float, float] | None = None,
        verbose: int = 0,
        optimizer: Callable[[Iterable[Tensor]], torch.optim.Optimizer] | None = None,
        lr: float | None = None,
        lam: float = 0.0,
        project: bool = True,
        lam_growth: float = 1.0,
        neg_tol: float = 1e-3,
        lam_every: int = 100,
        restarts: int = 1,
        consensus: bool = False,
        density_threshold: float = 0.5,
        neighbors: float = 0.3,
        consensus_refine: int = 0,
        rank_min: int = 2,
        rank_max: int = 20,
        rank_holdout: float = 0.1,
        rank_rule: str = "min",
        device: str = "auto",
        precision: str | None = None,
        batch_rows: int | None = None,
        forget_factor: float = 0.7,
        log_dir: str | None = None,
    ):
        self.n_components = n_components
        self.init = init
        self.solver = solver
        self.beta_loss = beta_loss
        self.tol = tol
        self.max_iter = max_iter
        self.random_state = random_state
        self.alpha_W = alpha_W
        self.alpha_H = alpha_H
        self.l1_ratio = l1_ratio
        self.l2_scale = l2_scale
        self.biases = biases
        self.l2_bias = l2_bias
        self.rating_range = rating_range
        self.verbose = verbose
        self.optimizer = optimizer
        self.lr = lr
        self.lam = lam
        self.project = project
        self.lam_growth = lam_growth
        self.neg_tol = neg_tol
        self.lam_every = lam_every
        self.restarts = restarts
        self.consensus = consensus
        self.density_threshold = density_threshold
        self.neighbors = neighbors
        self.consensus_refine = consensus_refine
        self.rank_min = rank_min
        self.rank_max = rank_max
        self.rank_holdout = rank_holdout
        self.rank_rule = rank_rule
        self.device = device
        self.precision = precision
        self.batch_rows = batch_rows
        self.forget_factor = forget_factor
        self.log_dir = log_dir

    #: what each parameter may be: the engine's table for the engine's parameters
    _parameter_constraints: dict = {
        "n_components": one_of(Integer(1), "auto", None),
        "init": one_of(None, Options((*INITS, "custom"))),
        "solver": Options(tuple(registry.names())),
        "beta_loss": one_of(Options(tuple(BETA_LOSSES)), Real()),
        "tol": CONSTRAINTS["tol"],
        "max_iter": CONSTRAINTS["steps"],
        "random_state": one_of(None, Integer(0, 2**32 - 1), Kind("a numpy RandomState", (np.random.RandomState,))),
        "alpha_W": CONSTRAINTS["l1_W"],
        "alpha_H": one_of(CONSTRAINTS["l1_H"], "same"),
        "l1_ratio": Real(0, 1),
        "l2_scale": one_of(None, "count"),
        "biases": CONSTRAINTS["biases"],
        "l2_bias": CONSTRAINTS["l2_bias"],
        "rating_range": CONSTRAINTS["rating_range"],
        "verbose": one_of(Integer(0), Boolean()),
        "optimizer": one_of(
            Kind(
                "a factory params -> torch.optim.Optimizer (e.g. torch.optim.Adam or "
                "functools.partial(torch.optim.Adam, lr=0.01)); for a name use solver=",
                callable=True,
            ),
            None,
        ),
        "lr": one_of(None, Real(0, open_low=True)),
        "lam": CONSTRAINTS["lam"],
        "project": CONSTRAINTS["project"],
        "lam_growth": CONSTRAINTS["lam_growth"],
        "neg_tol": CONSTRAINTS["neg_tol"],
        "lam_every": CONSTRAINTS["lam_every"],
        "restarts": CONSTRAINTS["restarts"],
        **{key: CONSTRAINTS[key] for key in ("consensus", "density_threshold", "neighbors", "consensus_refine")},
        **{key: CONSTRAINTS[key] for key in ("rank_min", "rank_max", "rank_holdout", "rank_rule")},
        "device": Kind("a device name: 'auto', 'cpu', 'cuda' or 'cuda:N'", (str, torch.device)),
        "precision": one_of(None, Options(ESTIMATOR_PRECISIONS)),
        "batch_rows": CONSTRAINTS["batch_rows"],
        "forget_factor": CONSTRAINTS["forget"],
        "log_dir": one_of(None, Kind("a folder path", (str,))),
    }

    # ------------------------------------------------------------- public API
    def fit(self, X, y=None, W=None, H=None) -> NMF:
        """Learn the components of X (``W``, ``H``: the start with ``init="custom"``)."""
        self.fit_transform(X, W=W, H=H)
        return self

    def fit_transform(self, X, y=None, W=None, H=None) -> np.ndarray:
        """Learn the components of X and return its W (n_samples, n_components)."""
        self._check_params()
        X = self._validate(X, reset=True)
        rank = self._choose_rank(X) if self._searches(H) else None
        W, H, steps, error = self._factorize(X, W, H, rank)
        self.W_ = W
        self.components_ = H
        self.n_components_ = H.shape[0]
        self.n_iter_ = steps
        self.reconstruction_err_ = error
        self.n_steps_ = 0  # partial_fit calls since this fit
        self._online = None
        return W

    def partial_fit(self, X, y=None, W=None, H=None) -> NMF:
        """Update the components from one batch of rows (online NMF, as ``MiniBatchNMF`` does).

        The batch's W is solved with H fixed, then H is updated from running sums in which
        earlier batches fade by ``forget_factor``. Only ``solver="cd"`` (HALS) and ``"mu"``.
        """
        self._check_params(online=True)
        first = not hasattr(self, "components_")
        X = self._validate(X, reset=first)
        problem = self._problem(X, W, H if first else self.components_, first=first, online=True)
        if first:
            H_now = self._start(X, problem, W, H)[1]
            self._online, self.n_steps_ = None, 0
        else:
            H_now = torch.as_tensor(self.components_).to(device=problem.device, dtype=problem.dtype)
        W_now = torch.from_numpy(self._solve_w(X, to_numpy(H_now))).to(device=problem.device, dtype=problem.dtype)
        update = problem.update(problem.rule())
        if self._online is not None:
            update.stats = {k: v.to(problem.device) for k, v in self._online.items()}
        problem.fit(W_now, H_now, update, 1)
        self._online = {k: v.cpu() for k, v in update.stats.items()}
        self.components_ = to_numpy(H_now)
        self.n_components_ = self.components_.shape[0]
        self.n_steps_ += 1
        return self

    def transform(self, X) -> np.ndarray:
        """W >= 0 for new rows of X with the components held fixed (and a biased model's mu and c: b is solved)."""
        check_is_fitted(self)
        X = self._validate(X, reset=False)
        return self._solve_w(X, self.components_)

    def predict_entries(self, rows, cols) -> np.ndarray:
        """The model's values at the entries (rows[i], cols[i]) of the X fitted: what a recommender predicts.

        ``mu + b_i + c_j + (W H)_ij`` for a biased model, ``(W H)_ij`` otherwise, clipped to
        ``rating_range`` when set. (Not ``predict``: scikit-learn's ``predict`` takes a matrix of samples.)
        """
        check_is_fitted(self)
        n, m = self.W_.shape[0], self.components_.shape[1]
        index = []
        for name, values, size in (("rows", rows, n), ("cols", cols, m)):
            values = np.asarray(values)
            if values.ndim != 1 or not (np.issubdtype(values.dtype, np.integer) or values.size == 0):
                raise ValueError(f"{name} must be a 1-D sequence of integers (indices of X's {name}), got {values!r}.")
            if values.size and (values.min() < 0 or values.max() >= size):
                raise ValueError(f"{name} must index X's {size} {name} (0 to {size - 1}), got {values.min()} to "
                                 f"{values.max()}.")  # fmt: skip
            index.append(torch.from_numpy(values.astype(np.int64)))
        if len(index[0]) != len(index[1]):
            raise ValueError(f"rows and cols must have the same length, got {len(index[0])} and {len(index[1])}.")
        W, H = torch.from_numpy(self.W_), torch.from_numpy(self.components_)
        biases = self._fitted_biases(self.row_bias_, W) if self.biases else None
        return to_numpy(predict(*index, W, H, biases, self.rating_range))

    def _fitted_biases(self, b: np.ndarray, like: Tensor) -> Biases:
        """The fitted mu and c with these rows' biases b, for predictions."""
        return Biases.of(self.intercept_, b, self.col_bias_, like)

    def inverse_transform(self, X) -> np.ndarray:
        """The data ``W @ components_`` that rows W of the transformed space stand for.

        A biased model's X is ``mu + b + c + W H``, and W does not carry each row's b:
        refused there, rather than returning ``W H`` as if it were X.
        """
        check_is_fitted(self)
        if self.biases:
            raise ValueError(
                "inverse_transform cannot restore X from W alone with biases=True: X ~ mu + b + c + W H, and each "
                "row's bias b is not in W. Use predict_entries(rows, cols) for the fitted rows' values."
            )
        W = X.toarray() if sp.issparse(X) else np.asarray(X)
        if W.ndim != 2 or W.shape[1] != self.n_components_:
            raise ValueError(
                f"inverse_transform takes W of shape (n_samples, {self.n_components_}), got shape {W.shape}."
            )
        return W.astype(self.components_.dtype, copy=False) @ self.components_

    def score(self, X, y=None) -> float:
        """Minus the reconstruction error of ``transform(X)``, as ``reconstruction_err_``: higher is better.

        That is ``||X - W H||_F`` over observed entries, or ``sqrt(2 D_beta(X | W H))`` for another ``beta_loss``.
        """
        check_is_fitted(self)
        X = self._validate(X, reset=False)
        W, b = self._solve_w(X, self.components_, return_biases=True)
        W, H = torch.from_numpy(W), torch.from_numpy(self.components_)
        device, beta = self._device(), self._beta()
        t, W, H = to_block(X, H.dtype, device, triplets=self.biases or None), W.to(device), H.to(device)
        if self.biases:  # the error of mu + b + c + W H
            t = self._fitted_biases(b, H).shift(t)
        error = float(sq_error(t, W, H)) if beta == 2 else 2 * float(divergence(t, W, H, beta))
        return -math.sqrt(max(error, 0.0))

    @property
    def _n_features_out(self) -> int:
        """Output features: one per component (names ``nmf0``, ``nmf1``, ...)."""
        return self.components_.shape[0]

    def __sklearn_tags__(self):  # noqa: D105
        tags = super().__sklearn_tags__()
        tags.input_tags.positive_only = True
        tags.input_tags.sparse = True
        tags.input_tags.allow_nan = True  # missing entries of a dense X
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    # --------------------------------------------------------------- checks
    def _validate(self, X, reset: bool):
        if sp.issparse(X):  # before scikit-learn converts it, reading its indices
            check_sparse(X)
        X = validate_data(
            self,
            X,
            accept_sparse=("csr", "csc"),
            dtype=[np.float64, np.float32],
            ensure_all_finite="allow-nan",
            reset=reset,
        )
        values = X.data if sp.issparse(X) else X
        if values.size and (values < 0).any():  # (NaN compares False: all-NaN X is check_matrix's to name)
            raise ValueError(
                f"Negative values in data passed to {type(self).__name__} (input X): "
                f"{int((values < 0).sum())} entries below 0 (min {np.nanmin(values):.4g}); "
                "NMF needs X >= 0: clip or shift the data first."
            )
        check_matrix(X, totals=reset)  # NaN in a sparse X; to fit, something observed and positive
        return X

    def _words(self) -> Words:
        """The messages' words: this estimator's own spelling of its solver and loss."""
        solver = self.solver if self.optimizer is None else "optimizer="
        aliases = {self._info().name: solver} if self.optimizer is None else {}
        return dataclasses.replace(WORDS, values={"loss": self.beta_loss}, aliases={**WORDS.aliases, **aliases})

    def _check_params(self, online: bool = False) -> None:
        """Check every parameter, alone and with the others, before X is read."""
        check_params(self.get_params(deep=False), self._parameter_constraints)
        if self.optimizer is not None and self.lr is not None:
            raise ValueError("lr and optimizer= are both set: give the learning rate in the optimizer factory.")
        info = self._info()
        if info.closed_form and (self.lam or not self.project or self.lr is not None):
            raise ValueError(
                f"lr, lam and project=False act on gradient solvers (adam, sgd, ...); solver={self.solver!r} "
                "is closed-form and keeps W, H >= 0 by itself: leave them at their defaults."
            )
        words, beta = self._words(), self._beta()
        check_restarts(self.init or "random", self.restarts, words)
        check_biases(bool(self.biases), None if beta == 2 else beta, self.restarts, online, words)
        if self.biases and self.n_components == "auto":
            raise ValueError("n_components='auto' chooses the rank of an unbiased model; with biases=True give it.")
        if online and self.n_components == "auto" and self.init != "custom":
            raise ValueError("n_components='auto' chooses the rank on a whole X: use fit, or give partial_fit a rank.")
        if online and self.restarts > 1:
            raise ValueError(f"partial_fit follows one start; restarts={self.restarts} applies to fit only.")
        check_precision(self.precision, "precision", fix="'bf16' (float32's range in 16 bits) or '32'", known=None)
        layout = Layout(streamed=online or self.batch_rows is not None)  # partial_fit's batches are X's row blocks
        half = self.precision is not None and PRECISIONS[str(self.precision)] in (torch.bfloat16, torch.float16)
        check_compatible(
            info,
            words,
            layout=layout,
            beta=None if beta == 2 else beta,
            loss="beta",
            project=self.project,
            online=online,
            half=half,
            precision=self.precision,
            biases=bool(self.biases),
        )
        self._device()  # a device that is not there fails now

    def _info(self) -> registry.SolverInfo:
        return registry.of_factory(self.optimizer) if self.optimizer is not None else registry.lookup(self.solver)

    def _beta(self) -> float:
        """``beta_loss`` as a number (scikit-learn's names: frobenius 2, kullback-leibler 1, itakura-saito 0)."""
        return BETA_LOSSES[self.beta_loss] if isinstance(self.beta_loss, str) else float(self.beta_loss)

    def _seed(self) -> int:
        if isinstance(self.random_state, (int, np.integer)):
            return int(self.random_state)  # the seed nmf-train takes: the same start for the same number
        return int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))

    def _init_name(self, n: int, m: int, W, H, rank: int | None = None) -> str:
        if self.init is None:
            k = rank or (self.n_components if isinstance(self.n_components, (int, np.integer)) else m)
            return "nndsvda" if k <= min(n, m) else "random"
        if self.init == "custom" and H is None:
            raise ValueError("init='custom' starts from the W and H you pass: fit(X, W=W0, H=H0).")
        if self.init != "custom" and (W is not None or H is not None):
            warnings.warn(
                f"init={self.init!r}: the W and H passed are not used; set init='custom' to start from them.",
                RuntimeWarning,
                stacklevel=5,
            )
        return self.init

    def _n_components(self, m: int, init: str, H) -> int:
        k = self.n_components
        if k in ("auto", None):
            return np.shape(H)[0] if init == "custom" and H is not None else m
        return int(k)

    def _regularization(self, n: int, m: int) -> tuple[float, float, float, float]:
        """scikit-learn's scaling: W's terms by n_features, H's by n_samples.

        With ``l2_scale="count"`` the L2 terms are scaled by each row's and column's observed
        entries instead (the engine's ``l2_scale``; the same numbers when X has no missing entry).
        """
        alpha_H = self.alpha_W if self.alpha_H == "same" else self.alpha_H
        r = self.l1_ratio
        n2, m2 = (1, 1) if self.l2_scale == "count" else (n, m)
        return m * self.alpha_W * r, n * alpha_H * r, m2 * self.alpha_W * (1 - r), n2 * alpha_H * (1 - r)

    def _dtype(self, X) -> torch.dtype:
        if self.precision is None:
            return torch.float32 if X.dtype == np.float32 else torch.float64
        return PRECISIONS[str(self.precision)]

    def _device(self) -> torch.device:
        if self.device in (None, "auto"):
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"device={self.device!r} is not a device: use 'auto', 'cpu', 'cuda' or 'cuda:N'.") from err
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: this NMF runs on 'cpu' or 'cuda' ('auto' picks).")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"device={self.device!r} but no CUDA device is visible (torch {torch.__version__}, CUDA build: "
                f"{torch.version.cuda or 'no'}); use device='cpu' or 'auto' (set_params(device='auto'))."
            )
        return device

    # ----------------------------------------------------------------- fit
    def _factory(self, info: registry.SolverInfo, seed: int) -> Callable:
        """The solver's factory: the user's optimizer, or the registry's with the estimator's lr (None: auto)."""
        if self.optimizer is not None:
            return self.optimizer
        if not info.closed_form:
            return partial(info.factory, lr="auto" if self.lr is None else self.lr)
        takes_seed = "seed" in inspect.signature(info.factory.rule_class).parameters  # Kaczmarz samples rows
        return partial(info.factory, seed=seed) if takes_seed else info.factory

    def _problem(self, X, W=None, H=None, first: bool = True, online: bool = False, rank: int | None = None) -> Problem:
        """The engine's problem for X and these parameters, checked against X before any work.

        ``first`` is False for a later ``partial_fit`` batch, which starts from ``components_``;
        ``rank`` is the one chosen for ``n_components="auto"``.
        """
        n, m = X.shape
        info, seed = self._info(), self._seed()
        init = self._init_name(n, m, W, H, rank) if first else "custom"
        k = rank or self._n_components(m, init, H)
        if not first and k != np.shape(H)[0]:
            raise ValueError(
                f"n_components={self.n_components} but the fitted components_ has {np.shape(H)[0]} rows: "
                "fit again to change it."
            )
        l1_W, l1_H, l2_W, l2_H = self._regularization(n, m)
        beta = self._beta()
        spec = Spec(
            rank=k,
            optimizer=self._factory(info, seed),
            loss="fro2" if beta == 2 else "beta",
            beta=None if beta == 2 else beta,
            lam=self.lam,
            l1_W=l1_W,
            l1_H=l1_H,
            l2_W=l2_W,
            l2_H=l2_H,
            l2_scale=self.l2_scale or "none",
            biases=bool(self.biases),
            l2_bias=self.l2_bias,
            project=bool(self.project),
            lam_growth=self.lam_growth,
            neg_tol=self.neg_tol,
            lam_every=self.lam_every,
            init="random" if init == "custom" else init,  # custom factors are copied, not drawn
            restarts=self.restarts,
            consensus=bool(self.consensus),
            density_threshold=self.density_threshold,
            neighbors=self.neighbors,
            consensus_refine=self.consensus_refine,
            seed=seed,
            online=online,
            forget=self.forget_factor,
            tol=self.tol,
            tol_window=TOL_WINDOW,
        )
        dtype, device = self._dtype(X), self._device()
        source = Source.host(X, dtype, device, self.batch_rows, observed=info.observed, biased=bool(self.biases))
        if online:  # partial_fit's batches are X's row blocks
            source.layout = dataclasses.replace(source.layout, streamed=True)
        problem = Problem(spec, source, dtype, device)
        problem.check(self._words(), self.precision)
        return problem

    def _searches(self, H) -> bool:
        """Whether ``n_components="auto"`` asks for the rank to be chosen (not read from a custom H)."""
        return self.n_components == "auto" and not (self.init == "custom" and H is not None)

    def _choose_rank(self, X) -> int:
        """The rank of lowest held-out error in ``rank_min``..``rank_max`` (:func:`nmf_lightning.rank.search`)."""
        problem = self._problem(X, rank=self.rank_min)  # the fit's spec, checked against X
        options = RankSearch(self.rank_min, self.rank_max, self.rank_holdout, self.rank_rule, problem.spec.seed)
        words, dtype, device = self._words(), problem.dtype, problem.device
        result = search(Matrix(X), problem.spec, self.max_iter, options, words, dtype, device, self.batch_rows)
        if self.verbose:
            print(result.table())
        self.rank_search_ = [row.as_dict() for row in result.rows]
        return result.rank

    def _start(self, X, problem: Problem, W, H) -> tuple[Tensor, Tensor]:
        """The initial factors: custom (copies of W and H), or the problem's, drawn with seeds from ``random_state``."""
        if self.init != "custom":
            return problem.initial_factors()
        n, m = X.shape
        like = torch.empty((), dtype=problem.dtype, device=problem.device)
        H_ = _custom("H", H, (problem.spec.rank, m), like)
        if W is None and problem.spec.online:  # partial_fit solves the batch's W itself
            return torch.zeros((n, problem.spec.rank), dtype=like.dtype, device=like.device), H_
        return _custom("W", W, (n, problem.spec.rank), like), H_

    def _factorize(self, X, W=None, H=None, rank: int | None = None) -> tuple[np.ndarray, np.ndarray, int, float]:
        """Fit W and H; return them as numpy with the updates run and ``||X - W H||_F`` (``sqrt(2 D_beta)``).

        With ``consensus`` they are the consensus of the restarts (the best one's error is
        ``best_restart_err_``).
        """
        problem = self._problem(X, W, H, rank=rank)
        W_, H_ = self._start(X, problem, W, H)
        if not problem.info.closed_form:
            W_.requires_grad_(True)
            H_.requires_grad_(True)
        step = problem.stepper(W_, H_)
        update = problem.update(step)
        steps, converged, losses = self._run(problem, W_, H_, update)
        W_, H_ = W_.detach(), H_.detach()
        all_H = H_
        loss = problem.loss(W_, H_)
        best = problem.best(loss)
        if best is not None:
            W_, H_, loss = W_[best], H_[best], loss[best]
        if not math.isfinite(float(loss)):
            lr = step.param_groups[0]["lr"] if isinstance(step, torch.optim.Optimizer) else None
            raise problem.diverged(losses, 0, steps, None, lr, self._words())
        if problem.spec.clamps:
            self._warn_clamped(problem, W_, H_)
            W_, H_ = problem.spec.reported(W_, H_)
        if problem.spec.consensus:
            self.best_restart_err_ = _error(problem, problem.data_term(W_, H_))
            W_, H_, found = problem.consensus(problem.spec.reported(W_, all_H)[1])
            self.stability_, self.consensus_kept_ = found.stability, found.kept
        if problem.biases is not None:
            self.intercept_ = float(problem.biases.mu)
            self.row_bias_, self.col_bias_ = to_numpy(problem.biases.b)[:, 0], to_numpy(problem.biases.c)[0]
        if self.tol and not converged:
            warnings.warn(
                f"Maximum number of iterations {self.max_iter} reached before the objective settled to "
                f"tol={self.tol}. Increase max_iter to improve convergence.",
                ConvergenceWarning,
                stacklevel=3,
            )
        return to_numpy(W_), to_numpy(H_), steps, _error(problem, problem.data_term(W_, H_))

    def _warn_clamped(self, problem: Problem, W: Tensor, H: Tensor) -> None:
        """Say when the factors returned, clamped at 0, fit worse than the trained ones (``project=False``)."""
        recorder = Recorder(problem)
        clamped = recorder.clamped({key: float(value) for key, value in recorder.metrics(W, H).items()})
        if clamped is not None and clamped.costly:
            warnings.warn(clamped.message(problem.spec, self._words()), NMFWarning, stacklevel=4)

    def _run(self, problem: Problem, W: Tensor, H: Tensor, update) -> tuple[int, bool, Tensor | None]:
        """Up to ``max_iter`` updates; every 10, the ``tol`` test (and a line or point when asked for)."""
        if not self.verbose and self.log_dir is None:
            result = problem.fit(W, H, update, self.max_iter)
            return result.steps, result.converged, result.losses
        recorder, grid, writer = Recorder(problem), None, None
        if self.log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # TensorBoard only when asked for

            from nmf_lightning.curves import UpdateGrid

            grid, writer = UpdateGrid(TOL_WINDOW), SummaryWriter(self.log_dir)
        done, converged, losses = 0, False, []
        try:
            while done < self.max_iter and not converged:
                result = problem.fit(W, H, update, min(TOL_WINDOW, self.max_iter - done), done=done)
                done, converged = done + result.steps, result.converged
                if result.losses is not None:
                    losses.append(result.losses)
                metrics = recorder.metrics(W, H)
                if self.verbose:
                    loss, rel = float(metrics["train/loss"]), float(metrics["train/relative_error"])
                    print(f"NMF update {done}: objective {loss:.6g}, relative error {rel:.6g}")
                if grid is not None:
                    grid.add(done, recorder.curve_metrics(metrics))
                    grid.flush([writer])
            if self.verbose and converged:
                print(f"NMF converged after {done} updates (tol={self.tol})")
        finally:
            if writer is not None:
                writer.close()
        return done, converged, torch.cat(losses) if losses else None

    def _solve_w(self, X, H: np.ndarray, return_n_iter: bool = False, return_biases: bool = False):
        """W for rows X with H fixed: the fit's W-update (HALS, or MU for ``solver="mu"``) run to ``tol``.

        The W penalties are the fit's (``alpha_W``, ``l1_ratio``, scaled by ``n_features``). A
        biased model holds its mu and c fixed too and solves each row's b with its W (by ALS
        when it was fit by ALS, else MU: HALS does not read X as observed entries).
        """
        beta = self._beta()
        rule = "mu" if (self.solver == "mu" and self.optimizer is None) or beta != 2 else "hals"
        if self.biases:
            rule = "als" if self.solver == "als" and self.optimizer is None else "mu"
        l1_W, _, l2_W, _ = self._regularization(*X.shape)
        options = {"max_iter": self.max_iter, "tol": self.tol, "device": self._device(), "beta": beta}
        options["l2_scale"] = self.l2_scale or "none"
        if self.biases:
            options.update(biases=(self.intercept_, self.col_bias_), l2_bias=self.l2_bias)
        W, steps, _, b = solve_w(X, np.asarray(H), rule, self._words(), l1_W=l1_W, l2_W=l2_W, **options)
        out = (W, steps) if return_n_iter else (W,)
        out += (b,) if return_biases else ()
        return out if len(out) > 1 else W


def non_negative_factorization(
    X,
    W=None,
    H=None,
    n_components: int | str | None = "auto",
    *,
    init: str | None = None,
    update_H: bool = True,
    solver: str = "cd",
    beta_loss: str | float = "frobenius",
    tol: float = 1e-4,
    max_iter: int = 200,
    alpha_W: float = 0.0,
    alpha_H: float | str = "same",
    l1_ratio: float = 0.0,
    random_state: int | np.random.RandomState | None = None,
    verbose: int = 0,
    **options,
) -> tuple[np.ndarray, np.ndarray, int]:
    """(W, H, n_iter) with X ~ W H, as :func:`sklearn.decomposition.non_negative_factorization`.

    ``update_H=False`` solves for W alone with the given H. ``options`` are the other
    parameters of :class:`NMF` (``device``, ``restarts``, ``precision``, ...).
    """
    est = NMF(
        n_components,
        init=init,
        solver=solver,
        beta_loss=beta_loss,
        tol=tol,
        max_iter=max_iter,
        alpha_W=alpha_W,
        alpha_H=alpha_H,
        l1_ratio=l1_ratio,
        random_state=random_state,
        verbose=verbose,
        **options,
    )
    if update_H:
        W = est.fit_transform(X, W=W, H=H)
        return W, est.components_, est.n_iter_
    est._check_params()
    X = est._validate(X, reset=True)
    if H is None:
        raise ValueError("update_H=False solves for W with H fixed: pass H.")
    k = np.shape(H)[0]
    if n_components not in ("auto", None) and n_components != k:
        raise ValueError(f"n_components={n_components} but H has {k} rows.")
    H = _check_factor("H", H, (k, X.shape[1])).astype(X.dtype, copy=False)
    if W is not None:
        warnings.warn("update_H=False solves for W: the W passed is not used.", RuntimeWarning, stacklevel=2)
    est.set_params(n_components=H.shape[0])
    est._problem(X, None, H, first=False)  # the checks of a fit, from a given H
    W, steps = est._solve_w(X, H, return_n_iter=True)
    return W, H, steps


# ------------------------------------------------------------------ helpers
def _error(problem: Problem, term: Tensor) -> float:
    """scikit-learn's ``reconstruction_err_`` from the data term: ``||X - W H||_F``, or ``sqrt(2 D_beta)``."""
    error = float(term) if problem.beta is None else 2 * float(term)
    return math.sqrt(max(error, 0.0))


def _custom(name: str, A, shape: tuple[int, int], like: Tensor) -> Tensor:
    """A user's starting factor, checked, as a copy on the training dtype and device."""
    if A is None:
        raise ValueError(f"init='custom' needs {name} of shape {shape}.")
    return torch.tensor(_check_factor(name, A, shape), dtype=like.dtype, device=like.device)


def _check_factor(name: str, A, shape: tuple[int, int]) -> np.ndarray:
    """A user's factor as float64: of ``shape``, finite, >= 0."""
    A = np.asarray(A, dtype=np.float64)
    if A.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {A.shape}.")
    if not np.isfinite(A).all() or (A < 0).any():
        raise ValueError(f"{name} must be finite and >= 0.")
    return A
