"""OTTER: label-distribution adaptation of zero-shot predictions by optimal transport.

A batch of n inputs with scores for K classes is matched to a target label distribution
nu: each input carries mass 1/n, class j receives mass nu_j, and moving input i to class j
costs ``-log p(j | x_i)``. The transport plan (POT: exact ``ot.emd`` by default, entropic
``ot.sinkhorn`` as an option for large batches) assigns each input to the class that
receives most of its mass. Adding a constant to a row of the cost changes no plan, exact or
entropic, so logits and log-probabilities give the same plan.

Also here: prior matching (the baseline), target estimation from a few labeled examples
(BBSE and MLLS), and R-OTTER's fit of per-class log-weights that reproduce OTTER's
predictions one input at a time.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
import ot
import torch

from labhooks.errors import ConfigError

logger = logging.getLogger(__name__)

SOLVERS = ("emd", "sinkhorn", "sinkhorn_log")
SCORE_KINDS = ("logits", "log_probs", "probs")

# POT's default (100,000 network simplex iterations) stops short of the optimum on
# batches of a few thousand inputs; this bound leaves room for n = 10,000 and K = 100.
EMD_MAX_ITERATIONS = 100_000_000


def log_probabilities(scores: torch.Tensor, kind: str = "logits") -> torch.Tensor:
    """Return log p(class | input), shape (n, K), from logits, log-probabilities or probabilities."""
    if kind not in SCORE_KINDS:
        raise ConfigError(f"invalid score kind {kind!r}: choose one of {', '.join(SCORE_KINDS)}")
    values = torch.as_tensor(scores).double()
    if values.dim() != 2:
        raise ConfigError(f"scores must have shape (inputs, classes), got {tuple(values.shape)}")
    if kind == "logits":
        return torch.log_softmax(values, dim=-1)
    if kind == "probs":
        if (values < 0).any():
            raise ConfigError("scores of kind 'probs' must be non-negative; pass kind='logits' for raw scores")
        values = values / values.sum(dim=-1, keepdim=True).clamp_min(1e-300)
        return values.clamp_min(1e-300).log()
    return values


def normalize_target(target: torch.Tensor | Sequence[float] | np.ndarray, num_classes: int) -> np.ndarray:
    """Check a target label distribution and return it as float64 summing to 1."""
    values = np.asarray(target, dtype=np.float64).reshape(-1)
    if values.shape[0] != num_classes:
        raise ConfigError(f"the target distribution has {values.shape[0]} entries, but the scores have {num_classes} classes")
    if not np.isfinite(values).all() or (values < 0).any() or values.sum() <= 0:
        raise ConfigError(f"the target distribution must be non-negative with a positive sum, got {values.tolist()}")
    return values / values.sum()


def transport_plan(
    scores: torch.Tensor,
    target: torch.Tensor | Sequence[float] | np.ndarray,
    *,
    kind: str = "logits",
    solver: str = "emd",
    reg: float = 0.05,
    max_iterations: int = 1000,
) -> np.ndarray:
    """Return OTTER's transport plan (n, K): rows sum to 1/n, columns to the target.

    ``reg`` is the entropic regularisation of the Sinkhorn solvers, in the units of the
    cost (nats of ``-log p``); ``max_iterations`` bounds their iterations. "sinkhorn_log"
    works in the log domain and stays finite for small ``reg``.
    """
    if solver not in SOLVERS:
        raise ConfigError(f"invalid solver {solver!r}: choose one of {', '.join(SOLVERS)}")
    log_p = log_probabilities(scores, kind)
    n, num_classes = log_p.shape
    if n == 0:
        return np.zeros((0, num_classes))
    cost = (-log_p).numpy()
    # Row shifts leave every plan unchanged and keep the Sinkhorn kernel exp(-cost/reg) in range.
    cost = cost - cost.min(axis=1, keepdims=True)
    source = np.full(n, 1.0 / n)
    sink = normalize_target(target, num_classes)

    if solver == "emd":
        plan, log = ot.emd(source, sink, cost, numItermax=EMD_MAX_ITERATIONS, log=True)
        if log.get("result_code") != 1:
            logger.warning("exact OT stopped early (%s); the plan may not be optimal", log.get("warning"))
        return np.asarray(plan)

    if reg <= 0:
        raise ConfigError(f"reg must be > 0 for the Sinkhorn solvers, got {reg}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = ot.sinkhorn(source, sink, cost, reg, method=solver, numItermax=max_iterations, stopThr=1e-9)
    for warning in caught:
        logger.warning("Sinkhorn (reg=%g, %d iterations): %s", reg, max_iterations, warning.message)
    plan = np.asarray(plan)
    if not np.isfinite(plan).all():
        raise ConfigError(f"Sinkhorn with reg={reg} produced non-finite values; raise reg or use solver=sinkhorn_log")
    return plan


def otter_predict(
    scores: torch.Tensor,
    target: torch.Tensor | Sequence[float] | np.ndarray,
    *,
    kind: str = "logits",
    solver: str = "emd",
    reg: float = 0.05,
    max_iterations: int = 1000,
) -> torch.Tensor:
    """Return OTTER's predicted class of each input: the argmax of its row of the plan."""
    plan = transport_plan(scores, target, kind=kind, solver=solver, reg=reg, max_iterations=max_iterations)
    return torch.from_numpy(plan.argmax(axis=1)).long()


