"""labhooks plugin ws: weak-supervision label models (majority vote, Snorkel, FlyingSquid,
Dawid-Skene, tensor decomposition, pseudo-Euclidean embeddings) and source simulators.

The hook implementations live in ``labhooks_ws.plugin``; this module stays import-light.
"""

LABHOOKS_EXTRA = "ws"
