"""ImageNet-1K training on Accelerate, timm and DALI: ``python -m train`` or ``accelerate launch -m train``."""

__version__ = "0.1.0"
