"""What generating images means, with no host: a txt2img request in the WebUI's terms and its result.
Hosts, previews, XY plots and AutoMBW's payloads all speak it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class GenerationRequest:
    """A txt2img payload, in the WebUI's terms."""
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    sampler: str = "Euler a"
    batch_size: int = 1


@dataclass
class GenerationResult:
    images: list[Any] = field(default_factory=list)      # PIL images
    infotexts: list[str] = field(default_factory=list)
