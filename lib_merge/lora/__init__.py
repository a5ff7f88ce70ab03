"""LoRA files: reading (kohya LoRA/LoCon, PEFT/diffusers, LyCORIS LoHa/LoKr), ΔW, key mapping, writing, info.

    from lib_merge.lora import open_lora, delta, save_kohya
    lf = open_lora("style.safetensors")      # LoraFile: .modules, .family, .format, .metadata, .warnings
    dw = lf.delta("lora_unet_down_blocks_0_attentions_0_proj_in")   # ΔW = up@down·α/r, float32
    target = lf.target(name)                 # checkpoint key (and row slice) that ΔW goes to
"""
from .formats import LoraFile, LoraModule, UnsupportedLoraError, delta, detect_family, open_lora, save_kohya
