"""Experiments built on the library: the self-contained demo and the studies on real models.

Modules:
    stages: the stage kit both share (a stage timer and a keyed JSON stage cache).
    demo: the synthetic world, its tiny LM and the end-to-end pipeline (`curvedit demo`).
    studies: studies on real pretrained models (`curvedit study`).
"""

__all__ = ["demo", "stages", "studies"]
