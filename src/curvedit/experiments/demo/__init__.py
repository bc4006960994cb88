"""The self-contained demo: a synthetic world with known memorization and reasoning, a
tiny LM trained on it, and the end-to-end pipeline (`curvedit demo`)."""
