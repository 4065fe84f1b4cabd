"""ReVision pipeline library: data, encoders, embeddings, ReAlign and the MLLM stages.

Importing this package has no side effects; the stage commands live in ``stages/``.
"""

__version__ = "0.1.0"
