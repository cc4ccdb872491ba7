"""labhooks plugin steer: trainable steering (post-block adapters, ReFT, LoFIT, JoLA) and oracle steering.

The hook implementations live in ``labhooks_steer.plugin``; this module stays import-light.
"""

LABHOOKS_EXTRA = "steer"
