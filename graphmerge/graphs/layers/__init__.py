"""Layer rules: one class per layer type holds everything graphmerge knows about it.

``register_layer`` adds a rule for your own layer (see ``registry``); the built-in
rules cover torch.nn's linear, convolution, embedding, normalization, activation,
dropout, flatten and pooling layers.
"""

from graphmerge.graphs.layers.registry import (
    DEFAULT_RULE,
    FunctionCall,
    FunctionRule,
    LayerCall,
    LayerRule,
    NormRule,
    apply_layer,
    function_rule,
    read_problem,
    register_function,
    register_layer,
    registered,
    rule_for,
    traced_through,
    traced_whole,
)

# isort: split
# The built-in rules register themselves on import.
from graphmerge.graphs.layers import (  # noqa: F401
    attention,
    dense,
    elementwise,
    huggingface,
    norms,
    transformer,
    windows,
)

__all__ = [
    "DEFAULT_RULE",
    "FunctionCall",
    "FunctionRule",
    "LayerCall",
    "LayerRule",
    "NormRule",
    "apply_layer",
    "function_rule",
    "read_problem",
    "register_function",
    "register_layer",
    "registered",
    "rule_for",
    "traced_through",
    "traced_whole",
]
