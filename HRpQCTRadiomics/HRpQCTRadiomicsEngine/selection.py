"""The paper's three-stage feature selection as a scikit-learn transformer.

variance threshold (0.02) -> Pearson correlation filter (|r| > 0.9) -> LASSO.

Scaling each step assumes (the paper does not state it; these are our choices):

1. **Variance threshold on min-max scaled features.** Raw radiomic features range over many
   orders of magnitude (HU^2 energies next to unitless ratios in [0, 1]), so a fixed
   threshold on raw variance would drop every ratio and keep every energy. Scaled to [0, 1]
   with the training minimum and maximum, a variance can be at most 0.25, and 0.02 means
   "nearly constant" for every feature alike (a constant feature has variance 0).
2. **Correlation on the raw values.** Pearson's r does not depend on scale or offset, so
   raw and standardised values give the same r. Features are visited in order of
   decreasing |r| with the label on the training data, and a feature is dropped when
   |r| > 0.9 with a feature already kept: of a correlated pair, the more informative one
   stays (the paper does not say which is kept).
3. **LASSO on standardised features** (zero mean, unit variance on the training data),
   because the L1 penalty treats all coefficients alike only when the features share a
   scale. The label (0/1) is regressed linearly, as "LASSO regression" in the paper; the
   penalty ``alpha`` is chosen by cross-validation on the training data (folds grouped by
   subject when groups are given, so slices of one subject are never split). Features with
   non-zero coefficients are kept; if LASSO keeps none, the single feature most correlated
   with the label is kept (recorded in ``lasso_fallback_``).

**Several classes** (more than two labels, e.g. normal / osteopenia / osteoporosis): each
class is turned into its one-vs-rest 0/1 indicator. Step 2 ranks a feature by its largest
|r| with any indicator; step 3 runs the same linear LASSO (own cross-validated ``alpha``) on
every indicator and keeps the **union** of their non-zero features. For two classes this is
exactly the binary procedure (the indicator of class 0 is 1 - y: same |r|, same support), and
it keeps LASSO a plain linear regression as in the paper; a multinomial L1 logistic
regression would be the other choice, but is far slower to cross-validate and ties the
selection to one classifier family. ``max_features`` then keeps the features with the
largest |coefficient| over the classes; ``lasso_coef_`` is ``(classes, features)``.

Everything is fitted on training data only: inside cross-validation the selector is part of
the pipeline and is refitted in every fold.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

__all__ = ["PaperFeatureSelector"]


def _indicators(y: np.ndarray) -> np.ndarray | None:
    """One-vs-rest 0/1 columns ``(samples, classes)`` for more than two labels, else None."""
    classes = np.unique(y)
    if classes.size <= 2:
        return None
    return (y[:, None] == classes[None, :]).astype(np.float64)


def _relevance(y: np.ndarray, X: np.ndarray) -> np.ndarray:
    """|r| with the label; with several classes the largest |r| with any class indicator."""
    indicators = _indicators(y)
    if indicators is None:
        return _abs_corr_with(y, X)
    return np.max([_abs_corr_with(col, X) for col in indicators.T], axis=0)


def _abs_corr_with(y: np.ndarray, X: np.ndarray) -> np.ndarray:
    yc = y - y.mean()
    Xc = X - X.mean(axis=0)
    denom = np.sqrt((Xc**2).sum(axis=0) * (yc**2).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.abs(Xc.T @ yc) / denom
    return np.nan_to_num(r, nan=0.0)


class PaperFeatureSelector(TransformerMixin, BaseEstimator):
    """Variance threshold -> correlation filter -> LASSO (see module docstring).

    Parameters
    ----------
    variance_threshold:
        Minimum variance of the min-max scaled feature (default 0.02, the paper's).
    correlation_threshold:
        Drop a feature whose |Pearson r| with a kept feature exceeds this (default 0.9).
    use_lasso:
        Run the LASSO step (default True).
    lasso_cv:
        Folds for choosing ``alpha`` (grouped by subject when ``groups`` are given).
    max_features:
        Optional cap: keep at most this many LASSO features (largest |coefficient|).
    random_state:
        Seed for LASSO's coordinate descent order (deterministic with ``selection="cyclic"``).

    Attributes
    ----------
    support_:
        Boolean mask over the input features: selected by all three steps.
    variance_support_, correlation_support_:
        Masks after step 1 and after steps 1-2.
    lasso_coef_:
        LASSO coefficients (on standardised features) of the features passing step 2;
        ``(classes, features)`` for several classes.
    alpha_:
        Chosen LASSO penalty (several classes: the mean of ``alphas_``, one per class).
    """

    def __init__(self, variance_threshold: float = 0.02, correlation_threshold: float = 0.9,
                 use_lasso: bool = True, lasso_cv: int = 5, max_features: int | None = None,
                 random_state: int | None = 0):
        self.variance_threshold = variance_threshold
        self.correlation_threshold = correlation_threshold
        self.use_lasso = use_lasso
        self.lasso_cv = lasso_cv
        self.max_features = max_features
        self.random_state = random_state

    def fit(self, X, y, groups=None):
        """Fit the three steps on training data ``X`` (samples x features), labels ``y``."""
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if X.ndim != 2 or X.shape[0] != y.shape[0]:
            raise ValueError(f"X {X.shape} and y {y.shape} do not match")
        if not np.isfinite(X).all():
            raise ValueError("Feature selection needs finite values; remove NaN/inf first")
        self.n_features_in_ = X.shape[1]

        # 1. variance of min-max scaled features
        lo, hi = X.min(axis=0), X.max(axis=0)
        span = np.where(hi > lo, hi - lo, 1.0)
        scaled_var = ((X - lo) / span).var(axis=0)
        variance_ok = scaled_var > self.variance_threshold
        self.scaled_variance_ = scaled_var
        self.variance_support_ = variance_ok

        # 2. greedy correlation filter, most label-correlated first
        relevance = _relevance(y, X)
        candidates = np.flatnonzero(variance_ok)
        order = candidates[np.argsort(-relevance[candidates], kind="stable")]
        kept: list[int] = []
        if order.size:
            corr = np.abs(np.corrcoef(X[:, order], rowvar=False)).reshape(order.size, order.size)
            corr = np.nan_to_num(corr, nan=0.0)
            kept_pos: list[int] = []
            for pos in range(order.size):
                if all(corr[pos, k] <= self.correlation_threshold for k in kept_pos):
                    kept_pos.append(pos)
            kept = sorted(int(order[p]) for p in kept_pos)
        corr_ok = np.zeros(X.shape[1], dtype=bool)
        corr_ok[kept] = True
        self.correlation_support_ = corr_ok

        # 3. LASSO on standardised features
        support = corr_ok.copy()
        self.lasso_coef_ = np.zeros(len(kept))
        self.alpha_ = None
        self.lasso_fallback_ = False
        if self.use_lasso and kept:
            support = self._lasso(X[:, kept], y, groups, np.array(kept), relevance, X.shape[1])
        self.support_ = support
        return self

    def _lasso(self, Xk, y, groups, kept, relevance, n_features):
        from sklearn.linear_model import LassoCV
        from sklearn.model_selection import GroupKFold, KFold

        mean, std = Xk.mean(axis=0), Xk.std(axis=0)
        Z = (Xk - mean) / np.where(std > 0, std, 1.0)
        if groups is not None and len(np.unique(groups)) >= 2:
            n_splits = min(self.lasso_cv, len(np.unique(groups)))
            splits = list(GroupKFold(n_splits=n_splits).split(Z, y, groups))
        else:
            n_splits = min(self.lasso_cv, len(y))
            splits = list(KFold(n_splits=n_splits, shuffle=True,
                                random_state=self.random_state).split(Z))
        indicators = _indicators(y)
        targets = [y] if indicators is None else list(indicators.T)
        coefs, alphas = [], []
        for target in targets:  # one-vs-rest for several classes (module docstring)
            lasso = LassoCV(cv=splits, random_state=self.random_state, max_iter=20000)
            lasso.fit(Z, target)
            coefs.append(lasso.coef_)
            alphas.append(float(lasso.alpha_))
        if indicators is None:
            coef = coefs[0]
            self.lasso_coef_ = coef
            self.alpha_ = alphas[0]
        else:
            self.lasso_coef_ = np.array(coefs)
            self.alphas_ = alphas
            self.alpha_ = float(np.mean(alphas))  # a summary for reports; each class has its own
            coef = np.max(np.abs(self.lasso_coef_), axis=0)
        chosen = np.flatnonzero(coef != 0)
        if chosen.size == 0:
            self.lasso_fallback_ = True
            chosen = np.array([int(np.argmax(relevance[kept]))])
        if self.max_features is not None and chosen.size > self.max_features:
            chosen = chosen[np.argsort(-np.abs(coef[chosen]), kind="stable")][:self.max_features]
        support = np.zeros(n_features, dtype=bool)
        support[kept[chosen]] = True
        return support

    def get_support(self, indices: bool = False):
        """Mask (or indices) of the selected input features."""
        check_is_fitted(self, "support_")
        return np.flatnonzero(self.support_) if indices else self.support_

    def transform(self, X):
        """Keep the selected columns."""
        check_is_fitted(self, "support_")
        X = np.asarray(X)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, the selector was fitted on "
                             f"{self.n_features_in_}")
        return X[:, self.support_]

    def get_feature_names_out(self, input_features=None):
        """Names of the selected features (``x<i>`` when no names are given)."""
        check_is_fitted(self, "support_")
        if input_features is None:
            input_features = [f"x{i}" for i in range(self.n_features_in_)]
        return np.asarray(input_features, dtype=object)[self.support_]
