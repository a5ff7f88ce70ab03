"""The LoRA tools together: bake(extract(base, tuned)) gives back the tuned checkpoint."""
import torch

from lib_merge.core.files import save_state_dict
from lib_merge.lora.bake import bake
from lib_merge.lora.extract import extract


def test_bake_of_an_extracted_lora_gives_back_the_fine_tune(tiny, tmp_path):
    base = tiny.state["sd1_a"]
    g = torch.Generator().manual_seed(0)
    tuned = dict(base)
    changed = [k for k in base if k.endswith(("attn1.to_q.weight", "attn2.to_v.weight", "ff.net.2.weight"))
               and k.startswith("model.diffusion_model.")][:12]
    assert len(changed) == 12
    for k in changed:   # a rank-2 change per module: what a rank-4 LoRA holds exactly
        out_dim, in_dim = base[k].shape
        tuned[k] = base[k] + 0.05 * torch.randn(out_dim, 2, generator=g) @ torch.randn(2, in_dim, generator=g)
    save_state_dict(tuned, tmp_path / "tuned.safetensors")
    lora = tmp_path / "extracted.safetensors"
    extract(tiny.path["sd1_a"], tmp_path / "tuned.safetensors", lora, rank=4, dtype=torch.float32,
            clamp_quantile=None, method="full")
    baked = bake(tiny.path["sd1_a"], [(str(lora), 1.0, 1.0)], out=None, dtype=torch.float32).state
    for k in changed:
        torch.testing.assert_close(baked[k], tuned[k], rtol=1e-4, atol=1e-5)
    for k, v in base.items():
        if k not in changed and v.is_floating_point():
            assert torch.equal(baked[k], v), k


def test_bake_reports_progress_and_can_be_interrupted(tiny, tmp_path):
    import pytest

    from lib_merge.core.errors import CancelledError
    base = tiny.state["sd1_a"]
    k = next(k for k in base if k.endswith("attn1.to_q.weight"))
    tuned = dict(base)
    tuned[k] = base[k] + 0.1 * torch.ones_like(base[k])
    save_state_dict(tuned, tmp_path / "tuned.safetensors")
    lora = tmp_path / "l.safetensors"
    extract(tiny.path["sd1_a"], tmp_path / "tuned.safetensors", lora, rank=2, dtype=torch.float32)
    seen = []
    bake(tiny.path["sd1_a"], [(str(lora), 1.0, 1.0)], tmp_path / "baked.safetensors",
         progress=lambda i, n, key: seen.append((i, n)))
    assert seen[0] == (0, len(base)) and seen[-1] == (len(base) - 1, len(base))
    calls = []
    with pytest.raises(CancelledError, match="nothing was written"):
        bake(tiny.path["sd1_a"], [(str(lora), 1.0, 1.0)], tmp_path / "stopped.safetensors",
             cancel=lambda: calls.append(1) or len(calls) > 5)
    assert not (tmp_path / "stopped.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
