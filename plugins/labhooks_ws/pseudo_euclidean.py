"""Weak supervision for structured outputs through pseudo-Euclidean embeddings.

The labels are the k points of a finite metric space (tree nodes, rankings,
expressions). Source a outputs point l with probability

    P(lambda_a = l | Y = y) = exp(-theta_a d(l, y)^2) / Z_a(y),

so its errors land near the true label, and theta_a measures its quality.

Any finite metric space embeds isometrically in a pseudo-Euclidean space
R^(d+, d-): with G = -1/2 J D2 J (D2 the squared distances, J the centring matrix)
and G = V diag(lambda) V^T, the coordinates V sqrt(|lambda|) of the positive and of
the negative eigenvalues give two Euclidean parts, and
d(i, j)^2 = |x+_i - x+_j|^2 - |x-_i - x-_j|^2.

The aggregator fits theta in two steps. The tensor step treats each part separately:
the embedded votes of three source groups are three views of a mixture over the true
label, and theta is chosen so that the rank-k CP model of the part's empirical third
moment, whose factors are the model's per-class means E[x(lambda_a) | Y = y], matches
the data (a CP decomposition whose factors are constrained to the source model, so it
stays identifiable when a part has fewer than k dimensions). The refinement step then
maximises the likelihood of the source model (L-BFGS with the EM gradient), starting
from the tensor estimate.
The tensor estimate alone is noisy for very accurate sources: on a spider tree of 31
nodes with theta = (4, 0.5, 0.5) and n = 10,000 it put theta_1 between 2.65 and 8.14
over five seeds, and the refinement between 3.82 and 4.58.
"""

from __future__ import annotations

import copy as copy_module
import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from labhooks.aggregators import ABSTAIN, AggregatorConfig, MetricSpaceAggregator, TieBreak
from labhooks.config import option
from labhooks.errors import ConfigError

logger = logging.getLogger(__name__)

# Above this many points the embedding keeps only the leading eigenvectors (ARPACK).
_DENSE_EIGEN_LIMIT = 600
# Up to this many distinct distances, expectations over the label space are sums over level sets.
_MAX_LEVELS = 256


@dataclasses.dataclass
class PseudoEuclideanConfig(AggregatorConfig):
    max_dims: int = option(
        8, "largest number of embedding coordinates kept per part (positive, negative) in the tensor step", unit="coordinates"
    )
    refine: bool = option(True, "refine the tensor estimate of theta by maximising the likelihood of the source model")
    max_iter: int = option(200, "maximum L-BFGS iterations of the refinement", unit="iterations")
    estimate_class_balance: bool = option(
        False, "estimate the class balance in the refinement when none is given, instead of assuming uniform classes"
    )

    def validate(self) -> None:
        if self.max_dims < 1:
            raise ConfigError(f"invalid value {self.max_dims} for max_dims: must be >= 1")


