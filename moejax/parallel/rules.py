"""The one table mapping logical axis names to mesh axes.

Parameters and activations carry logical names (``nn.with_logical_partitioning``,
``nn.with_logical_constraint``); only this table knows the mesh. Order matters: a mesh axis is
used at most once per array, first come first served, so an activation's ``batch`` claims
``fsdp``/``expert`` and its ``embed`` then stays replicated, while a weight's ``embed`` is
sharded over ``fsdp``.
"""
LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("expert", "expert"),
)
