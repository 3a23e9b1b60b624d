"""UrbanSAM's Uscaling-Adapter and Alignment module on a small SAM-style ViT image encoder built in code: identity at
init, the scale-invariance of the Uscaling features, the masked attention, the parameter count, and that only the
adapter trains."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import peftkit as pk
from peftkit.errors import ForwardContextError, InvalidConfigError, UnsupportedLayerError
from peftkit.methods.urbansam import UrbanSAM, UrbanSAMConfig, resample, urbansam_config

pytestmark = pytest.mark.usefixtures("one_thread")

D, PATCH, IMAGE = 32, 8, 32  # width, patch size, image side: a 4×4 token grid
GELU_LIP = 1.1289  # max |GELU'(x)| (at x ≈ 1.41): GELU's Lipschitz constant


class Block(nn.Module):
    """A SAM image-encoder block on channels-last maps ``[B, H, W, C]`` (global attention, pre-norm)."""

    def __init__(self, d: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.lin1, self.lin2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, h * w, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h, w, d)
        x = x + self.proj(a)
        return x + self.lin2(F.gelu(self.lin1(self.norm2(x))))


class PatchEmbed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, D, PATCH, PATCH)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # SAM: channels-last tokens


class SamStyleEncoder(nn.Module):
    """Patch embedding (conv, then channels-last), absolute position embedding, two blocks, a 1×1-conv neck."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed()
        self.pos_embed = nn.Parameter(torch.randn(1, IMAGE // PATCH, IMAGE // PATCH, D) * 0.02)
        self.blocks = nn.ModuleList(Block(D) for _ in range(2))
        self.neck = nn.Conv2d(D, 16, 1)

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self.patch_embed(pixel_values) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))


def encoder() -> SamStyleEncoder:
    torch.manual_seed(0)
    return SamStyleEncoder().eval()


