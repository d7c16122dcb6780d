"""The plain baseline: multinomial logistic regression on standardised log-expression, no scGPT.

A fair comparison always shows one (SCGPT_NOTES.md section 5: L1/L2 logistic regression on
expression comes close to fine-tuned scGPT on several published benchmarks). It is
CellTypist-style, not CellTypist: the input is standardised as ``celltypist.train`` does (genes
centred and scaled on the training cells, clipped at 10), but the classifier is one multinomial
(softmax) logistic regression with ``C=1``, where CellTypist fits one-vs-rest binary ones. Its cell
representation is PCA of the same standardised matrix. ``benchmarks/baseline_vs_celltypist.py``
measures the difference against CellTypist itself (``docs/strategies.md``).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

from scdlkit._shared.validation import describe_values, get_matrix, iter_row_chunks

__all__ = [
    "ExpressionLogisticBaseline",
    "gene_mean_scale",
    "highly_variable_genes",
    "log_normalised_matrix",
]

TARGET_SUM = 1e4
#: Cells per block when predicting (bounds the temporary copies of a large query).
PREDICT_CHUNK = 10_000
#: Training matrices up to this many entries get an exact dense PCA; larger ones sparse ARPACK.
DENSE_PCA_LIMIT = 2**22


def log_normalised_matrix(adata: Any, layer: str | None = None) -> sparse.csr_matrix:
    """Cells x genes, log-normalised: raw counts get ``normalize_total(1e4)`` + ``log1p``.

    Values that are already non-integer (log-normalised) are used as they are.

    Parameters
    ----------
    adata
        Cells x genes; in memory, dask or backed (read in chunks of rows).
    layer
        Layer holding the values; ``None`` uses ``adata.X``.

    Returns
    -------
    scipy.sparse.csr_matrix
        ``(n_cells, n_genes)`` float32. Counts are recognised by integer values in a sample of up
        to 2,000 cells; cells with a total of zero stay zero.

    Raises
    ------
    KeyError
        ``layer`` not found.
    ValueError
        ``adata.X`` is empty and no ``layer`` is given.

    Examples
    --------
    >>> matrix = sck.baselines.log_normalised_matrix(adata, layer="counts")  # doctest: +SKIP
    """
    kind = describe_values(adata, layer)
    blocks = [block for _, block in iter_row_chunks(get_matrix(adata, layer))]
    matrix = sparse.vstack(blocks, format="csr") if blocks else sparse.csr_matrix(adata.shape)
    if kind == "raw_counts":
        totals = np.asarray(matrix.sum(axis=1)).ravel()
        scale = np.divide(TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0)
        matrix = sparse.diags(scale.astype(np.float32)) @ matrix
        matrix.data = np.log1p(matrix.data)
    return sparse.csr_matrix(matrix, dtype=np.float32)


def gene_mean_scale(matrix: sparse.spmatrix) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and standard deviation (``ddof=0``; 1 where a gene is constant), in float64.

    Examples
    --------
    >>> from scipy import sparse
    >>> mean, scale = gene_mean_scale(sparse.csr_matrix([[0.0, 1.0], [2.0, 1.0]]))
    >>> mean.tolist(), scale.tolist()
    ([1.0, 1.0], [1.0, 1.0])
    """
    m = sparse.csr_matrix(matrix, dtype=np.float64)
    n = max(m.shape[0], 1)
    mean = np.asarray(m.sum(axis=0)).ravel() / n
    square = np.asarray(m.multiply(m).sum(axis=0)).ravel() / n
    std = np.sqrt(np.maximum(square - mean**2, 0.0))
    return mean, np.where(std > 1e-6, std, 1.0)