def prior_matching(
    scores: torch.Tensor,
    target: torch.Tensor | Sequence[float] | np.ndarray,
    *,
    kind: str = "logits",
    max_iterations: int = 1000,
    tolerance: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reweight classes so that the mean predicted distribution equals the target.

    Finds per-class log-weights w with ``mean_i softmax(log p_i + w) = target`` by the
    fixed-point update ``w += log target - log mean_i softmax(log p_i + w)``. This matches
    the target in expectation, where OTTER matches it in the hard assignment. Returns the
    predictions (argmax of the reweighted scores) and w.
    """
    log_p = log_probabilities(scores, kind)
    goal = torch.from_numpy(normalize_target(target, log_p.shape[1]))
    log_goal = goal.clamp_min(1e-300).log()
    weights = torch.zeros(log_p.shape[1], dtype=torch.float64)
    for _ in range(max_iterations):
        mean = torch.softmax(log_p + weights, dim=-1).mean(dim=0)
        step = log_goal - mean.clamp_min(1e-300).log()
        weights = weights + step
        if float((mean - goal).abs().max()) < tolerance:
            break
    weights = weights - weights.max()
    return (log_p + weights).argmax(dim=-1), weights.float()


def estimate_bbse(
    labeled_predictions: torch.Tensor, labeled_labels: torch.Tensor, target_predictions: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Estimate the target label distribution by black-box shift estimation (BBSE).

    With C[i, j] = P(predicted i, true j) on labeled examples from the source distribution
    and mu[i] = P(predicted i) on the unlabeled target batch, the importance weights w
    solve ``C w = mu`` (least squares here) and the target distribution is w times the
    labeled class frequencies, clipped at zero and renormalised.
    """
    predicted = torch.as_tensor(labeled_predictions).long().reshape(-1)
    labels = torch.as_tensor(labeled_labels).long().reshape(-1)
    if predicted.numel() != labels.numel() or predicted.numel() == 0:
        raise ConfigError(f"BBSE needs as many labeled predictions as labels, got {predicted.numel()} and {labels.numel()}")
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    confusion.index_put_((predicted, labels), torch.ones(predicted.numel(), dtype=torch.float64), accumulate=True)
    confusion /= predicted.numel()
    source_prior = confusion.sum(dim=0)
    missing = [index for index in range(num_classes) if source_prior[index] == 0]
    if missing:
        logger.warning("BBSE: classes %s have no labeled example, so their estimated target mass is 0", missing)
    target_predicted = torch.bincount(torch.as_tensor(target_predictions).long().reshape(-1), minlength=num_classes).double()
    mu = target_predicted / target_predicted.sum()
    weights = torch.linalg.lstsq(confusion, mu.unsqueeze(-1)).solution.squeeze(-1).clamp_min(0)
    estimate = weights * source_prior
    if float(estimate.sum()) <= 0:
        logger.warning("BBSE produced an all-zero estimate; falling back to the labeled class frequencies")
        estimate = source_prior
    return (estimate / estimate.sum()).float()


def calibrate_bias_temperature(log_p: torch.Tensor, labels: torch.Tensor, iterations: int = 200) -> tuple[float, torch.Tensor]:
    """Fit a temperature and per-class bias (BCTS) that minimise the NLL on labeled examples."""
    log_temperature = torch.zeros((), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(log_p.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_temperature, bias], max_iter=iterations, line_search_fn="strong_wolfe")
    targets = labels.long()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(log_p / log_temperature.exp() + bias, targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_temperature.detach().exp()), bias.detach()


def estimate_mlls(
    labeled_scores: torch.Tensor,
    labeled_labels: torch.Tensor,
    target_scores: torch.Tensor,
    *,
    kind: str = "logits",
    max_iterations: int = 1000,
    tolerance: float = 1e-8,
) -> torch.Tensor:
    """Estimate the target label distribution by maximum likelihood (MLLS, solved by EM).

    The scores are first calibrated on the labeled examples (temperature and per-class
    bias), which makes them posteriors under the labeled class frequencies pi. EM then
    alternates ``p_i ∝ p(y | x_i) q / pi`` and ``q = mean_i p_i`` on the target batch.
    """
    labels = torch.as_tensor(labeled_labels).long().reshape(-1)
    labeled_log_p = log_probabilities(labeled_scores, kind)
    num_classes = labeled_log_p.shape[1]
    temperature, bias = calibrate_bias_temperature(labeled_log_p, labels)
    counts = torch.bincount(labels, minlength=num_classes).double()
    source_prior = (counts + 1e-3) / (counts + 1e-3).sum()
    calibrated = torch.log_softmax(log_probabilities(target_scores, kind) / temperature + bias, dim=-1)

    estimate = source_prior.clone()
    for _ in range(max_iterations):
        posterior = torch.softmax(calibrated + (estimate / source_prior).clamp_min(1e-300).log(), dim=-1)
        updated = posterior.mean(dim=0)
        done = float((updated - estimate).abs().max()) < tolerance
        estimate = updated
        if done:
            break
    return (estimate / estimate.sum()).float()


def fit_rotter(
    scores: torch.Tensor,
    pseudo_labels: torch.Tensor,
    *,
    kind: str = "logits",
    l2: float = 1e-4,
    max_iterations: int = 500,
) -> torch.Tensor:
    """Fit R-OTTER's per-class log-weights r so that argmax(log p + r) reproduces the pseudo-labels.

    Minimises the cross-entropy of ``softmax(log p_i + r)`` against OTTER's pseudo-labels
    (convex in r), plus ``l2 * |r|^2``, which keeps r finite for a class OTTER never
    predicts. Returns r (K,), shifted so its maximum is 0.
    """
    log_p = log_probabilities(scores, kind)
    labels = torch.as_tensor(pseudo_labels).long().reshape(-1)
    if labels.numel() != log_p.shape[0]:
        raise ConfigError(f"got {labels.numel()} pseudo-labels for {log_p.shape[0]} inputs")
    weights = torch.zeros(log_p.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weights], max_iter=max_iterations, tolerance_grad=1e-10, tolerance_change=1e-12, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(log_p + weights, labels) + l2 * (weights**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    fitted = weights.detach()
    return (fitted - fitted.max()).float()


def label_distribution(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Return the class frequencies of integer labels."""
    counts = torch.bincount(torch.as_tensor(labels).long().reshape(-1), minlength=num_classes).float()
    return counts / counts.sum().clamp_min(1)
