"""The ws plugin's hook implementations: the weak-supervision aggregators (label models).

The heavy dependencies (snorkel, tensorly, scipy) are imported only when a label model
is fitted. Their absence is still detected here, so ``labhooks plugins`` lists the
plugin as unavailable with the extra to install.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import labhooks
from labhooks_ws.dawid_skene import DawidSkene
from labhooks_ws.majority import MajorityVote
from labhooks_ws.pseudo_euclidean import PseudoEuclidean
from labhooks_ws.snorkel_model import SnorkelLabelModel
from labhooks_ws.tensor import TensorDecomposition
from labhooks_ws.triplet import FlyingSquid

for _module in ("scipy", "tensorly", "snorkel"):
    if importlib.util.find_spec(_module) is None:
        raise ModuleNotFoundError(f"No module named {_module!r}", name=_module)

AGGREGATORS = (MajorityVote, SnorkelLabelModel, FlyingSquid, DawidSkene, TensorDecomposition, PseudoEuclidean)


@labhooks.hookimpl
def labhooks_aggregators() -> list[Any]:
    return list(AGGREGATORS)