def images(n: int = 2, seed: int = 1) -> Tensor:
    return torch.randn(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def wired(**fields: object) -> UrbanSAMConfig:
    """Uscaling on the patch-embedding conv, alignment after both blocks (c = 8, L = 3, an 8×8 reference grid)."""
    return urbansam_config(image_module="patch_embed.proj", hidden=8, heads=2, scales=3, pyramid_grid=[8, 8], **fields)


@torch.no_grad()
def randomise(model: pk.AdaptedModel, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(5)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * std)


def test_identity_at_init_both_wirings() -> None:
    x = images()
    with torch.no_grad():
        want = encoder()(x)
        for config in (wired(), UrbanSAMConfig(hidden=8, heads=2, pyramid_grid=[4, 4])):
            model = pk.adapt(encoder(), config).eval()
            assert len(model.adapter_modules("default")) == (3 if config.role == "alignment" else 2)
            torch.testing.assert_close(model(x), want, rtol=0.0, atol=0.0)  # W_o = 0: exactly the base
            randomise(model)
            assert (model(x) - want).abs().max() > 1e-2 * want.abs().max(), "the trained adapter changes nothing"


def test_default_targets_are_the_image_encoder_blocks_only() -> None:
    """Inside a SAM-like model the wiring adapts the image encoder's patch conv and blocks, not the mask decoder's
    ``transformer.layers.N`` (which the earlier pattern ``(.*\\.)?(blocks|layers)\\.\\d+`` also matched)."""

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = nn.Module()
            self.transformer.layers = nn.ModuleList(Block(D) for _ in range(2))  # type: ignore[assignment]

    sam = nn.Module()
    sam.image_encoder = encoder()  # type: ignore[assignment]
    sam.mask_decoder = Decoder()  # type: ignore[assignment]
    paths = sorted(pk.adapt(sam, wired()).adapter_modules("default"))
    assert paths == ["image_encoder.blocks.0", "image_encoder.blocks.1", "image_encoder.patch_embed.proj"]
    paths = sorted(pk.adapt(sam, UrbanSAMConfig(hidden=8, heads=2)).adapter_modules("default"))
    assert paths == ["image_encoder.blocks.0", "image_encoder.blocks.1"]


def test_alignment_reads_the_uscaling_features() -> None:
    """The blocks' output depends on the image only through the trunk and U: perturbing U alone (through the
    Uscaling weights) changes the encoder output."""
    model = pk.adapt(encoder(), wired()).eval()
    randomise(model)
    x = images()
    with torch.no_grad():
        before = model(x)
        model.adapter_modules("default")["patch_embed.proj"].uscaling.proj_out.bias.add_(1.0)
        assert (model(x) - before).abs().max() > 1e-3 * before.abs().max()


def _uscaling_adapter() -> UrbanSAM:
    model = pk.adapt(encoder(), wired()).eval()
    randomise(model)  # any weights: the invariance is structural, not a property of the init
    return model.adapter_modules("default")["patch_embed.proj"]


def test_invariance_nearest_upsampled_input_gives_the_same_features() -> None:
    """A 2× nearest-upsampled image has the same 2×2 block averages, so the anchored pyramid and U are the same; the
    only difference left is the rounding of the 4-term averages (a few ulp): tolerance 1e-6 of U's magnitude."""
    adapter, x = _uscaling_adapter(), images()
    up = F.interpolate(x, scale_factor=2, mode="nearest")
    with torch.no_grad():
        u, u_up = adapter.features(x), adapter.features(up)
    assert u.shape == u_up.shape == (2, 8, 8, 8)
    torch.testing.assert_close(u_up, u, rtol=0.0, atol=1e-6 * u.abs().max().item())


def _operator_norm(op: object, grid: tuple[int, int]) -> float:
    """Spectral norm of a linear per-channel map of ``[1, 1, *grid]`` maps (materialised on the basis)."""
    n = grid[0] * grid[1]
    basis = torch.eye(n).view(n, 1, *grid)
    return torch.linalg.matrix_norm(op(basis).reshape(n, -1), ord=2).item()  # type: ignore[operator]


def test_invariance_bilinear_upsampled_input_within_the_lipschitz_bound() -> None:
    """A 2× bilinear upsampling is not undone exactly by the 2×2 averages, so the anchored inputs differ by
    ``ΔJ``; U then differs by at most ``Lip(U)·‖ΔJ‖``, with ``Lip(U) ≤ Σ_l w_l ‖up_l‖ Lip(f) ‖pool_l‖`` and
    ``Lip(f) ≤ ‖W_out‖ · g · max_c ‖k_c‖₁ · g · ‖W_in‖`` (``g`` = GELU's constant; a depthwise conv's norm is at
    most its kernel's ℓ₁ norm). The tolerance is that bound, computed from the adapter's own weights. The image is
    smooth (bicubic from 4×4 noise), as real content is at the scales the pyramid keeps, so ``ΔJ`` is small and the
    bound is tight enough to fail a pyramid taken relative to the input size (measured: ‖ΔU‖ = 0.42 against a bound
    of 0.26 without the anchor, 0.005 with it)."""
    adapter = _uscaling_adapter()
    x = F.interpolate(images(), size=(4, 4), mode="area")
    x = F.interpolate(x, size=(IMAGE, IMAGE), mode="bicubic", align_corners=False)
    us = adapter.uscaling
    assert us is not None
    up = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    with torch.no_grad():
        diff = (adapter.features(up) - adapter.features(x)).norm().item()
        d_in = (resample(up, us.grid) - resample(x, us.grid)).norm().item()
        lip_f = (
            torch.linalg.matrix_norm(us.proj_out.weight.flatten(1), ord=2).item()
            * GELU_LIP
            * us.dw.weight.abs().sum(dim=(1, 2, 3)).max().item()
            * GELU_LIP
            * torch.linalg.matrix_norm(us.proj_in.weight.flatten(1), ord=2).item()
        )
        weights = torch.softmax(us.level_logits, 0).tolist()
        lip, grid = 0.0, us.grid
        for level, w in enumerate(weights):
            size = grid
            for _ in range(level):
                size = ((size[0] + 1) // 2, (size[1] + 1) // 2)

            def pool(t: Tensor, size: tuple[int, int] = size) -> Tensor:
                return F.adaptive_avg_pool2d(t, size)

            def back(t: Tensor) -> Tensor:
                return resample(t, grid)

            lip += w * _operator_norm(back, size) * lip_f * _operator_norm(pool, grid)
    assert d_in > 0, "the bilinear case should not be exact (else it tests nothing beyond the nearest case)"
    assert diff <= lip * d_in, f"‖ΔU‖ = {diff:.4g} exceeds the Lipschitz bound {lip:.4g} × ‖ΔJ‖ = {lip * d_in:.4g}"


def test_masked_attention_ignores_masked_cells() -> None:
    """A cell whose mask logit is very negative gets (numerically) no attention: the output equals attention over
    the other cells alone."""
    adapter = pk.adapt(encoder(), wired()).adapter_modules("default")["blocks.0"]
    align = adapter.alignment
    assert align is not None
    with torch.no_grad():
        nn.init.normal_(align.o.weight, std=0.5)
        align.mask.weight.zero_()
        u = torch.randn(1, 8, 1, 2)
        u[0, 0, 0, 1] = 1.0
        align.mask.weight[0, 0] = -60.0  # m = -60 · U[channel 0]: cell 1 masked (log σ(-60) ≈ -60)
        u[0, 0, 0, 0] = 0.0  # cell 0: m = the mask bias only
        tokens = torch.randn(1, 5, D)
        both = align(tokens, u)
        only0 = align(tokens, u[..., :1])
        logits = adapter.object_logits(u)
    assert logits.shape == (1, 1, 1, 2) and logits[0, 0, 0, 1] < -50
    torch.testing.assert_close(both, only0, rtol=0.0, atol=1e-6 * only0.abs().max().item())


def test_trainable_count_matches_the_formula() -> None:
    """Uscaling on the patch conv (C_in = 3) + alignment on each of two blocks (d = 32), c = 8, L = 3."""
    c_in, d, c, levels = 3, D, 8, 3
    uscaling = c_in * c + c + 10 * c + c * c + c + levels
    alignment = 2 * c * d + d + 2 * c * c + 4 * c + 1
    model = pk.adapt(encoder(), wired())
    assert model.trainable_parameters().trainable == uscaling + 2 * alignment == 1597
    both = pk.adapt(encoder(), UrbanSAMConfig(hidden=8, heads=2, pyramid_grid=[4, 4]))  # blocks: C_in = d
    per_block = (d * c + c + 10 * c + c * c + c + 3) + alignment
    assert both.trainable_parameters().trainable == 2 * per_block


def test_only_adapter_parameters_get_gradients() -> None:
    model = pk.adapt(encoder(), wired())
    out = model(images())
    out.square().mean().backward()
    for name, p in model.get_base_model().named_parameters():
        if not p.requires_grad:
            assert p.grad is None, f"frozen {name} got a gradient"
    adapter_params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert adapter_params and all(p.grad is not None for p in adapter_params.values())
    own = {id(p) for a in model.adapter_modules("default").values() for p in a.parameters()}
    assert {id(p) for p in adapter_params.values()} == own
    w_o = [p for n, p in adapter_params.items() if n.endswith("alignment.o.weight")]
    assert len(w_o) == 2 and all(p.grad.abs().sum() > 0 for p in w_o)  # type: ignore[union-attr]


def test_training_reduces_a_loss() -> None:
    """A reachable target: the output of the same wiring with randomised adapter weights (a teacher)."""
    x = images(4)
    teacher = pk.adapt(encoder(), wired()).eval()
    randomise(teacher, std=0.1)
    with torch.no_grad():
        target = teacher(x)
    model = pk.adapt(encoder(), wired()).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_errors_name_the_problem() -> None:
    with pytest.raises(InvalidConfigError, match="heads=3 must divide hidden=8"):
        UrbanSAMConfig(hidden=8, heads=3)
    with pytest.raises(InvalidConfigError, match="pyramid_grid"):
        UrbanSAMConfig(pyramid_grid=[4, 4, 4])

    class WithEmbedding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 8)

    with pytest.raises(UnsupportedLayerError):
        pk.adapt(WithEmbedding(), UrbanSAMConfig(targets=["emb"]))
    # alignment with no Uscaling-Adapter in the forward
    model = pk.adapt(encoder(), UrbanSAMConfig(targets=["blocks.0"], role="alignment", hidden=8, heads=2))
    with pytest.raises(ForwardContextError, match="Uscaling-Adapter"):
        model(images())
    # a Linear applied to flat vectors has no map to build a pyramid from
    flat = pk.adapt(nn.Sequential(nn.Linear(8, 8)), UrbanSAMConfig(targets=["0"], hidden=4, heads=2))
    with pytest.raises(InvalidConfigError, match=r"got a tensor of shape \(3, 8\)"):
        flat(torch.randn(3, 8))
