"""flowalign: align flow-matching generators with rewards.

Heavy dependencies (diffusers, transformers, peft, accelerate) are imported inside loader functions so that
``import flowalign`` stays fast.
"""

__version__ = "0.1.0"
