"""labhooks plugin ``alignez``: AlignEZ, steering toward a preference with self-generated pairs.

Kept import-light: the method and its intervention live in ``labhooks_alignez.plugin``.
"""

LABHOOKS_EXTRA = None
