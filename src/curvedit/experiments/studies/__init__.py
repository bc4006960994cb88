"""Studies on real pretrained models (outside the test suite; each stage cached)."""
