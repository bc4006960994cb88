"""Adding memorization on purpose: canaries and the implant that teaches them.

Modules:
    canaries: canary texts (words, records, code, prose) and their files.
    implant: fine-tuning that memorizes canaries while keeping the model (KL replay).
"""

from curvedit.memorize.canaries import Canary, generate_canaries, read_canaries
from curvedit.memorize.implant import ImplantError, ImplantOptions, ImplantResult, mean_kl

__all__ = ["Canary", "ImplantError", "ImplantOptions", "ImplantResult", "generate_canaries", "mean_kl",
           "read_canaries"]
