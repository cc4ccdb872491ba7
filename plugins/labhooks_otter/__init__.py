"""labhooks plugin otter: label-distribution adaptation of zero-shot predictions.

OTTER rebalances a batch of predictions to a target label distribution by optimal
transport at the ``logits`` site; R-OTTER learns per-class weights that reproduce it one
input at a time. The hook implementations are in :mod:`labhooks_otter.plugin`.
"""

LABHOOKS_EXTRA = "otter"
