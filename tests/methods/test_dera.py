"""Spatial-only adaptation of a spatio-temporal model (ToonComposer / DeRA spec entry), on a small factorised
video transformer built in code: the spatial-only rule adapts the spatial-attention layers and never the
temporal ones; DeRA is identity at init, its branch never mixes frames (frame t's branch output depends only on
frame t, and permuting frames permutes it), parameter count, 2-D RoPE."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.core.layer import AdaptedLayer
from peftkit.errors import InvalidConfigError, TargetModuleNotFound
from peftkit.methods.dera import DeRA, DeRAConfig, rope_2d, spatial_only_lora, spatial_only_targets

T, H, W, D = 3, 2, 3, 16


class Attention(nn.Module):
    """Self-attention over the second axis of ``[groups, tokens, d]``."""

    def __init__(self, d: int, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        g, n, d = x.shape
        q, k, v = self.qkv(x).view(g, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(g, n, d))


class FactorisedBlock(nn.Module):
    """Spatial attention within each frame, then temporal attention across frames at each location, then MLP."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm_s, self.spatial_attn = nn.LayerNorm(d), Attention(d)
        self.norm_t, self.temporal_attn = nn.LayerNorm(d), Attention(d)
        self.norm_m, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: Tensor) -> Tensor:  # x: [B, T·H·W, d]
        b, n, d = x.shape
        frames = x.view(b * T, H * W, d)
        x = (frames + self.spatial_attn(self.norm_s(frames))).view(b, n, d)
        tubes = x.view(b, T, H * W, d).transpose(1, 2).reshape(b * H * W, T, d)
        x = (tubes + self.temporal_attn(self.norm_t(tubes))).view(b, H * W, T, d).transpose(1, 2).reshape(b, n, d)
        return x + self.mlp(self.norm_m(x))


class VideoTransformer(nn.Module):
    def __init__(self, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(3, D)
        self.blocks = nn.ModuleList(FactorisedBlock(D) for _ in range(depth))
        self.head = nn.Linear(D, 4)

    def forward(self, video: Tensor) -> Tensor:  # [B, T, H, W, 3]
        x = self.embed(video.reshape(video.shape[0], -1, 3))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


def _video(b: int = 2) -> Tensor:
    return torch.randn(b, T, H, W, 3, generator=torch.Generator().manual_seed(0))


def _model() -> VideoTransformer:
    torch.manual_seed(0)
    return VideoTransformer().eval()


def test_spatial_only_targets_skip_temporal_layers() -> None:
    targets = spatial_only_targets(_model())
    assert targets == [f"blocks.{i}.spatial_attn.{m}" for i in range(2) for m in ("qkv", "proj")]
    with pytest.raises(TargetModuleNotFound):
        spatial_only_targets(nn.Sequential(nn.Linear(3, 3)))


def test_spatial_only_lora_leaves_temporal_layers_untouched() -> None:
    base = _model()
    temporal_before = {n: p.detach().clone() for n, p in base.named_parameters() if "temporal" in n}
    model = pk.adapt(base, spatial_only_lora(base, r=2, alpha=4.0))
    assert all("spatial_attn" in p for p in model.layer_paths["default"])
    assert not any(isinstance(m, AdaptedLayer) for n, m in model.named_modules() if "temporal" in n)
    out = model(_video())
    out.square().mean().backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("spatial_attn" in n for n in trainable)
    with torch.no_grad():  # training moves only the spatial LoRA; the temporal weights stay what they were
        for a in model.adapter_modules("default").values():
            a.B.normal_()
        merged = model.merge()
    for n, p in merged.named_parameters():
        if "temporal" in n:
            assert torch.equal(p, temporal_before[n])


def _dera_on_video(**kw) -> tuple[pk.AdaptedModel, DeRA]:
    """DeRA on the temporal-mixing block as a whole (a stand-in for a spatio-temporal self-attention)."""
    base = _model()
    model = pk.adapt(base, DeRAConfig(targets=["blocks.0"], r=8, heads=2, grid=[H, W], **kw)).eval()
    return model, model.adapter_modules("default")["blocks.0"]  # type: ignore[return-value]


def test_dera_identity_at_init_and_count() -> None:
    model, _ = _dera_on_video()
    with torch.no_grad():
        torch.testing.assert_close(model(_video()), _model()(_video()), rtol=0, atol=0)
    r = 8
    assert model.trainable_parameters().trainable == 2 * D * r + 4 * r * r + 4 * r


def test_dera_branch_never_mixes_frames() -> None:
    _, dera = _dera_on_video()
    with torch.no_grad():
        dera.up.weight.normal_()
        x = torch.randn(2, T * H * W, D)
        out = dera.branch(x)
        changed = x.clone()
        changed[:, : H * W] += torch.randn(2, H * W, D)  # perturb frame 0 only
        out2 = dera.branch(changed)
        assert not torch.allclose(out2[:, : H * W], out[:, : H * W])
        torch.testing.assert_close(out2[:, H * W :], out[:, H * W :], rtol=0, atol=0)
        perm = torch.tensor([2, 0, 1])
        permuted = x.view(2, T, H * W, D)[:, perm].reshape(x.shape)
        want = out.view(2, T, H * W, D)[:, perm].reshape(out.shape)
        torch.testing.assert_close(dera.branch(permuted), want, rtol=0, atol=1e-6)


def test_dera_branch_sees_positions_within_a_frame() -> None:
    """With 2-D RoPE active (head width 6), swapping two tokens of a frame does not just swap their outputs."""
    lin = nn.Linear(D, D)
    dera = DeRA(BaseView(lin), DeRAConfig(r=12, heads=2, grid=[H, W]))
    with torch.no_grad():
        dera.up.weight.normal_()
        x = torch.randn(1, H * W, D)
        swapped = x[:, [1, 0, 2, 3, 4, 5]]
        out, out_swapped = dera.branch(x), dera.branch(swapped)
    assert not torch.allclose(out_swapped[:, [1, 0, 2, 3, 4, 5]], out, atol=1e-4)


def test_rope_2d_rotates_by_row_and_column() -> None:
    t = torch.randn(1, 4, 6)  # head width 6: 2 unrotated, 2 by row, 2 by column
    rows, cols = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    out = rope_2d(t, rows, cols, 10000.0)
    torch.testing.assert_close(out[..., :2], t[..., :2])
    torch.testing.assert_close(out[:, 0], t[:, 0])  # position (0, 0): no rotation
    torch.testing.assert_close(out.norm(dim=-1), t.norm(dim=-1))  # rotations keep the norm
    torch.testing.assert_close(out[:, 1, 2:4], t[:, 1, 2:4])  # row 0: the row part is unrotated


def test_dera_config_checks() -> None:
    with pytest.raises(InvalidConfigError, match="heads=5"):
        DeRAConfig(r=8, heads=5)
    with pytest.raises(InvalidConfigError, match="grid"):
        DeRAConfig(grid=[2])
    dera = DeRA(BaseView(nn.Linear(D, D)), DeRAConfig(r=8, heads=2, grid=[4, 4]))
    with pytest.raises(InvalidConfigError, match="does not tile"):
        dera.branch(torch.randn(1, 6, D))


# ------------------------------------------------------------------------------ HF attention modules (issue 12)
# HF attention modules return a tuple ``(attn_output, attn_weights)`` and CLIP calls its attention with keywords
# (``self.self_attn(hidden_states=..., attention_mask=...)``). DeRA adapts the first element of the tuple (the
# attention output ``[batch, tokens, d]``; the rest passes through) with ``x`` = the hidden states the attention
# receives, however they are passed. That needs the core's "module"-kind wrapping to handle tuple outputs and
# keyword calls (``peftkit/core/layer.py``).


def _tiny_hf(kind: str) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel, ViTConfig, ViTModel

    torch.manual_seed(0)
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=16)
    if kind == "vit":
        return ViTModel(ViTConfig(patch_size=4, **sizes), add_pooling_layer=False).eval()
    return CLIPVisionModel(CLIPVisionConfig(patch_size=4, **sizes)).eval()


