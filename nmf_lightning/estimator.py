"""NMF as a scikit-learn estimator: ``from nmf_lightning import NMF``, on the training engine.

The estimator is thin glue around :mod:`nmf_lightning.engine` (the loop ``nmf-train``
runs): scikit-learn's parameters become an initial W, H (:mod:`nmf_lightning.init`), an
update (a closed-form rule or a torch optimizer) and an :class:`~nmf_lightning.objective.Objective`.
It imports neither Lightning nor Hydra, prints nothing and writes no file unless asked
(``verbose``, ``log_dir``).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import Tensor

from nmf_lightning.engine import GradientUpdate, SolverUpdate, Target, data_term, divergence, fit, sq_error, to_target
from nmf_lightning.engine.loop import Convergence
from nmf_lightning.engine.target import PRECISIONS, to_numpy
from nmf_lightning.engine.updates import fused_optimizer
from nmf_lightning.init import INITS, SVD_INITS, draw_factors, initial_factors
from nmf_lightning.objective import Objective
from nmf_lightning.solvers.rules import RULES
from nmf_lightning.transform import solve_w
from nmf_lightning.validation import check_matrix, check_precision, has_zeros

#: scikit-learn's solver names and ours for the closed-form rules
CLOSED_FORM = {"cd": "hals", "hals": "hals", "mu": "mu", "als": "als", "kaczmarz": "kaczmarz"}
#: gradient optimizers by name (any other: pass ``optimizer=``)
GRADIENT = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "sgd": torch.optim.SGD,
}
#: updates between two checks of ``tol`` (and between two lines of ``verbose`` / ``log_dir``)
TOL_WINDOW = 10
#: the online rules: H from running sums after every batch (``partial_fit``)
ONLINE = ("hals", "mu")
HALF = (torch.bfloat16, torch.float16)


@dataclass
class _Plan:
    """What a fit will run, resolved from the parameters and X before any work."""

    k: int
    init: str
    rule: str | None  # closed-form rule, or None for a gradient optimizer
    dtype: torch.dtype
    device: torch.device
    l1: tuple[float, float]
    l2: tuple[float, float]
    seed: int  # restart r starts from seed + r; Kaczmarz samples rows from it


class NMF(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Non-negative matrix factorization X ~ W H on the nmf-lightning engine, CPU or GPU.

    Parameters shared with :class:`sklearn.decomposition.NMF` mean the same:
    ``n_components`` (``"auto"``/None: from a custom H, else ``n_features``), ``init``
    (None: ``"nndsvda"`` when ``n_components <= min(n_samples, n_features)``, else
    ``"random"``; also ``"normal_abs"``, ``"custom"`` with ``fit(X, W=W0, H=H0)``), ``solver`` (``"cd"`` is HALS, the
    same coordinate descent; ``"mu"``; and ours: ``"als"``, ``"kaczmarz"``, and the
    gradient optimizers ``"adam"``, ``"adamw"``, ``"rmsprop"``, ``"sgd"``), ``beta_loss``
    (``"frobenius"``, ``"kullback-leibler"``, ``"itakura-saito"`` or a float; other than
    Frobenius with ``"mu"`` or a gradient solver), ``max_iter``, ``random_state``, ``alpha_W``, ``alpha_H``,
    ``l1_ratio`` (scaled by the data's size as scikit-learn does) and ``verbose``.

    ``tol`` stops the fit once the objective changes by less than ``tol`` (relative) over
    10 updates (scikit-learn's ``cd`` measures a projected gradient instead).

    Ours: ``optimizer`` (a factory ``params -> torch.optim.Optimizer``, e.g.
    ``functools.partial(torch.optim.Adam, lr=1e-2)``; when given it replaces ``solver``),
    ``lr`` (gradient solvers; None: scale-aware), ``lam`` and ``project`` (gradient
    solvers: the clamp penalty's weight, and whether to clamp W, H at 0 after every step),
    ``restarts`` (starts from seeds s, s+1, ... trained at once; the best is kept),
    ``device`` (``"auto"``: CUDA when visible), ``precision`` (None: X's dtype, float32 or
    float64; ``"64"``, ``"32"``, ``"bf16"``, ``"16"``), ``batch_rows`` (X stays in host
    memory and reaches the device in blocks of rows), ``forget_factor`` (``partial_fit``'s
    weight on the sums of earlier batches) and ``log_dir`` (TensorBoard curves there).

    NaN entries of a dense X are missing: the fit and ``reconstruction_err_`` skip them.

    Beyond and beside scikit-learn's ``NMF``: ``score`` (minus the reconstruction error of
    ``transform``, so model selection needs no scorer); ``transform`` computes in the
    dtype of ``components_`` (X of another float dtype is converted); ``init=None`` with
    ``restarts > 1`` means random starts; random inits draw from torch's generator, so a
    ``random_state`` gives other numbers than scikit-learn's (and the same as ``nmf-train``'s
    ``seed``); ``shuffle`` is not offered (coordinates are swept in order).
    """

    def __init__(
        self,
        n_components: int | str | None = "auto",
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
        verbose: int = 0,
        optimizer: Callable[[Iterable[Tensor]], torch.optim.Optimizer] | None = None,
        lr: float | None = None,
        lam: float = 0.0,
        project: bool = True,
        restarts: int = 1,
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
        self.verbose = verbose
        self.optimizer = optimizer
        self.lr = lr
        self.lam = lam
        self.project = project
        self.restarts = restarts
        self.device = device
        self.precision = precision
        self.batch_rows = batch_rows
        self.forget_factor = forget_factor
        self.log_dir = log_dir

    # ------------------------------------------------------------- public API
    def fit(self, X, y=None, W=None, H=None) -> NMF:
        """Learn the components of X (``W``, ``H``: the start with ``init="custom"``)."""
        self.fit_transform(X, W=W, H=H)
        return self

    def fit_transform(self, X, y=None, W=None, H=None) -> np.ndarray:
        """Learn the components of X and return its W (n_samples, n_components)."""
        self._check_params()
        X = self._validate(X, reset=True)
        W, H, steps, error = self._factorize(X, W, H)
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
        plan = self._plan(X, W, H if first else self.components_, first=first)
        t = self._target(X, plan)
        if first:
            _, H_now = self._start(X, t, plan, W, H, need_W=False)  # the batch's W is solved below
            self._online, self.n_steps_ = None, 0
        else:
            H_now = torch.as_tensor(self.components_).to(device=plan.device, dtype=plan.dtype)
        W_now = self._solve_w(X, H_now, plan)
        update = SolverUpdate(RULES[plan.rule](), plan.l1, plan.l2, online=True, forget=self.forget_factor)
        if self._online is not None:
            update.stats = {k: v.to(plan.device) for k, v in self._online.items()}
        update.begin(W_now, H_now)
        update.block(t, W_now, H_now)
        update.end(W_now, H_now)
        self._online = {k: v.cpu() for k, v in update.stats.items()}
        self.components_ = _numpy(H_now)
        self.n_components_ = self.components_.shape[0]
        self.n_steps_ += 1
        return self

    def transform(self, X) -> np.ndarray:
        """W >= 0 for new rows of X with the components held fixed."""
        check_is_fitted(self)
        X = self._validate(X, reset=False)
        self._check_positive(X)
        return self._solve_w(X, self.components_)

    def inverse_transform(self, X) -> np.ndarray:
        """The data ``W @ components_`` that rows W of the transformed space stand for."""
        check_is_fitted(self)
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
        self._check_positive(X)
        W, H = (torch.from_numpy(A) for A in (self._solve_w(X, self.components_), self.components_))
        device = self._device()
        beta = self._beta()
        target, W, H = to_target(X, H.dtype, device), W.to(device), H.to(device)
        error = float(sq_error(target, W, H)) if beta == 2 else 2 * float(divergence(target, W, H, beta))
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
        X = validate_data(
            self,
            X,
            accept_sparse=("csr", "csc"),
            dtype=[np.float64, np.float32],
            ensure_all_finite="allow-nan",
            reset=reset,
        )
        values = X.data if sp.issparse(X) else X
        if values.size and np.nanmin(values) < 0:
            raise ValueError(
                f"Negative values in data passed to {type(self).__name__} (input X): "
                f"{int((values < 0).sum())} entries below 0 (min {np.nanmin(values):.4g}); "
                "NMF needs X >= 0: clip or shift the data first."
            )
        check_matrix(X, totals=reset)  # NaN in a sparse X; to fit, something observed and positive
        return X

    def _check_params(self, online: bool = False) -> None:
        """Check every parameter on its own, before X is read."""
        _check_int("max_iter", self.max_iter, 1)
        _check_int("restarts", self.restarts, 1)
        _check_int("verbose", self.verbose, 0)
        if self.batch_rows is not None:
            _check_int("batch_rows", self.batch_rows, 1)
        _check_real("tol", self.tol, 0)
        _check_real("alpha_W", self.alpha_W, 0)
        if self.alpha_H != "same":
            _check_real("alpha_H", self.alpha_H, 0)
        _check_real("lam", self.lam, 0)
        _check_real("l1_ratio", self.l1_ratio, 0, high=1)
        _check_real("forget_factor", self.forget_factor, 0, strict=True, high=1)
        if not isinstance(self.project, (bool, np.bool_)):
            raise ValueError(f"project must be True or False, got {self.project!r}.")
        if self.lr is not None:
            _check_real("lr", self.lr, 0, strict=True)
        beta = self._beta()
        rs = self.random_state
        if isinstance(rs, numbers.Integral) and not 0 <= rs < 2**32:
            raise ValueError(f"random_state must be None, a RandomState or an integer in [0, 2**32), got {rs}.")
        if self.optimizer is not None:
            if not callable(self.optimizer):
                raise ValueError(
                    f"optimizer must be a factory params -> torch.optim.Optimizer (e.g. torch.optim.Adam or "
                    f"functools.partial(torch.optim.Adam, lr=0.01)), got {self.optimizer!r}; for a name use solver=."
                )
            if self.lr is not None:
                raise ValueError("lr and optimizer= are both set: give the learning rate in the optimizer factory.")
        rule = self._rule_name()
        if rule is None and self.solver not in GRADIENT and self.optimizer is None:
            known = sorted(CLOSED_FORM) + sorted(GRADIENT)
            raise ValueError(f"solver={self.solver!r} is not one of {known} (or pass optimizer=).")
        if rule is not None and (self.lam or not self.project or self.lr is not None):
            raise ValueError(
                f"lr, lam and project=False act on gradient solvers (adam, sgd, ...); solver={self.solver!r} "
                "is closed-form and keeps W, H >= 0 by itself: leave them at their defaults."
            )
        if self.init is not None and self.init != "custom" and self.init not in INITS:
            raise ValueError(f"init={self.init!r} is not one of {[*INITS, 'custom']} (or None).")
        if self.restarts > 1 and self.init in ("custom", "nndsvd", "nndsvda"):
            raise ValueError(
                f"init={self.init!r} gives the same start every time, so restarts={self.restarts} would train "
                "identical copies: use init='random' (or None, which then means random) or nndsvdar."
            )
        if online and rule not in ONLINE:
            raise ValueError(
                f"partial_fit updates H from running sums, which solver='cd' (HALS) and 'mu' have; got "
                f"solver={self.solver!r}{' with optimizer=' if self.optimizer is not None else ''}."
            )
        if beta != 2 and rule is not None and not RULES[rule].supports_beta:
            raise ValueError(
                f"solver={self.solver!r} fits the Frobenius loss only; beta_loss={self.beta_loss!r} needs "
                "solver='mu' or a gradient solver ('adam', ...)."
            )
        if beta != 2 and online:
            raise ValueError(f"partial_fit runs the Frobenius loss only; beta_loss={self.beta_loss!r} needs fit.")
        if beta != 2 and not self.project:
            raise ValueError(f"beta_loss={self.beta_loss!r} is defined for W H >= 0 only: leave project=True.")
        if online and self.restarts > 1:
            raise ValueError(f"partial_fit follows one start; restarts={self.restarts} applies to fit only.")
        if rule is not None and self.batch_rows is not None and not RULES[rule].supports_blocks:
            raise ValueError(
                f"solver={self.solver!r} samples rows anywhere in X for every update, so it cannot "
                "take X in row blocks; use 'cd', 'mu' or 'als', or batch_rows=None."
            )
        check_precision(self.precision, "precision", fix="'bf16' (float32's range in 16 bits) or '32'", known=None)
        if rule == "als" and self.precision is not None and PRECISIONS.get(str(self.precision)) in HALF:
            raise ValueError(f"solver='als' solves k x k systems, which precision={self.precision!r} cannot: use '32'.")
        self._device()  # a device that is not there fails now

    def _plan(self, X, W=None, H=None, first: bool = True) -> _Plan:
        """Check the parameters against X (and a custom W, H) before any work is done.

        ``first`` is False for a later ``partial_fit`` batch, which starts from ``components_``.
        """
        n, m = X.shape
        rule = self._rule_name()
        init = self._init_name(n, m, W, H) if first else "custom"
        k = self._n_components(m, init, H)
        if init in SVD_INITS and k > min(n, m):
            raise ValueError(f"init={init!r} needs n_components <= min(n_samples, n_features) = {min(n, m)}, got {k}.")
        if not first and H is not None and k != np.shape(H)[0]:
            raise ValueError(
                f"n_components={self.n_components} but the fitted components_ has {np.shape(H)[0]} rows: "
                "fit again to change it."
            )
        masked = not sp.issparse(X) and bool(np.isnan(X).any())
        self._check_positive(X)
        if rule is not None:
            spec = RULES[rule]
            if masked and not spec.supports_mask:
                raise ValueError(f"solver={self.solver!r} cannot skip missing (NaN) entries; use 'cd', 'mu' or 'als'.")
            if (self.alpha_W or self.alpha_H not in ("same", 0)) and not spec.supports_penalties:
                raise ValueError(f"solver={self.solver!r} takes no alpha_W / alpha_H; use 'cd', 'mu' or 'als'.")
        dtype = self._dtype(X)
        if dtype in HALF and sp.issparse(X):
            raise ValueError(
                f"precision={self.precision!r} has no sparse matrix kernels; X is sparse: use '32' or '64'."
            )
        l1_W, l1_H, l2_W, l2_H = self._regularization(n, m)
        return _Plan(k, init, rule, dtype, self._device(), (l1_W, l1_H), (l2_W, l2_H), self._seed())

    def _check_positive(self, X) -> None:
        """scikit-learn's refusal of zeros for beta_loss <= 0 (fit, transform and score alike)."""
        if self._beta() <= 0 and has_zeros(X):
            raise ValueError(
                f"When beta_loss <= 0 and X contains zeros, the solver may diverge (beta_loss={self.beta_loss!r} "
                "is defined for X > 0 only). Please add small values to X, or use a positive beta_loss."
            )

    def _beta(self) -> float:
        """``beta_loss`` as a number (scikit-learn's names: frobenius 2, kullback-leibler 1, itakura-saito 0)."""
        names = {"frobenius": 2.0, "kullback-leibler": 1.0, "itakura-saito": 0.0}
        if isinstance(self.beta_loss, str):
            if self.beta_loss not in names:
                raise ValueError(f"beta_loss={self.beta_loss!r} is not one of {sorted(names)} or a float.")
            return names[self.beta_loss]
        if isinstance(self.beta_loss, bool) or not isinstance(self.beta_loss, numbers.Real):
            raise ValueError(f"beta_loss must be one of {sorted(names)} or a float, got {self.beta_loss!r}.")
        return float(self.beta_loss)

    def _seed(self) -> int:
        if isinstance(self.random_state, numbers.Integral):
            return int(self.random_state)  # the seed nmf-train takes: the same start for the same number
        return int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))

    def _rule_name(self) -> str | None:
        return None if self.optimizer is not None else CLOSED_FORM.get(self.solver)

    def _init_name(self, n: int, m: int, W, H) -> str:
        if self.init is None:
            k = self.n_components if isinstance(self.n_components, numbers.Integral) else m
            return "nndsvda" if k <= min(n, m) and self.restarts == 1 else "random"
        if self.init == "custom" and H is None:
            raise ValueError("init='custom' starts from the W and H you pass: fit(X, W=W0, H=H0).")
        if self.init != "custom" and (W is not None or H is not None):
            warnings.warn(
                f"init={self.init!r}: the W and H passed are not used; set init='custom' to start from them.",
                RuntimeWarning,
                stacklevel=4,
            )
        return self.init

    def _n_components(self, m: int, init: str, H) -> int:
        k = self.n_components
        if k in ("auto", None):
            return np.shape(H)[0] if init == "custom" and H is not None else m
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"n_components must be an integer >= 1, 'auto' or None, got {k!r}.")
        return int(k)

    def _regularization(self, n: int, m: int) -> tuple[float, float, float, float]:
        """scikit-learn's scaling: W's terms by n_features, H's by n_samples."""
        alpha_H = self.alpha_W if self.alpha_H == "same" else self.alpha_H
        r = self.l1_ratio
        return m * self.alpha_W * r, n * alpha_H * r, m * self.alpha_W * (1 - r), n * alpha_H * (1 - r)

    def _dtype(self, X) -> torch.dtype:
        if self.precision is None:
            return torch.float32 if X.dtype == np.float32 else torch.float64
        if str(self.precision) not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not one of {[None, *PRECISIONS]}.")
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
    def _factorize(self, X, W=None, H=None) -> tuple[np.ndarray, np.ndarray, int, float]:
        """Fit W and H; return them as numpy with the updates run and ``||X - W H||_F`` (``sqrt(2 D_beta)``)."""
        plan = self._plan(X, W, H)
        blocks = self._blocks(X, plan)
        first = blocks if isinstance(blocks, Target) else None
        W_, H_ = self._start(X, first, plan, W, H)
        beta = self._beta()
        objective = Objective(
            loss="fro2" if beta == 2 else "beta",
            beta=None if beta == 2 else beta,
            n_obs=_n_obs(X),
            lam=self.lam,
            l1_W=plan.l1[0],
            l1_H=plan.l1[1],
            l2_W=plan.l2[0],
            l2_H=plan.l2[1],
        )
        update = self._update(plan, W_, H_, objective, sparse=sp.issparse(X))
        steps, converged = self._run(blocks, W_, H_, update, objective, X)
        with torch.no_grad():
            W_, H_ = W_.detach(), H_.detach()
            sq = data_term(blocks, W_, H_, objective.beta)  # (D_beta for a beta loss)
            loss = torch.nan_to_num(objective(sq, W_, H_).double(), nan=math.inf)
            best = int(loss.argmin()) if loss.dim() else None
            if best is not None:
                W_, H_, sq, loss = W_[best], H_[best], sq[best], loss[best]
            if not math.isfinite(float(loss)):
                hint = "lower lr" if plan.rule is None else "check X for extreme values"
                raise FloatingPointError(
                    f"the fit diverged: the loss became {float(loss)} within {steps} updates; {hint}."
                )
        if self.tol and not converged:
            warnings.warn(
                f"Maximum number of iterations {self.max_iter} reached before the objective settled to "
                f"tol={self.tol}. Increase max_iter to improve convergence.",
                ConvergenceWarning,
                stacklevel=2,
            )
        error = float(sq) if objective.beta is None else 2 * float(sq)  # scikit-learn's sqrt(2 D_beta)
        return _numpy(W_), _numpy(H_), steps, math.sqrt(max(error, 0.0))

    def _target(self, X, plan: _Plan, start: int = 0, device: torch.device | None = None) -> Target:
        triplets = None if plan.rule is None or RULES[plan.rule].supports_triplets else False
        return to_target(X, plan.dtype, device or plan.device, start=start, triplets=triplets)

    def _blocks(self, X, plan: _Plan) -> Target | Callable[[], Iterator[Target]]:
        """X as the engine reads it: whole on the device, or host-held row blocks moved per pass."""
        B = self.batch_rows
        if B is None or X.shape[0] <= B:
            return self._target(X, plan)
        X = X.tocsr() if sp.issparse(X) else X
        parts = [self._target(X[s : s + B], plan, start=s, device=torch.device("cpu")) for s in range(0, X.shape[0], B)]
        for p in parts:
            p.x_sq  # noqa: B018 - computed once on the host, not on every pass
        if plan.device.type == "cpu":
            return lambda: iter(parts)
        return lambda: (p.to(plan.device) for p in parts)

    def _start(self, X, t: Target | None, plan: _Plan, W, H, need_W: bool = True) -> tuple[Tensor, Tensor]:
        """The initial factors: custom (copies of W and H), or drawn with seeds from ``random_state``."""
        n, m = X.shape
        like = torch.empty((), dtype=plan.dtype, device=plan.device)
        if plan.init == "custom":
            H_ = _custom("H", H, (plan.k, m), like)
            if W is None and not need_W:
                return torch.zeros((n, plan.k), dtype=plan.dtype, device=plan.device), H_
            return _custom("W", W, (n, plan.k), like), H_
        options = {"seed": plan.seed, "restarts": self.restarts}
        if t is not None:  # X whole on the device: the init runs there
            return initial_factors(t, plan.k, plan.init, **options)
        if plan.init in SVD_INITS:  # row blocks: the SVD of X on the host, then to the device
            W_, H_ = initial_factors(self._target(X, plan, device=torch.device("cpu")), plan.k, plan.init, **options)
            return W_.to(plan.device), H_.to(plan.device)
        total = float(X.sum()) if sp.issparse(X) else float(np.nansum(X))
        return draw_factors((n, m), plan.k, plan.init, mean=total / max(_n_obs(X), 1), like=like, **options)

    def _update(self, plan: _Plan, W: Tensor, H: Tensor, objective: Objective, sparse: bool):
        if plan.rule is not None:
            rule = RULES[plan.rule](seed=plan.seed) if plan.rule == "kaczmarz" else RULES[plan.rule]()
            if objective.beta is not None:
                rule.beta = objective.beta
            return SolverUpdate(rule, plan.l1, plan.l2)
        W.requires_grad_(True)
        H.requires_grad_(True)
        factory = self.optimizer or partial(GRADIENT[self.solver], lr=self._lr(W, H))
        optimizer = fused_optimizer(factory, [W, H])
        # the Gram form (no n x m residual) for sparse X, and dense float64 where it stays exact
        gram_form = sparse or W.dtype == torch.float64
        return GradientUpdate(optimizer, objective, project=self.project, gram_form=gram_form, beta=objective.beta)

    def _lr(self, W: Tensor, H: Tensor) -> float:
        """``lr``, or a step that fits the data's scale.

        Adam-like steps move an entry by about lr, so 5% of the factors' typical size;
        SGD's safe step is 1/L, L the Lipschitz constant of the loss in W or H at the start.
        """
        if self.lr is not None:
            return float(self.lr)
        with torch.no_grad():
            if self.solver != "sgd":
                return 0.05 * max(float(A.float().pow(2).mean().sqrt()) for A in (W, H))
            L = max(float(torch.linalg.matrix_norm(G.float(), ord=2).max()) for G in (H @ H.mT, W.mT @ W))
        return 1.0 / max(L, 1e-12)

    def _run(self, blocks, W: Tensor, H: Tensor, update, objective: Objective, X) -> tuple[int, bool]:
        """Up to ``max_iter`` updates; every 10, the ``tol`` test (and a line or point when asked for)."""
        report = bool(self.verbose) or self.log_dir is not None
        if not report:
            result = fit(blocks, W, H, update, self.max_iter, objective=objective, tol=self.tol, tol_window=TOL_WINDOW)
            return result.steps, result.converged
        writer = _writer(self.log_dir) if self.log_dir is not None else None
        x_sq = _x_sq(X)
        convergence, done, converged = Convergence(), 0, False
        try:
            while done < self.max_iter and not converged:
                n = min(TOL_WINDOW, self.max_iter - done)
                result = fit(
                    blocks, W, H, update, n, objective=objective, tol=self.tol, tol_window=TOL_WINDOW, done=done,
                    convergence=convergence,
                )  # fmt: skip
                done, converged = done + result.steps, result.converged
                with torch.no_grad():
                    sq = sq_error(blocks, W.detach(), H.detach())
                    term = sq if objective.beta is None else data_term(blocks, W.detach(), H.detach(), objective.beta)
                    loss = objective(term, W.detach(), H.detach())
                if loss.dim():  # restarts: report the best
                    best = int(torch.nan_to_num(loss.double(), nan=math.inf).argmin())
                    loss, sq = loss[best], sq[best]
                loss, rel = float(loss), math.sqrt(max(float(sq), 0.0) / x_sq)
                if self.verbose:
                    print(f"NMF update {done}: objective {loss:.6g}, relative error {rel:.6g}")
                if writer is not None:
                    writer.add_scalar("train/loss", loss, done)
                    writer.add_scalar("train/relative_error", rel, done)
            if self.verbose and converged:
                print(f"NMF converged after {done} updates (tol={self.tol})")
        finally:
            if writer is not None:
                writer.close()
        return done, converged

    def _solve_w(self, X, H, plan: _Plan | None = None, return_n_iter: bool = False):
        """W for rows X with H fixed: the fit's W-update (HALS, or MU for ``solver="mu"``) run to ``tol``.

        The W penalties are the fit's (``alpha_W``, ``l1_ratio``, scaled by ``n_features``).
        """
        beta = self._beta()
        rule = "mu" if (self.solver == "mu" and self.optimizer is None) or beta != 2 else "hals"
        l1_W, _, l2_W, _ = self._regularization(*X.shape)
        device = plan.device if plan is not None else self._device()
        W, steps = solve_w(X, _numpy(H), rule, self.max_iter, self.tol, str(device), l1_W, l2_W, True, beta, warn=False)
        if plan is not None:  # partial_fit: on to the engine
            W = torch.from_numpy(W).to(device=plan.device, dtype=plan.dtype)
        return (W, steps) if return_n_iter else W


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
    est._plan(X, None, H, first=False)  # the checks of a fit, from a given H
    W, steps = est._solve_w(X, H, return_n_iter=True)
    return W, H, steps


# ------------------------------------------------------------------ helpers
def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) and name != "verbose" or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")


def _check_real(name: str, value, low: float, strict: bool = False, high: float = math.inf) -> None:
    bad = isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
    if bad or value < low or strict and value == low or value > high:
        span = f"{'>' if strict else '>='} {low}" + (f" and <= {high}" if high < math.inf else "")
        raise ValueError(f"{name} must be a finite number {span}, got {value!r}.")


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


def _numpy(A: Tensor | np.ndarray) -> np.ndarray:
    return A if isinstance(A, np.ndarray) else to_numpy(A)


def _n_obs(X) -> int:
    """Observed entries: all of a sparse X (its zeros are values), the non-NaN ones of a dense X."""
    return X.shape[0] * X.shape[1] if sp.issparse(X) else int(X.size - np.isnan(X).sum())


def _x_sq(X) -> float:
    values = X.data if sp.issparse(X) else X
    return float(np.nansum(np.square(values, dtype=np.float64)))


def _writer(log_dir: str):
    from torch.utils.tensorboard import SummaryWriter  # TensorBoard only when asked for

    return SummaryWriter(log_dir)