def highly_variable_genes(
    matrix: sparse.spmatrix, *, n_top_genes: int, n_bins: int = 20
) -> np.ndarray:
    """Columns of the ``n_top_genes`` most variable genes, Seurat-style, from sparse sums.

    As ``sc.pp.highly_variable_genes(flavor="seurat")``: on ``expm1`` of the log-normalised
    values, each gene's log dispersion (variance / mean) is standardised within ``n_bins`` bins of
    ``log1p`` mean expression, and genes are ranked by that score. Genes never expressed, and
    genes alone in their bin, score lowest; ties keep column order.

    Parameters
    ----------
    matrix
        ``(n_cells, n_genes)`` sparse log-normalised expression.
    n_top_genes
        How many genes to keep (all of them when ``n_genes`` is smaller).
    n_bins
        Bins of mean expression.

    Returns
    -------
    numpy.ndarray
        Sorted int64 column indices.

    Examples
    --------
    >>> keep = highly_variable_genes(
    ...     log_normalised_matrix(adata), n_top_genes=2000
    ... )  # doctest: +SKIP
    """
    counts = sparse.csr_matrix(matrix, dtype=np.float64, copy=True)
    counts.data = np.expm1(counts.data)
    n = counts.shape[0]
    mean = np.asarray(counts.mean(axis=0)).ravel()
    square = np.asarray(counts.multiply(counts).mean(axis=0)).ravel()
    var = np.maximum(square - mean**2, 0.0) * (n / max(n - 1, 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        log_dispersion = np.where((mean > 0) & (var > 0), np.log(var / mean), np.nan)
    bins = pd.cut(np.log1p(mean), n_bins)
    grouped = pd.Series(log_dispersion).groupby(bins, observed=False)
    spread = grouped.transform("std").to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        score = (log_dispersion - grouped.transform("mean").to_numpy()) / spread
    score = np.where(np.isfinite(score), score, -np.inf)
    return np.sort(np.argsort(-score, kind="stable")[:n_top_genes]).astype(np.int64)


class ExpressionLogisticBaseline:
    """Standardised log-expression -> multinomial logistic regression; PCA of it as latent.

    CellTypist-style scaling with a softmax classifier: each gene is centred and scaled on the
    training cells and clipped to ``+-max_value`` (``sc.pp.scale(max_value=10)``; CellTypist
    clips only above), so a rare gene cannot reach the huge values that plain scaling gives it and
    dominate an L2-penalised fit. The classifier is one multinomial logistic regression over all
    classes, not CellTypist's one-vs-rest binary regressions, so labels and probabilities differ
    from CellTypist's trained on the same cells (by how much: ``docs/strategies.md``).

    Parameters
    ----------
    C
        Inverse L2 regularisation strength of :class:`sklearn.linear_model.LogisticRegression`
        (1.0, the default of scikit-learn and of ``celltypist.train``).
    n_components
        Dimensions of the latent representation (PCA of the standardised expression).
    max_iter
        Solver iterations.
    random_state
        Seeds the sparse PCA solver (ARPACK's start vector); the logistic regression starts
        from zero and is deterministic.
    max_value
        Standardised values are clipped to ``[-max_value, max_value]``; ``None`` does not clip.
    n_top_genes
        Keep only this many highly variable genes of the training cells (Seurat-style dispersion,
        see :func:`highly_variable_genes`); ``None`` (default) keeps every gene.
    class_weight
        ``None`` or ``"balanced"`` (classes weighted inversely to their training frequency),
        passed to the logistic regression.
    tol
        Stopping tolerance of the logistic regression's solver (scikit-learn's default).
    """

    def __init__(
        self,
        *,
        C: float = 1.0,
        n_components: int = 50,
        max_iter: int = 1000,
        random_state: int = 0,
        max_value: float | None = 10.0,
        n_top_genes: int | None = None,
        class_weight: str | None = None,
        tol: float = 1e-4,
    ) -> None:
        if max_value is not None and max_value <= 0:
            msg = f"max_value={max_value}; give a positive number or None (no clipping)."
            raise ValueError(msg)
        if n_top_genes is not None and n_top_genes < 1:
            msg = f"n_top_genes={n_top_genes}; give a positive number or None (all genes)."
            raise ValueError(msg)
        if class_weight not in (None, "balanced"):
            msg = f"class_weight={class_weight!r}; choose None or 'balanced'."
            raise ValueError(msg)
        self.C = C
        self.n_components = n_components
        self.max_iter = max_iter
        self.random_state = random_state
        self.max_value = max_value
        self.n_top_genes = n_top_genes
        self.class_weight = class_weight
        self.tol = tol
        self.genes_: list[str] = []

    # ------------------------------------------------------------------------- standardising

    @property
    def _clip(self) -> float:
        return np.inf if self.max_value is None else float(self.max_value)

    def _standardise(self, values: np.ndarray, columns: np.ndarray) -> np.ndarray:
        z = (values - self.mean_[columns]) / self.scale_[columns]
        return np.clip(z, -self._clip, self._clip)

    @property
    def _zero_value(self) -> np.ndarray:
        """Standardised, clipped value of a zero in each gene (a dense row, not a matrix)."""
        return self._standardise(np.zeros(len(self.genes_)), np.arange(len(self.genes_)))

    def _shifted(self, matrix: sparse.csr_matrix) -> sparse.csr_matrix:
        """Standardised, clipped matrix minus each gene's zero value: sparse like ``matrix``.

        The dense standardised matrix is this plus one constant row (:attr:`_zero_value`); a
        linear model absorbs that row into its intercept and PCA into its centre, so both are
        fitted and applied exactly without ever densifying cells x genes.
        """
        matrix = sparse.csr_matrix(matrix, dtype=np.float64)
        data = self._standardise(matrix.data, matrix.indices) - self._zero_value[matrix.indices]
        # Index arrays copied: the caller's matrix must never share (and see changes to) them
        return sparse.csr_matrix(
            (data, matrix.indices.copy(), matrix.indptr.copy()), shape=matrix.shape
        )

    def standardised(self, matrix: sparse.csr_matrix, genes: pd.Index) -> np.ndarray:
        """The dense standardised, clipped matrix the classifier and PCA see (small data only).

        Parameters
        ----------
        matrix
            ``(n_cells, n_query_genes)`` sparse log-normalised expression.
        genes
            Gene names of its columns, aligned to the fitted genes as in :meth:`predict_proba`.

        Returns
        -------
        numpy.ndarray
            ``(n_cells, n_fitted_genes)`` float64: dense, so for inspection of a few cells.
        """
        return self._shifted(self._align(matrix, genes)).toarray() + self._zero_value

    def _align(self, matrix: sparse.csr_matrix, genes: pd.Index) -> sparse.csr_matrix:
        """Columns in the fitted gene order; genes absent from the query are zeros."""
        position = pd.Index(genes).get_indexer(self.genes_)
        present = np.flatnonzero(position >= 0)
        selector = sparse.csr_matrix(
            (np.ones(len(present), np.float32), (position[present], present)),
            shape=(matrix.shape[1], len(self.genes_)),
        )
        return sparse.csr_matrix(matrix @ selector)

    def _per_chunk(self, matrix: sparse.csr_matrix, genes: pd.Index, fn: Any) -> np.ndarray:
        """``fn`` of the shifted matrix, row chunk by row chunk (bounded temporary memory)."""
        matrix = sparse.csr_matrix(matrix)
        if matrix.shape[0] == 0:
            return fn(self._shifted(self._align(matrix, genes)))
        starts = range(0, matrix.shape[0], PREDICT_CHUNK)
        return np.concatenate(
            [fn(self._shifted(self._align(matrix[s : s + PREDICT_CHUNK], genes))) for s in starts]
        )

    # -------------------------------------------------------------------------------- fitting

    def fit(
        self, matrix: sparse.csr_matrix, genes: pd.Index, labels: np.ndarray
    ) -> ExpressionLogisticBaseline:
        """Fit on log-normalised ``matrix`` (cells x ``genes``) with integer ``labels``.

        Optionally keeps the ``n_top_genes`` most variable genes; then each gene is centred and
        scaled by its mean and standard deviation over these cells (constant genes are only
        centred) and clipped to ``+-max_value``. The logistic regression and the PCA
        (``min(n_components, n_cells - 1, n_genes - 1)`` components, at least 1) are both fitted
        on that matrix; memory stays at the size of the sparse input (see :meth:`_shifted`).

        Parameters
        ----------
        matrix
            ``(n_cells, n_genes)`` sparse log-normalised expression, e.g. from
            :func:`log_normalised_matrix`.
        genes
            Gene names of the columns, kept as strings in ``genes_`` to align later queries.
        labels
            ``(n_cells,)`` integer class codes.

        Returns
        -------
        ExpressionLogisticBaseline
            ``self``, with ``genes_``, ``mean_``, ``scale_``, ``classifier_`` and ``pca_`` set.
            ``classifier_`` and ``pca_`` act on the dense standardised matrix
            (:meth:`standardised`), exactly as if fitted on it.

        Examples
        --------
        >>> model = ExpressionLogisticBaseline().fit(
        ...     log_normalised_matrix(adata), adata.var_names, codes
        ... )  # doctest: +SKIP
        >>> proba = model.predict_proba(
        ...     log_normalised_matrix(query), query.var_names
        ... )  # doctest: +SKIP
        """
        # Lazy: PCA takes a fraction of a second to import; only this baseline uses it
        from sklearn.decomposition import PCA

        matrix = sparse.csr_matrix(matrix)
        genes = pd.Index(genes).astype(str)
        if self.n_top_genes is not None and self.n_top_genes < matrix.shape[1]:
            keep = highly_variable_genes(matrix, n_top_genes=self.n_top_genes)
            matrix, genes = matrix[:, keep], genes[keep]
        self.genes_ = list(genes)
        self.mean_, self.scale_ = gene_mean_scale(matrix)
        shifted = self._shifted(matrix)
        zero = self._zero_value
        self.classifier_ = self._fit_logistic(shifted, np.asarray(labels))

        n_comp = max(1, min(self.n_components, shifted.shape[0] - 1, shifted.shape[1] - 1))
        if shifted.shape[0] * shifted.shape[1] <= DENSE_PCA_LIMIT:
            pca = PCA(n_components=n_comp, svd_solver="full").fit(shifted.toarray())
        else:  # arpack centres a sparse matrix implicitly
            pca = PCA(n_components=n_comp, svd_solver="arpack", random_state=self.random_state)
            pca.fit(shifted)
        pca.mean_ = pca.mean_ + zero
        self.pca_ = pca
        return self

    def _fit_logistic(self, shifted: sparse.csr_matrix, labels: np.ndarray) -> Any:
        """Multinomial L2 logistic regression on the dense standardised matrix, fitted sparsely.

        The objective, its parametrisation and the L-BFGS-B settings are scikit-learn's
        ``LogisticRegression(solver="lbfgs")`` (mean loss + ``||W||^2 / (2 C n)``, intercept not
        penalised, ``gtol=tol``, ``maxls=50``), evaluated on ``shifted + zero row`` through
        sparse products. Fitting ``shifted`` itself would reach the same optimum but along
        another path, and with ``tol=1e-4`` the path decides where L-BFGS stops: this one stops
        where scikit-learn's multinomial ``LogisticRegression`` stops on the dense matrix.
        """
        # Lazy: scikit-learn and scipy.optimize take a fraction of a second to import
        from scipy.optimize import minimize
        from scipy.special import expit, log_expit, logsumexp, softmax
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from sklearn.utils.class_weight import compute_class_weight

        classes, codes = np.unique(labels, return_inverse=True)
        if len(classes) < 2:
            msg = f"the baseline needs at least 2 classes in training; got {len(classes)}."
            raise ValueError(msg)
        n_cells, n_genes = shifted.shape
        weight = np.ones(n_cells)
        if self.class_weight is not None:
            weight = compute_class_weight(self.class_weight, classes=classes, y=labels)[codes]
        total = float(weight.sum())
        l2 = 1.0 / (self.C * total)
        zero = self._zero_value
        binary = len(classes) == 2
        n_rows = 1 if binary else len(classes)
        onehot = np.zeros((n_cells, n_rows))
        if binary:
            onehot[:, 0] = codes == 1
        else:
            onehot[np.arange(n_cells), codes] = 1.0

        def loss_gradient(w: np.ndarray) -> tuple[float, np.ndarray]:
            coef = w.reshape((n_rows, n_genes + 1), order="F")
            weights, intercept = coef[:, :n_genes], coef[:, n_genes]
            raw = shifted @ weights.T + (weights @ zero + intercept)
            if binary:
                pointwise = -log_expit(raw[:, 0]) + (1.0 - onehot[:, 0]) * raw[:, 0]
                residual = expit(raw) - onehot
            else:
                pointwise = logsumexp(raw, axis=1) - (raw * onehot).sum(axis=1)
                residual = softmax(raw, axis=1) - onehot
            residual *= (weight / total)[:, None]
            value = float(weight @ pointwise) / total + 0.5 * l2 * float((weights**2).sum())
            grad = np.empty((n_rows, n_genes + 1), order="F")
            column_sum = residual.sum(axis=0)
            grad[:, :n_genes] = (shifted.T @ residual).T + np.outer(column_sum, zero) + l2 * weights
            grad[:, n_genes] = column_sum
            return value, grad.ravel(order="F")

        result = minimize(
            loss_gradient,
            np.zeros(n_rows * (n_genes + 1)),
            method="L-BFGS-B",
            jac=True,
            options={
                "maxiter": self.max_iter,
                "maxls": 50,
                "gtol": self.tol,
                "ftol": 64 * np.finfo(float).eps,
            },
        )
        if result.status != 0:
            msg = (
                f"baseline logistic regression did not converge after {result.nit} iterations "
                f"({result.message}); raise max_iter."
            )
            warnings.warn(msg, ConvergenceWarning, stacklevel=3)
        coef = result.x.reshape((n_rows, n_genes + 1), order="F")
        classifier = LogisticRegression(
            C=self.C, max_iter=self.max_iter, tol=self.tol, class_weight=self.class_weight
        )
        classifier.classes_ = classes
        classifier.coef_ = np.ascontiguousarray(coef[:, :n_genes])
        classifier.intercept_ = coef[:, n_genes].copy()
        classifier.n_features_in_ = n_genes
        classifier.n_iter_ = np.array([min(result.nit, self.max_iter)], dtype=np.int32)
        return classifier

    # ----------------------------------------------------------------------------- predicting

    def predict_proba(self, matrix: sparse.csr_matrix, genes: pd.Index) -> np.ndarray:
        """Class probabilities of each cell.

        Parameters
        ----------
        matrix
            ``(n_cells, n_query_genes)`` sparse log-normalised expression.
        genes
            Gene names of its columns. Columns are matched to the fitted genes by name: fitted
            genes absent from the query count as zero, extra query genes are ignored.

        Returns
        -------
        numpy.ndarray
            ``(n_cells, n_fitted_classes)``; columns follow ``classifier_.classes_`` (the label
            codes seen in :meth:`fit`, sorted).
        """
        shifted_model = copy.copy(self.classifier_)
        shifted_model.intercept_ = self.classifier_.intercept_ + self.classifier_.coef_ @ (
            self._zero_value
        )
        return self._per_chunk(matrix, genes, shifted_model.predict_proba)

    def latent(self, matrix: sparse.csr_matrix, genes: pd.Index) -> np.ndarray:
        """PCA representation of each cell's standardised expression.

        Parameters
        ----------
        matrix
            ``(n_cells, n_query_genes)`` sparse log-normalised expression.
        genes
            Gene names of its columns, aligned to the fitted genes as in :meth:`predict_proba`.

        Returns
        -------
        numpy.ndarray
            ``(n_cells, n_components_used)`` float32.
        """
        components = self.pca_.components_
        # in long double (numpy's own loop, not BLAS): a BLAS product's summation order depends
        # on the arrays' memory alignment, and a loaded model's arrays sit elsewhere than the
        # fitted one's, which flipped the float32 rounding of single latent values
        centre = (self.pca_.mean_ - self._zero_value).astype(np.longdouble)
        offset = (centre @ components.T.astype(np.longdouble)).astype(np.float64)
        return self._per_chunk(
            matrix, genes, lambda shifted: (shifted @ components.T - offset).astype(np.float32)
        )

    @property
    def n_parameters(self) -> int:
        """Coefficients plus intercepts of the logistic regression (the PCA is not counted)."""
        return int(self.classifier_.coef_.size + self.classifier_.intercept_.size)

    # ---------------------------------------------------------------------------------- state

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Everything needed to predict, as arrays (saved with safetensors, no pickle).

        Returns
        -------
        dict of str to numpy.ndarray
            ``mean``, ``scale``, ``max_value`` (one value; ``inf`` when not clipped), ``coef``,
            ``intercept``, ``classes`` (int64), ``pca_components`` and ``pca_mean``. The gene
            list ``genes_`` is not included; store it alongside for :meth:`from_state`.
        """
        return {
            "mean": self.mean_,
            "scale": self.scale_,
            "max_value": np.array([self._clip]),
            "coef": self.classifier_.coef_,
            "intercept": self.classifier_.intercept_,
            "classes": self.classifier_.classes_.astype(np.int64),
            "pca_components": self.pca_.components_,
            "pca_mean": self.pca_.mean_,
        }

    @classmethod
    def from_state(
        cls, arrays: dict[str, np.ndarray], genes: list[str]
    ) -> ExpressionLogisticBaseline:
        """Rebuild a fitted baseline from :meth:`state_arrays` and its gene list.

        A baseline saved before centring and clipping (arrays ``scale``, ``coef``,
        ``intercept``, ``classes``, ``svd_components``; no ``mean``) is rebuilt as it was: mean
        zero, no clipping and an uncentred projection, so it predicts exactly as before.

        Parameters
        ----------
        arrays
            The output of :meth:`state_arrays`.
        genes
            The fitted gene names (``genes_``), in column order.

        Returns
        -------
        ExpressionLogisticBaseline
            Ready for :meth:`predict_proba` and :meth:`latent`; ``max_value`` is restored, the
            other constructor arguments keep their defaults (they only matter for fitting).

        Raises
        ------
        ValueError
            An array's length does not match ``genes``.

        Examples
        --------
        >>> restored = ExpressionLogisticBaseline.from_state(
        ...     model.state_arrays(), model.genes_
        ... )  # doctest: +SKIP
        """
        # Lazy: these estimators take a fraction of a second to import; only this baseline uses them
        from sklearn.decomposition import PCA
        from sklearn.linear_model import LogisticRegression

        scale = np.asarray(arrays["scale"], dtype=np.float64)
        legacy = "mean" not in arrays
        clip = np.inf if legacy else float(np.asarray(arrays["max_value"]).ravel()[0])
        model = cls(max_value=None if np.isinf(clip) else clip)
        model.genes_ = [str(g) for g in genes]
        model.scale_ = scale
        model.mean_ = np.zeros_like(scale) if legacy else np.asarray(arrays["mean"], np.float64)
        components = np.asarray(arrays["svd_components" if legacy else "pca_components"])
        for name, length in (
            ("scale", len(model.scale_)),
            ("mean", len(model.mean_)),
            ("coef", arrays["coef"].shape[1]),
            ("components", components.shape[1]),
        ):
            if length != len(model.genes_):
                msg = (
                    f"saved baseline array {name!r} has {length} genes but the gene list has "
                    f"{len(model.genes_)}; the state and the genes come from different models."
                )
                raise ValueError(msg)
        clf = LogisticRegression()
        clf.coef_ = np.asarray(arrays["coef"])
        clf.intercept_ = np.asarray(arrays["intercept"])
        clf.classes_ = np.asarray(arrays["classes"])
        clf.n_features_in_ = clf.coef_.shape[1]
        model.classifier_ = clf
        pca = PCA(n_components=components.shape[0])
        pca.components_ = components
        pca.mean_ = (
            np.zeros(components.shape[1]) if legacy else np.asarray(arrays["pca_mean"], np.float64)
        )
        pca.n_features_in_ = components.shape[1]
        model.pca_ = pca
        return model
