"""Standalone generation: a checkpoint-layout state dict -> diffusers modules -> images, with configs derived
from shapes (configs.py), key mapping (convert.py), samplers, the Generator, offline tokenizers, and tiny
runnable and demo models."""
