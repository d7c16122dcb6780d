"""The plain baseline: logistic regression on log-normalised expression, no foundation model.

A fair comparison always shows one (SCGPT_NOTES.md section 5: L1/L2 logistic regression on
expression comes close to fine-tuned scGPT on several published benchmarks).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

from scdlkit._shared.validation import describe_values, get_matrix, iter_row_chunks

__all__ = ["ExpressionLogisticBaseline", "log_normalised_matrix"]

TARGET_SUM = 1e4


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


class ExpressionLogisticBaseline:
    """Standardised log-expression -> multinomial logistic regression; PCA of it as latent.

    Parameters
    ----------
    C
        Inverse L2 regularisation strength of :class:`sklearn.linear_model.LogisticRegression`.
    n_components
        Dimensions of the latent representation (truncated SVD of the scaled expression).
    max_iter
        Solver iterations.
    random_state
        Seeds the SVD.
    """

    def __init__(
        self, *, C: float = 1.0, n_components: int = 50, max_iter: int = 1000, random_state: int = 0
    ) -> None:
        self.C = C
        self.n_components = n_components
        self.max_iter = max_iter
        self.random_state = random_state
        self.genes_: list[str] = []

    def _align(self, matrix: sparse.csr_matrix, genes: pd.Index) -> sparse.csr_matrix:
        """Columns in the fitted gene order; genes absent from the query are zeros."""
        position = pd.Index(genes).get_indexer(self.genes_)
        present = np.flatnonzero(position >= 0)
        selector = sparse.csr_matrix(
            (np.ones(len(present), np.float32), (position[present], present)),
            shape=(matrix.shape[1], len(self.genes_)),
        )
        return sparse.csr_matrix(matrix @ selector)

    def _scaled(self, matrix: sparse.csr_matrix) -> sparse.csr_matrix:
        return sparse.csr_matrix(matrix @ sparse.diags(1.0 / self.scale_))

    def fit(
        self, matrix: sparse.csr_matrix, genes: pd.Index, labels: np.ndarray
    ) -> ExpressionLogisticBaseline:
        """Fit on log-normalised ``matrix`` (cells x ``genes``) with integer ``labels``.

        Each gene is divided by its standard deviation over these cells (not centred, so the
        matrix stays sparse; constant genes are left unscaled). The logistic regression and the
        truncated SVD (``min(n_components, n_cells - 1, n_genes - 1)`` components, at least 1)
        are both fitted on the scaled matrix.

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
            ``self``, with ``genes_``, ``scale_``, ``classifier_`` and ``svd_`` set.

        Examples
        --------
        >>> model = ExpressionLogisticBaseline().fit(
        ...     log_normalised_matrix(adata), adata.var_names, codes
        ... )  # doctest: +SKIP
        >>> proba = model.predict_proba(
        ...     log_normalised_matrix(query), query.var_names
        ... )  # doctest: +SKIP
        """
        # Lazy: these estimators take a fraction of a second to import; only this baseline uses them
        from sklearn.decomposition import TruncatedSVD
        from sklearn.linear_model import LogisticRegression

        self.genes_ = [str(g) for g in genes]
        dense_sq = matrix.multiply(matrix).mean(axis=0)
        mean = np.asarray(matrix.mean(axis=0)).ravel()
        std = np.sqrt(np.maximum(np.asarray(dense_sq).ravel() - mean**2, 0))
        self.scale_ = np.where(std > 0, std, 1.0).astype(np.float32)
        scaled = self._scaled(matrix)
        self.classifier_ = LogisticRegression(C=self.C, max_iter=self.max_iter)
        self.classifier_.fit(scaled, labels)
        n_comp = max(1, min(self.n_components, scaled.shape[0] - 1, scaled.shape[1] - 1))
        self.svd_ = TruncatedSVD(n_components=n_comp, random_state=self.random_state).fit(scaled)
        return self

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
        return self.classifier_.predict_proba(self._scaled(self._align(matrix, genes)))

    def latent(self, matrix: sparse.csr_matrix, genes: pd.Index) -> np.ndarray:
        """Truncated-SVD representation of each cell's scaled expression.

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
        return self.svd_.transform(self._scaled(self._align(matrix, genes))).astype(np.float32)

    @property
    def n_parameters(self) -> int:
        """Coefficients plus intercepts of the logistic regression (the SVD is not counted)."""
        return int(self.classifier_.coef_.size + self.classifier_.intercept_.size)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Everything needed to predict, as arrays (saved with safetensors, no pickle).

        Returns
        -------
        dict of str to numpy.ndarray
            ``scale``, ``coef``, ``intercept``, ``classes`` (int64) and ``svd_components``. The
            gene list ``genes_`` is not included; store it alongside for :meth:`from_state`.
        """
        return {
            "scale": self.scale_,
            "coef": self.classifier_.coef_,
            "intercept": self.classifier_.intercept_,
            "classes": self.classifier_.classes_.astype(np.int64),
            "svd_components": self.svd_.components_,
        }

    @classmethod
    def from_state(
        cls, arrays: dict[str, np.ndarray], genes: list[str]
    ) -> ExpressionLogisticBaseline:
        """Rebuild a fitted baseline from :meth:`state_arrays` and its gene list.

        Parameters
        ----------
        arrays
            The output of :meth:`state_arrays`.
        genes
            The fitted gene names (``genes_``), in column order.

        Returns
        -------
        ExpressionLogisticBaseline
            Ready for :meth:`predict_proba` and :meth:`latent`; ``C``, ``n_components``,
            ``max_iter`` and ``random_state`` keep their defaults (they are not saved).

        Examples
        --------
        >>> restored = ExpressionLogisticBaseline.from_state(
        ...     model.state_arrays(), model.genes_
        ... )  # doctest: +SKIP
        """
        # Lazy: these estimators take a fraction of a second to import; only this baseline uses them
        from sklearn.decomposition import TruncatedSVD
        from sklearn.linear_model import LogisticRegression

        model = cls()
        model.genes_ = list(genes)
        model.scale_ = np.asarray(arrays["scale"], dtype=np.float32)
        clf = LogisticRegression()
        clf.coef_ = np.asarray(arrays["coef"])
        clf.intercept_ = np.asarray(arrays["intercept"])
        clf.classes_ = np.asarray(arrays["classes"])
        model.classifier_ = clf
        svd = TruncatedSVD(n_components=arrays["svd_components"].shape[0])
        svd.components_ = np.asarray(arrays["svd_components"])
        model.svd_ = svd
        return model
