"""labhooks plugin roboshot: zero-shot robustification by editing the embedding.

RoboShot rejects harmful (spurious) insight directions from a zero-shot classifier's input
embedding and amplifies helpful ones, with no labels and no training. The hook
implementations are in :mod:`labhooks_roboshot.plugin`.
"""

LABHOOKS_EXTRA = "roboshot"
