"""Merge Lab: merge Stable Diffusion checkpoints and LoRAs, in the WebUI or standalone.

Importing the package is cheap: modules import torch and friends only where they are used.
"""
__version__ = "0.1.0"
