"""curvedit: find and remove verbatim memorization with the curvature of the loss."""

__version__ = "0.1.0"
