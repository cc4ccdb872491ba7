"""The aggregator contract: label models that combine noisy sources without ground truth.

A label matrix ``L`` has one row per example and one column per source (a labeling
function, a prompt template, a model). ``L[i, j]`` is the label that source ``j`` gives
example ``i``: an integer in ``0 .. cardinality - 1``, or ``-1`` (:data:`ABSTAIN`) when
the source abstains. This is Snorkel's convention.

An :class:`Aggregator` fits on a label matrix, estimates each source's accuracy, and
returns posterior class probabilities and hard labels. Plugins contribute aggregators
through the ``labhooks_aggregators`` hook; the registry finds them by their ``name``.
Fitted parameters are saved as named tensors in a bundle (no interventions) and loaded
back with :meth:`Aggregator.load`.

A :class:`MetricSpaceAggregator` works on structured outputs (trees, rankings,
expressions): its labels index the points of a finite metric space given by a distance
matrix.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from numpy.typing import ArrayLike

from labhooks.bundles import Bundle, load_bundle, save_bundle
from labhooks.config import build_config, config_to_dict, option
from labhooks.errors import BundleError, ConfigError, LabhooksError, PluginError

logger = logging.getLogger(__name__)

ABSTAIN = -1
"""The label value that means "this source gives no label for this example"."""

TieBreak = Literal["random", "abstain"]


class LabelMatrixError(LabhooksError, ValueError):
    """A label matrix, class balance or distance matrix is invalid for the aggregator."""


class NotFittedError(LabhooksError, RuntimeError):
    """An aggregator was used before :meth:`Aggregator.fit` was called."""


@dataclasses.dataclass
class AggregatorConfig:
    """Options every aggregator has. Subclasses extend it with their own fields."""

    seed: int = option(0, "random seed for initialisation and for breaking ties between equally probable classes")


def _where(matrix: np.ndarray, mask: np.ndarray) -> str:
    row, column = (int(index) for index in np.argwhere(mask)[0])
    count = int(mask.sum())
    others = f" (and {count - 1} more entries)" if count > 1 else ""
    return f"at row {row}, column {column}{others}"


def validate_label_matrix(
    label_matrix: ArrayLike,
    cardinality: int | None = None,
    *,
    min_sources: int = 1,
    num_sources: int | None = None,
    allow_all_abstain: bool = False,
    method: str | None = None,
) -> np.ndarray:
    """Check a label matrix and return it as an integer array of shape ``(n, m)``.

    Raises :class:`LabelMatrixError` when the matrix is not 2-D or is empty, contains
    non-integer values or labels outside ``-1 .. cardinality - 1``, contains only abstains
    (unless ``allow_all_abstain``), has fewer than ``min_sources`` columns, or has a
    column count other than ``num_sources`` (the count an aggregator was fitted on).
    """
    who = f"method {method!r}" if method else "the aggregator"
    try:
        matrix = np.asarray(label_matrix)
    except (TypeError, ValueError) as error:
        raise LabelMatrixError(
            f"the label matrix cannot be read as an array ({error}); give an (n examples x m sources) array of integers"
        ) from None
    if matrix.ndim != 2:
        hint = "; for a single source use L.reshape(-1, 1)" if matrix.ndim == 1 else ""
        raise LabelMatrixError(f"the label matrix must be 2-D (n examples x m sources), got shape {tuple(matrix.shape)}{hint}")
    if matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise LabelMatrixError(f"the label matrix is empty (shape {tuple(matrix.shape)}); it needs at least one example and one source")

    if matrix.dtype == np.bool_:
        matrix = matrix.astype(np.int64)
    elif np.issubdtype(matrix.dtype, np.floating):
        finite = np.isfinite(matrix)
        if not finite.all():
            raise LabelMatrixError(
                f"the label matrix contains {matrix[~finite][0]} {_where(matrix, ~finite)}; labels are integers and -1 means abstain"
            )
        fractional = matrix != np.round(matrix)
        if fractional.any():
            raise LabelMatrixError(
                f"the label matrix contains the non-integer value {matrix[fractional][0]} {_where(matrix, fractional)}; labels are integers and -1 means abstain"
            )
        matrix = matrix.astype(np.int64)
    elif not np.issubdtype(matrix.dtype, np.integer):
        raise LabelMatrixError(
            f"the label matrix must contain integers, got dtype {matrix.dtype}; labels are 0 .. cardinality - 1 and -1 means abstain"
        )

    if num_sources is not None and matrix.shape[1] != num_sources:
        raise LabelMatrixError(
            f"{who} was fitted on {num_sources} sources, but the label matrix has {matrix.shape[1]} columns; give the same sources in the same order"
        )
    if matrix.shape[1] < min_sources:
        raise LabelMatrixError(
            f"{who} needs at least {min_sources} sources (columns), but the label matrix has {matrix.shape[1]}; add sources or use method=majority_vote"
        )

    # Two reductions cover every range check; the masks that locate a bad entry are only built on failure.
    lowest = int(matrix.min())
    highest = int(matrix.max())
    if lowest < ABSTAIN:
        below = matrix < ABSTAIN
        raise LabelMatrixError(
            f"the label matrix contains the label {matrix[below][0]} {_where(matrix, below)}; labels are 0 or more and -1 means abstain"
        )
    if cardinality is not None:
        if cardinality < 2:
            raise LabelMatrixError(f"cardinality must be at least 2, got {cardinality}")
        if highest >= cardinality:
            above = matrix >= cardinality
            raise LabelMatrixError(
                f"the label {matrix[above][0]} {_where(matrix, above)} is out of range for cardinality {cardinality} "
                f"(labels 0 .. {cardinality - 1}, -1 = abstain); pass cardinality={highest + 1} or fix the matrix"
            )
    if not allow_all_abstain and highest == ABSTAIN:
        raise LabelMatrixError("every entry of the label matrix is -1 (abstain); at least one source must give a label")
    return matrix


def infer_cardinality(matrix: np.ndarray) -> int:
    """Return the number of classes a validated label matrix implies: its largest label + 1, at least 2."""
    return max(2, int(matrix.max()) + 1)


def validate_class_balance(class_balance: ArrayLike | None, cardinality: int) -> np.ndarray | None:
    """Check a class balance (one probability per class) and return it normalised to sum to 1.

    Raises :class:`LabelMatrixError` for a wrong length, a value that is not positive,
    or a sum further than 0.001 from 1.
    """
    if class_balance is None:
        return None
    balance = np.asarray(class_balance, dtype=np.float64).reshape(-1)
    if balance.shape[0] != cardinality:
        raise LabelMatrixError(
            f"class_balance has {balance.shape[0]} entries but the cardinality is {cardinality}; give one proportion per class"
        )
    if not np.isfinite(balance).all() or (balance <= 0).any():
        raise LabelMatrixError(f"class_balance {balance.tolist()} must contain only positive proportions")
    total = float(balance.sum())
    if abs(total - 1.0) > 1e-3:
        raise LabelMatrixError(f"class_balance {balance.tolist()} sums to {total:.4g}; give class proportions that sum to 1")
    return balance / total


def validate_distance_matrix(distances: ArrayLike) -> np.ndarray:
    """Check a distance matrix of a finite metric space and return it as float64.

    The matrix must be square, finite, non-negative and symmetric, with zeros on the
    diagonal and at least two points. The triangle inequality is not checked (that
    costs cubic time); the pseudo-Euclidean embedding accepts any symmetric dissimilarity.
    """
    try:
        matrix = np.asarray(distances, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise LabelMatrixError(f"the distance matrix cannot be read as numbers ({error})") from None
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 2:
        raise LabelMatrixError(f"the distance matrix must be square with at least 2 points, got shape {tuple(matrix.shape)}")
    if not np.isfinite(matrix).all():
        raise LabelMatrixError("the distance matrix contains NaN or infinite values")
    if (matrix < 0).any():
        raise LabelMatrixError(f"the distance matrix contains the negative value {matrix[matrix < 0][0]}; distances are non-negative")
    scale = max(float(matrix.max()), 1.0)
    if not np.allclose(matrix, matrix.T, atol=1e-9 * scale):
        raise LabelMatrixError("the distance matrix is not symmetric; give d(i, j) = d(j, i)")
    if np.abs(np.diag(matrix)).max() > 1e-9 * scale:
        raise LabelMatrixError("the distance matrix has non-zero entries on its diagonal; d(i, i) must be 0")
    return matrix


class Aggregator(ABC):
    """A label model: estimates source accuracies from a label matrix and combines the votes.

    Subclasses set ``name`` (the registry name), ``summary`` (one line for help text),
    ``config_class`` (a dataclass extending :class:`AggregatorConfig`, whose fields are
    the constructor's keyword options) and ``min_sources``, and implement ``_fit``,
    ``_predict_proba``, ``_accuracies``, ``_state`` and ``_restore``.

    Options are given as keyword arguments, as values or as strings (the CLI passes
    strings): ``FlyingSquid(seed=3)`` and ``FlyingSquid(seed="3")`` are the same.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    plugin: ClassVar[str | None] = None
    config_class: ClassVar[type[AggregatorConfig]] = AggregatorConfig
    min_sources: ClassVar[int] = 1

    def __init__(self, **options: Any) -> None:
        self.options = build_config(self.config_class, options)
        self.cardinality: int | None = None
        self.num_sources: int | None = None
        self.class_balance: np.ndarray | None = None
        self.coverage: np.ndarray | None = None

    def __repr__(self) -> str:
        fitted = f"cardinality={self.cardinality}, sources={self.num_sources}" if self.is_fitted else "not fitted"
        return f"{type(self).__name__}({fitted})"

    @property
    def is_fitted(self) -> bool:
        return self.cardinality is not None

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"the {self.name or type(self).__name__} label model is not fitted; call fit(label_matrix) first")

    def fit(self, label_matrix: ArrayLike, cardinality: int | None = None, class_balance: ArrayLike | None = None) -> Aggregator:
        """Estimate the label model's parameters from a label matrix and return ``self``.

        ``cardinality`` defaults to the largest label + 1 (at least 2). ``class_balance``
        (one proportion per class) is used as given; without it, each aggregator
        estimates it or assumes uniform classes, as its class documentation states.
        """
        matrix = validate_label_matrix(label_matrix, cardinality, min_sources=self.min_sources, method=self.name)
        resolved = cardinality if cardinality is not None else infer_cardinality(matrix)
        balance = validate_class_balance(class_balance, resolved)

        self.cardinality = resolved
        self.num_sources = matrix.shape[1]
        self.coverage = None
        try:
            self._fit(matrix, resolved, balance)
        except BaseException:
            self.cardinality = None
            raise
        if self.coverage is None:
            self.coverage = np.count_nonzero(matrix != ABSTAIN, axis=0) / matrix.shape[0]
        silent = np.flatnonzero(self.coverage == 0)
        if silent.size:
            logger.warning("%s: sources %s abstain on every example; their accuracy is reported as NaN", self.name, silent.tolist())
        return self

    def predict_proba(self, label_matrix: ArrayLike) -> np.ndarray:
        """Return the posterior class probabilities, shape ``(n, cardinality)``, rows summing to 1."""
        self._check_fitted()
        matrix = validate_label_matrix(
            label_matrix, self.cardinality, num_sources=self.num_sources, allow_all_abstain=True, method=self.name
        )
        return self._predict_proba(matrix)

    def predict(self, label_matrix: ArrayLike, tie_break: TieBreak = "random") -> np.ndarray:
        """Return one label per example: the most probable class of :meth:`predict_proba`.

        Classes whose probabilities are equal within 1e-9 are ties. ``tie_break="random"``
        picks one of them uniformly with a generator seeded by the ``seed`` option, so
        the same call returns the same labels. ``"abstain"`` returns -1 for tied rows.
        """
        if tie_break not in ("random", "abstain"):
            raise ConfigError(f"invalid tie_break {tie_break!r}: choose 'random' or 'abstain'")
        return self._break_ties(self.predict_proba(label_matrix), tie_break)

    def _break_ties(self, proba: np.ndarray, tie_break: TieBreak) -> np.ndarray:
        labels = proba.argmax(axis=1)
        tied = proba >= proba.max(axis=1, keepdims=True) - 1e-9
        tied_rows = np.flatnonzero(tied.sum(axis=1) > 1)
        if tied_rows.size == 0:
            return labels
        if tie_break == "abstain":
            labels[tied_rows] = ABSTAIN
            return labels
        generator = np.random.default_rng(self.options.seed)
        draws = generator.random((tied_rows.size, proba.shape[1])) * tied[tied_rows]
        labels[tied_rows] = draws.argmax(axis=1)
        return labels

    @property
    def accuracies(self) -> np.ndarray:
        """Estimated accuracy of each source, shape ``(m,)``: P(source label = true label | the source votes).

        NaN for a source that abstained on every example of the fitting data.
        """
        self._check_fitted()
        assert self.coverage is not None
        estimated = np.asarray(self._accuracies(), dtype=np.float64).copy()
        estimated[self.coverage == 0] = np.nan
        return estimated

    def config(self) -> dict[str, Any]:
        """Return the JSON-ready description saved in a bundle manifest: options and fitted shape."""
        self._check_fitted()
        return {"options": config_to_dict(self.options), "cardinality": self.cardinality, "num_sources": self.num_sources}

    def state(self) -> dict[str, np.ndarray]:
        """Return the fitted parameters as named arrays, the tensors a bundle stores."""
        self._check_fitted()
        assert self.class_balance is not None and self.coverage is not None
        arrays = {"class_balance": self.class_balance, "coverage": self.coverage}
        arrays.update(self._state())
        return {key: np.asarray(value) for key, value in arrays.items()}

    @classmethod
    def _new(cls, options: dict[str, Any], state: dict[str, np.ndarray]) -> Aggregator:
        return cls(**options)

    def _restored(self, state: dict[str, np.ndarray], key: str, shape: tuple[int, ...]) -> np.ndarray:
        """Return ``state[key]`` as float64, raising :class:`BundleError` unless it has ``shape``."""
        value = np.asarray(state[key], dtype=np.float64)
        if value.shape != shape:
            raise BundleError(f"the saved {self.name} label model has {key} of shape {list(value.shape)}, expected {list(shape)}")
        return value

    @classmethod
    def from_state(cls, config: dict[str, Any], state: dict[str, np.ndarray]) -> Aggregator:
        """Rebuild a fitted aggregator from :meth:`config` and :meth:`state`.

        Raises :class:`BundleError` when a key is missing or a shape does not match.
        """
        missing = [key for key in ("options", "cardinality", "num_sources") if key not in config]
        missing += [key for key in ("class_balance", "coverage") if key not in state]
        if missing:
            raise BundleError(f"the saved {cls.name} label model is missing {', '.join(missing)}")
        try:
            instance = cls._new(dict(config["options"]), state)
        except ConfigError as error:
            raise BundleError(f"the saved options of the {cls.name} label model are invalid in this version: {error}") from None
        instance.cardinality = int(config["cardinality"])
        instance.num_sources = int(config["num_sources"])
        instance.class_balance = np.asarray(state["class_balance"], dtype=np.float64)
        instance.coverage = np.asarray(state["coverage"], dtype=np.float64)
        if instance.class_balance.shape != (instance.cardinality,) or instance.coverage.shape != (instance.num_sources,):
            raise BundleError(
                f"the saved {cls.name} label model has class_balance {list(instance.class_balance.shape)} and coverage "
                f"{list(instance.coverage.shape)}, expected [{instance.cardinality}] and [{instance.num_sources}]"
            )
        try:
            instance._restore(state)
        except KeyError as error:
            raise BundleError(f"the saved {cls.name} label model is missing the tensor {error}") from None
        return instance

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> Aggregator:
        """Rebuild a fitted aggregator from a loaded bundle.

        Called on :class:`Aggregator` itself, the bundle's method name picks the class
        from the plugin registry; called on a subclass, the name must match it.
        """
        where = bundle.path or "bundle"
        if bundle.interventions:
            raise BundleError(f"{where} contains interventions, not a label model; load it with labhooks.load_bundle")
        method = bundle.method
        if not method:
            raise BundleError(f"{where} names no label model (its manifest has no method name)")
        if cls.name:
            if method != cls.name:
                raise BundleError(f"{where} contains the label model {method!r}, not {cls.name!r}; load it with Aggregator.load")
            target: type[Aggregator] = cls
        else:
            from labhooks.plugins import get_registry

            try:
                target = get_registry().aggregator(method)
            except PluginError as error:
                raise BundleError(f"{where}: {error}") from None
        state = {key: tensor.numpy() for key, tensor in bundle.tensors.items()}
        return target.from_state(bundle.config, state)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the fitted label model to a bundle (named tensors, no interventions)."""
        self._check_fitted()
        tensors = {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in self.state().items()}
        return save_bundle(path, tensors=tensors, plugin=self.plugin, method=self.name, config=self.config())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Aggregator:
        """Load a label model saved with :meth:`save`; see :meth:`from_bundle`."""
        return cls.from_bundle(load_bundle(path))

    @abstractmethod
    def _fit(self, matrix: np.ndarray, cardinality: int, class_balance: np.ndarray | None) -> None:
        """Estimate the parameters and set ``self.class_balance`` (given or estimated).

        May also set ``self.coverage`` (the fraction of examples each source labels) when
        it falls out of the fit; otherwise :meth:`fit` computes it afterwards.
        """

    @abstractmethod
    def _predict_proba(self, matrix: np.ndarray) -> np.ndarray:
        """Return posteriors for a validated matrix."""

    @abstractmethod
    def _accuracies(self) -> np.ndarray:
        """Return the estimated accuracy of each source."""

    @abstractmethod
    def _state(self) -> dict[str, np.ndarray]:
        """Return the subclass's fitted parameters."""

    @abstractmethod
    def _restore(self, state: dict[str, np.ndarray]) -> None:
        """Set the subclass's fitted parameters from :meth:`_state`'s arrays."""


class MetricSpaceAggregator(Aggregator):
    """A label model for structured outputs: labels index the points of a finite metric space.

    ``distances[i, j]`` is the distance between label ``i`` and label ``j``, so the
    cardinality is the number of points. The distance matrix is part of the saved state.
    """

    def __init__(self, distances: ArrayLike, **options: Any) -> None:
        super().__init__(**options)
        self.distances = validate_distance_matrix(distances)

    @classmethod
    def _new(cls, options: dict[str, Any], state: dict[str, np.ndarray]) -> Aggregator:
        return cls(state["distances"], **options)

    def fit(self, label_matrix: ArrayLike, cardinality: int | None = None, class_balance: ArrayLike | None = None) -> Aggregator:
        """Fit on source outputs given as indices into the metric space; see :meth:`Aggregator.fit`."""
        points = self.distances.shape[0]
        if cardinality is not None and cardinality != points:
            raise LabelMatrixError(
                f"cardinality={cardinality} differs from the {points} points of the distance matrix; leave cardinality unset"
            )
        return super().fit(label_matrix, points, class_balance)

    def state(self) -> dict[str, np.ndarray]:
        arrays = super().state()
        arrays["distances"] = self.distances
        return arrays