def _check_dera_on_hf(kind: str, targets: list[str] | None) -> None:
    """Identity at init, then with a random ``up``: each adapted attention returns a tuple like its base, whose
    first element is the base attention output plus ``branch(hidden_states)`` and whose other elements are the
    base's own."""
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = _tiny_hf(kind)(pixel_values=pixels).last_hidden_state
    config = DeRAConfig(r=8, heads=2, seed=0, **({} if targets is None else {"targets": targets}))
    model = pk.adapt(_tiny_hf(kind), config).eval()
    assert len(model.layer_paths["default"]) == 2  # one attention per block
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixels).last_hidden_state, want, rtol=0, atol=0)
        for a in model.adapter_modules("default").values():
            a.up.weight.normal_(std=0.1, generator=torch.Generator().manual_seed(2))
    calls: list[tuple[str, tuple, dict, object]] = []
    hooks = [
        model.get_submodule(f"model.{path}").register_forward_hook(
            lambda m, args, kwargs, out, p=path: calls.append((p, args, kwargs, out)), with_kwargs=True
        )
        for path in model.layer_paths["default"]
    ]
    with torch.no_grad():
        adapted = model(pixel_values=pixels).last_hidden_state
        for h in hooks:
            h.remove()
        assert not torch.allclose(adapted, want, atol=1e-4)
        assert len(calls) == 2
        for path, args, kwargs, out in calls:
            layer = model.get_submodule(f"model.{path}")
            base_out = layer.base_layer(*args, **kwargs)
            x = args[0] if args else kwargs["hidden_states"]
            assert isinstance(out, tuple) and len(out) == len(base_out)
            branch = model.adapter_modules("default")[path].branch(x)
            torch.testing.assert_close(out[0], base_out[0] + branch, rtol=0, atol=1e-6 * float(out[0].abs().max()))
            for got, base in zip(out[1:], base_out[1:]):
                assert (got is None and base is None) or torch.equal(got, base)


def test_dera_on_hf_vit_attention_tuple_output() -> None:
    """ViT's ``attention`` (q/k/v/o projections, no residual) returns ``(attn_output, attn_weights)``: before the
    core handles tuples, DeRA's forward gets the tuple as ``base_out`` ('tuple' object has no attribute
    'dtype'). (The default targets ``self_attn`` / ``attn`` do not name ViT's ``attention``; it is named here.)"""
    _check_dera_on_hf("vit", ["attention"])


def test_dera_on_hf_clip_attention_keyword_call() -> None:
    """CLIP's ``self_attn`` (found by DeRA's default targets) is called with keywords only and returns a tuple:
    before the core binds keyword calls, ``AdaptedLayer.forward() missing 1 required positional argument: 'x'``."""
    _check_dera_on_hf("clip", None)


def test_dera_default_targets_find_clip_self_attention() -> None:
    model = pk.adapt(_tiny_hf("clip"), DeRAConfig(r=8, heads=2))
    assert model.layer_paths["default"] == [
        "encoder.layers.0.self_attn",
        "encoder.layers.1.self_attn",
    ]