@dataclass
class PseudoEuclideanEmbedding:
    """Coordinates of the k labels in the positive and the negative part, and their eigenvalues.

    ``truncated`` is True when only the leading coordinates were computed, so
    distances from the coordinates are approximate.
    """

    positive: np.ndarray
    negative: np.ndarray
    positive_eigenvalues: np.ndarray
    negative_eigenvalues: np.ndarray
    truncated: bool

    @classmethod
    def from_distances(cls, distances: np.ndarray, max_dims: int | None = None, tolerance: float = 1e-9) -> PseudoEuclideanEmbedding:
        """Embed a distance matrix; with ``max_dims``, keep at most that many coordinates per part."""
        points = distances.shape[0]
        squared = distances**2
        # Double centring J D2 J written out, so it costs O(k^2) instead of two k x k products.
        row_means = squared.mean(axis=1, keepdims=True)
        gram = -0.5 * (squared - row_means - row_means.T + squared.mean())
        truncated = max_dims is not None and points > _DENSE_EIGEN_LIMIT
        if truncated:
            from scipy.sparse.linalg import eigsh

            assert max_dims is not None
            # Half of the eigenpairs from each end of the spectrum, in one Lanczos run.
            values, vectors = eigsh(gram, k=min(2 * max_dims, points - 1), which="BE")
        else:
            values, vectors = np.linalg.eigh(gram)
        cutoff = tolerance * max(float(np.abs(values).max()), 1e-300)
        positive = values > cutoff
        negative = values < -cutoff
        positive_order = np.argsort(-values[positive])
        negative_order = np.argsort(values[negative])
        if max_dims is not None:
            positive_order = positive_order[:max_dims]
            negative_order = negative_order[:max_dims]
        positive_values = values[positive][positive_order]
        negative_values = values[negative][negative_order]
        return cls(
            positive=vectors[:, positive][:, positive_order] * np.sqrt(positive_values),
            negative=vectors[:, negative][:, negative_order] * np.sqrt(-negative_values),
            positive_eigenvalues=positive_values,
            negative_eigenvalues=negative_values,
            truncated=truncated or len(positive_values) < int(positive.sum()) or len(negative_values) < int(negative.sum()),
        )

    def squared_distance(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """Return the pseudo-Euclidean squared distance between rows of two (points, d+ + d-) coordinate arrays."""
        split = self.positive.shape[1]
        positive = ((first[..., :split] - second[..., :split]) ** 2).sum(axis=-1)
        negative = ((first[..., split:] - second[..., split:]) ** 2).sum(axis=-1)
        return positive - negative

    @property
    def coordinates(self) -> np.ndarray:
        """All coordinates, positive part first, shape (k, d+ + d-)."""
        return np.concatenate([self.positive, self.negative], axis=1)


def _third_moment(first: np.ndarray, second: np.ndarray, third: np.ndarray) -> np.ndarray:
    """Return sum_n first[n] (x) second[n] (x) third[n].

    Plain ``einsum`` (no BLAS call): the operands are small, and a threaded BLAS on a
    busy machine spent up to 100 times longer on these products in measurements.
    """
    return np.einsum("ni,nj,nk->ijk", first, second, third)


class _LabelSpace:
    """Expectations over the label space under the source model, for one theta at a time.

    The source model only depends on d(l, y)^2. When the metric has few distinct
    distances (trees, edit distances), sums over l become sums over the level sets of
    d(., y)^2, which costs O(levels * k) per theta instead of O(k^2).
    """

    def __init__(self, distances: np.ndarray) -> None:
        self.squared = distances**2
        points = self.squared.shape[0]
        if np.array_equal(self.squared, np.round(self.squared)) and self.squared.max() < 1e6:
            # Integer squared distances (graph and edit metrics): a lookup table is much faster than np.unique.
            present = np.bincount(self.squared.astype(np.int64).ravel())
            levels = np.flatnonzero(present).astype(np.float64)
            lookup = np.zeros(present.shape[0], dtype=np.int64)
            lookup[levels.astype(np.int64)] = np.arange(len(levels))
            inverse = lookup[self.squared.astype(np.int64)]
        else:
            levels, inverse = np.unique(self.squared, return_inverse=True)
        self.uses_levels = len(levels) <= _MAX_LEVELS
        if self.uses_levels:
            self.levels = levels
            # keys[l, y] = level of d(l, y)^2 * k + y, so a bincount over keys sums per (level, y).
            self.keys = (inverse.reshape(self.squared.shape) * points + np.arange(points)[None, :]).ravel()
            # counts[v, y]: how many labels l have d(l, y)^2 == levels[v].
            self.counts = np.bincount(self.keys, minlength=len(levels) * points).reshape(len(levels), points).astype(np.float64)
        positive = self.squared[self.squared > 0]
        self.scale = float(positive.min()) if positive.size else 1.0

    def _level_weights(self, theta: float) -> np.ndarray:
        return np.exp(-theta * (self.levels - self.levels[0]))

    def log_partition(self, theta: float) -> np.ndarray:
        """Return log Z(y) = log sum_l exp(-theta d(l, y)^2) for every y."""
        if self.uses_levels:
            return np.log(self._level_weights(theta) @ self.counts) - theta * self.levels[0]
        logits = -theta * self.squared
        peak = logits.max(axis=0)
        return np.log(np.exp(logits - peak).sum(axis=0)) + peak

    def expected_squared(self, theta: float) -> np.ndarray:
        """Return E[d(lambda, y)^2 | Y = y] under theta for every y."""
        if self.uses_levels:
            weights = self._level_weights(theta)
            return ((weights * self.levels) @ self.counts) / (weights @ self.counts)
        logits = -theta * self.squared
        weights = np.exp(logits - logits.max(axis=0))
        return (weights * self.squared).sum(axis=0) / weights.sum(axis=0)

    def level_sums(self, coordinates: np.ndarray) -> np.ndarray | None:
        """Return sums[v, y, :] = sum of the coordinates of the labels l with d(l, y)^2 == levels[v]."""
        if not self.uses_levels:
            return None
        points = self.squared.shape[0]
        size = len(self.levels) * points
        columns = [
            np.bincount(self.keys, weights=np.repeat(coordinates[:, dim], points), minlength=size) for dim in range(coordinates.shape[1])
        ]
        return np.stack(columns, axis=-1).reshape(len(self.levels), points, coordinates.shape[1])

    def conditional_means(self, theta: float, coordinates: np.ndarray, sums: np.ndarray | None) -> np.ndarray:
        """Return E[x(lambda) | Y = y] under theta, shape (k, d), for label coordinates x."""
        if sums is not None:
            weights = self._level_weights(theta)
            return np.einsum("v,vyd->yd", weights, sums) / (weights @ self.counts)[:, None]
        logits = -theta * self.squared
        weights = np.exp(logits - logits.max(axis=0))
        weights /= weights.sum(axis=0)
        return weights.T @ coordinates


class PseudoEuclidean(MetricSpaceAggregator):
    """Pseudo-Euclidean embedding + tensor method for labels in a finite metric space.

    Construct it with the distance matrix: ``PseudoEuclidean(distances)``. The fitted
    ``thetas`` are the sources' qualities in the model of the module docstring; the
    accuracies are P(lambda_a = Y) = sum_y P(y) / Z_a(y). The class balance is the one
    given, or uniform unless ``estimate_class_balance`` is set.

    ``predict_proba`` is the posterior of the source model. ``predict`` snaps the
    theta-weighted mean of the embedded votes to the nearest label. In a
    pseudo-Euclidean space the squared distance from that mean to label y equals
    sum_a theta_a d(lambda_a, y)^2 / sum_a theta_a minus a term that does not depend
    on y. So ``predict`` minimises sum_a theta_a d(lambda_a, y)^2 with the distance
    matrix directly, which is exact even when the embedding is truncated. The two differ when
    Z_a(y) varies with y, for example near the leaves of a tree. Needs three sources.
    """

    name = "pse"
    summary = "pseudo-Euclidean embedding + tensor method for structured labels (needs distances=D.npy)"
    plugin = "ws"
    config_class = PseudoEuclideanConfig
    min_sources = 3

    def __init__(self, distances: ArrayLike, **options: object) -> None:
        super().__init__(distances, **options)
        self.embedding: PseudoEuclideanEmbedding | None = None
        self.tensor_thetas: np.ndarray | None = None

    def _fit(self, matrix: np.ndarray, cardinality: int, class_balance: np.ndarray | None) -> None:
        space = _LabelSpace(self.distances)
        given_balance = class_balance is not None
        self.class_balance = class_balance if class_balance is not None else np.full(cardinality, 1.0 / cardinality)
        self.embedding = PseudoEuclideanEmbedding.from_distances(self.distances, self.options.max_dims)

        # Both steps only need each distinct row of votes once, with its count.
        rows, counts = np.unique(matrix, axis=0, return_counts=True)
        counts = counts.astype(np.float64)
        self.tensor_thetas = self._fit_tensor(rows, counts, space)
        self._thetas = self.tensor_thetas.copy()
        logger.info("pse: tensor step gives theta %s", np.round(self._thetas, 3).tolist())
        if self.options.refine:
            self._refine(rows, counts, space, estimate_balance=self.options.estimate_class_balance and not given_balance)
            logger.info("pse: likelihood refinement gives theta %s", np.round(self._thetas, 3).tolist())
        self._log_partitions = np.stack([space.log_partition(theta) for theta in self._thetas])

    def _theta_bounds(self, space: _LabelSpace) -> tuple[float, float]:
        # theta * d^2 is what matters, so the bounds scale with the smallest squared distance.
        return 1e-4 / space.scale, 50.0 / space.scale

    def _fit_tensor(self, rows: np.ndarray, counts: np.ndarray, space: _LabelSpace) -> np.ndarray:
        from scipy.optimize import minimize

        from labhooks_ws.votes import snake_groups

        assert self.embedding is not None and self.class_balance is not None
        distinct, sources = rows.shape
        total = float(counts.sum())
        voted = rows != ABSTAIN
        coverage = counts @ voted / total
        groups = snake_groups(np.argsort(-coverage, kind="stable"))

        parts = []
        for coordinates in (self.embedding.positive, self.embedding.negative):
            if coordinates.shape[1] == 0:
                continue
            # Standardised coordinates weigh every direction of the part equally in the fit.
            spread = coordinates.std(axis=0)
            coordinates = (coordinates - coordinates.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
            views = []
            for group in groups:
                columns = []
                for source in group:
                    augmented = np.zeros((distinct, coordinates.shape[1] + 1))
                    present = voted[:, source]
                    augmented[present, :-1] = coordinates[rows[present, source]]
                    augmented[present, -1] = 1.0
                    columns.append(augmented)
                views.append(np.concatenate(columns, axis=1))
            moment = _third_moment(views[0] * (counts / total)[:, None], views[1], views[2])
            parts.append((coordinates, space.level_sums(coordinates), moment, float((moment**2).sum())))

        low, high = self._theta_bounds(space)
        balance = self.class_balance

        def model_moment(thetas: np.ndarray, coordinates: np.ndarray, sums: np.ndarray | None) -> np.ndarray:
            factors = []
            for group in groups:
                blocks = []
                for source in group:
                    means = space.conditional_means(float(thetas[source]), coordinates, sums)
                    blocks.append(coverage[source] * np.concatenate([means, np.ones((means.shape[0], 1))], axis=1).T)
                factors.append(np.concatenate(blocks, axis=0))
            return _third_moment((factors[0] * balance).T, factors[1].T, factors[2].T)

        def loss(log_thetas: np.ndarray) -> float:
            thetas = np.exp(log_thetas)
            return sum(
                float(((moment - model_moment(thetas, coordinates, sums)) ** 2).sum()) / norm for coordinates, sums, moment, norm in parts
            )

        best = None
        for start in (0.5, 1.0, 2.0, 4.0):
            initial = np.full(sources, np.log(np.clip(start / space.scale, low, high)))
            result = minimize(loss, initial, method="L-BFGS-B", bounds=[(np.log(low), np.log(high))] * sources)
            if best is None or result.fun < best.fun:
                best = result
        assert best is not None
        return np.exp(best.x)

    def _log_joint(self, matrix: np.ndarray, thetas: np.ndarray, log_partitions: np.ndarray, balance: np.ndarray) -> np.ndarray:
        squared = self.distances**2
        scores = np.tile(np.log(balance), (matrix.shape[0], 1))
        for source, column in enumerate(matrix.T):
            rows = np.flatnonzero(column != ABSTAIN)
            scores[rows] -= thetas[source] * squared[column[rows]] + log_partitions[source]
        return scores

    def _refine(self, rows: np.ndarray, counts: np.ndarray, space: _LabelSpace, estimate_balance: bool) -> None:
        """Maximise the likelihood of the source model over log theta (and the class balance logits).

        The gradient comes from the posterior, as in EM (Fisher's identity):
        d log L / d theta_a = sum_i sum_y q_iy (E_theta_a[d^2 | y] - d(lambda_ia, y)^2).
        """
        from scipy.optimize import minimize

        assert self.class_balance is not None
        sources = rows.shape[1]
        points = self.distances.shape[0]
        total = float(counts.sum())
        low, high = self._theta_bounds(space)
        squared = self.distances**2
        voting = [np.flatnonzero(column != ABSTAIN) for column in rows.T]
        gathered = [squared[rows[voting[source], source]] for source in range(sources)]
        fixed_balance = self.class_balance

        def unpack(parameters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            thetas = np.exp(parameters[:sources])
            if not estimate_balance:
                return thetas, fixed_balance
            logits = parameters[sources:] - parameters[sources:].max()
            balance = np.exp(logits)
            return thetas, balance / balance.sum()

        def objective(parameters: np.ndarray) -> tuple[float, np.ndarray]:
            thetas, balance = unpack(parameters)
            scores = np.tile(np.log(balance), (rows.shape[0], 1))
            expected = []
            for source in range(sources):
                scores[voting[source]] -= thetas[source] * gathered[source] + space.log_partition(thetas[source])
                expected.append(space.expected_squared(thetas[source]))
            peak = scores.max(axis=1, keepdims=True)
            weights = np.exp(scores - peak)
            evidence = weights.sum(axis=1, keepdims=True)
            posterior = weights / evidence * counts[:, None]
            log_likelihood = float(counts @ (np.log(evidence[:, 0]) + peak[:, 0])) / total

            gradient = np.zeros_like(parameters)
            for source in range(sources):
                selected = posterior[voting[source]]
                slope = float((selected * (expected[source][None, :] - gathered[source])).sum()) / total
                gradient[source] = -slope * thetas[source]
            if estimate_balance:
                gradient[sources:] = -(posterior.sum(axis=0) - total * balance) / total
            return -log_likelihood, gradient

        start = np.log(np.clip(self._thetas, low, high))
        bounds = [(np.log(low), np.log(high))] * sources
        if estimate_balance:
            start = np.concatenate([start, np.log(self.class_balance)])
            bounds += [(None, None)] * points
        result = minimize(objective, start, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": self.options.max_iter})
        if not result.success:
            logger.info("pse: the likelihood refinement stopped early: %s", result.message)
        self._thetas, self.class_balance = unpack(result.x)

    @property
    def thetas(self) -> np.ndarray:
        """Fitted source qualities theta_a of P(lambda_a = l | y) proportional to exp(-theta_a d(l, y)^2)."""
        self._check_fitted()
        return self._thetas

    def with_thetas(self, thetas: ArrayLike) -> PseudoEuclidean:
        """Return a fitted copy that uses other source qualities, for example ``tensor_thetas``.

        The class balance, coverage and distances are shared with this model.
        """
        self._check_fitted()
        values = np.asarray(thetas, dtype=np.float64)
        if values.shape != self._thetas.shape or (values <= 0).any():
            raise ConfigError(f"thetas must be {self._thetas.shape[0]} positive values, got {values.tolist()}")
        copy = copy_module.copy(self)
        space = _LabelSpace(self.distances)
        copy._thetas = values
        copy._log_partitions = np.stack([space.log_partition(theta) for theta in values])
        return copy

    def _predict_proba(self, matrix: np.ndarray) -> np.ndarray:
        assert self.class_balance is not None
        scores = self._log_joint(matrix, self._thetas, self._log_partitions, self.class_balance)
        scores -= scores.max(axis=1, keepdims=True)
        probabilities = np.exp(scores)
        return probabilities / probabilities.sum(axis=1, keepdims=True)

    def predict(self, label_matrix: ArrayLike, tie_break: TieBreak = "random") -> np.ndarray:
        """Return the label nearest to the theta-weighted mean of the embedded votes (see the class docstring).

        Rows without votes get the most probable class of the class balance. Ties are
        broken as in :meth:`Aggregator.predict`.
        """
        if tie_break not in ("random", "abstain"):
            raise ConfigError(f"invalid tie_break {tie_break!r}: choose 'random' or 'abstain'")
        self._check_fitted()
        from labhooks.aggregators import validate_label_matrix

        assert self.class_balance is not None
        matrix = validate_label_matrix(
            label_matrix, self.cardinality, num_sources=self.num_sources, allow_all_abstain=True, method=self.name
        )
        squared = self.distances**2
        cost = np.zeros((matrix.shape[0], self.distances.shape[0]))
        for source, column in enumerate(matrix.T):
            rows = np.flatnonzero(column != ABSTAIN)
            cost[rows] += self._thetas[source] * squared[column[rows]]
        silent = (matrix == ABSTAIN).all(axis=1)
        cost[silent] = -np.log(self.class_balance)
        return self._break_ties(-cost, tie_break)

    def _accuracies(self) -> np.ndarray:
        assert self.class_balance is not None
        return np.exp(-self._log_partitions) @ self.class_balance

    def _state(self) -> dict[str, np.ndarray]:
        assert self.tensor_thetas is not None
        return {"thetas": self._thetas, "tensor_thetas": self.tensor_thetas, "log_partitions": self._log_partitions}

    def _restore(self, state: dict[str, np.ndarray]) -> None:
        assert self.num_sources is not None and self.cardinality is not None
        self._thetas = self._restored(state, "thetas", (self.num_sources,))
        self.tensor_thetas = self._restored(state, "tensor_thetas", (self.num_sources,))
        self._log_partitions = self._restored(state, "log_partitions", (self.num_sources, self.cardinality))
