"""Model graphs: networkx computation graphs of models, with their spaces.

A *space* is a set of channel axes that must always be transformed together
(a conv's output channels, everything elementwise after it, everything joined
to it by a residual add). The tracer, the hand-written GraphBuilder and the
symmetry self-check live here (see the "Model graphs" issue).
"""
