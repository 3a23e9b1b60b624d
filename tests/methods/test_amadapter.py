"""AM-Adapter (Jin et al., 2025, spec entry "AM-Adapter") on a lone ``diffusers`` ``Attention`` and on a small
``diffusers`` ``UNet2DConditionModel`` built from a config (random weights): the refiner's input channels and
shapes, the fused 4-D convolution and the whole shift against a reference written here in the official layout
(separate 1×1 / 3×3 convolutions, ``nn.GroupNorm`` on the 6-D volume), rows of the augmented attention sum to 1,
zero encoders give the frozen augmented attention, no exemplar gives the base, only the encoders get gradients,
the parameter count, and a few training steps reduce a toy loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.errors import AdapterIdsError, InvalidConfigError
from peftkit.methods import amadapter as am

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention_processor import Attention  # noqa: E402

HEADS, SIDE, DIM = 8, 4, 16  # a lone attention: 8 heads (9 refiner channels, as in SD 1.5), a 4×4 token grid
N = SIDE * SIDE


def close(a: Tensor, b: Tensor, rel: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, rtol=0.0, atol=rel * float(b.abs().max()) + 1e-12)


def _attention() -> tuple[Attention, am.AMAdapter]:
    torch.manual_seed(0)
    attn = Attention(query_dim=DIM, heads=HEADS, dim_head=DIM // HEADS).eval()
    adapter = am.AMAdapter(BaseView(attn), am.AMAdapterConfig())
    return attn, adapter


def _inputs(batch: int = 2) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "x": torch.randn(batch, N, DIM, generator=g),
        "x_e": torch.randn(batch, N, DIM, generator=g),
        "lt": torch.randint(0, 3, (batch, 8, 8), generator=g),
        "le": torch.randint(0, 3, (batch, 8, 8), generator=g),
    }


def _official_encoder(encoder: am.Encoder4D, vol: Tensor) -> Tensor:
    """The official Encoder4D on ``vol [B, C, h, w, h', w']``: per layer, a 1×1 conv over the target pair per
    exemplar position plus a 3×3 conv over the exemplar pair per target position, GroupNorm(1), ReLU."""
    for conv, norm in zip(encoder.convs, encoder.norms):
        b, c, h, w, he, we = vol.shape
        xq = vol.permute(0, 4, 5, 1, 2, 3).reshape(b * he * we, c, h, w)
        yq = F.conv2d(xq, conv.target.weight, conv.target.bias).view(b, he, we, -1, h, w).permute(0, 3, 4, 5, 1, 2)
        xs = vol.permute(0, 2, 3, 1, 4, 5).reshape(b * h * w, c, he, we)
        ys = F.conv2d(xs, conv.exemplar.weight, conv.exemplar.bias, padding=1)
        ys = ys.view(b, h, w, -1, he, we).permute(0, 3, 1, 2, 4, 5)
        vol = F.relu(F.group_norm(yq + ys, 1, norm.weight, norm.bias, eps=1e-5))
    return vol


def _reference(attn: Attention, x: Tensor, x_e: Tensor, encoder: am.Encoder4D | None, corr: Tensor) -> tuple:
    """Augmented self-attention written out: keys/values over [x; x_e], the shift R − max(R)/4 added to the
    cross-image logits (``encoder=None``: no shift)."""
    b = x.shape[0]
    both = torch.cat([x, x_e], 1)
    q, k, v = (
        t.view(b, -1, HEADS, DIM // HEADS).transpose(1, 2) for t in (attn.to_q(x), attn.to_k(both), attn.to_v(both))
    )
    logits = q @ k.transpose(-1, -2) * attn.scale
    if encoder is not None:
        vol = torch.cat([logits[..., N:].detach(), corr[:, None]], 1).view(b, HEADS + 1, SIDE, SIDE, SIDE, SIDE)
        r = _official_encoder(encoder, vol)
        r = r - r.amax(dim=(1, 2, 3, 4, 5), keepdim=True) / 4
        logits = torch.cat([logits[..., :N], logits[..., N:] + r.reshape(b, HEADS, N, N)], -1)
    probs = logits.softmax(-1)
    out = attn.to_out[0]((probs @ v).transpose(1, 2).reshape(b, N, DIM))
    return out, probs


# ------------------------------------------------------------------------------------------- lone attention
def test_refiner_input_channels_and_shapes() -> None:
    g = torch.Generator().manual_seed(2)
    cross = torch.randn(2, HEADS, N, N, generator=g, requires_grad=True)
    lt, le = torch.randint(0, 3, (2, SIDE, SIDE), generator=g), torch.randint(0, 3, (2, SIDE, SIDE), generator=g)
    corr = am.label_correlation(lt, le, (SIDE, SIDE))
    assert corr.shape == (2, N, N)
    want = (lt.flatten(1)[:, :, None] == le.flatten(1)[:, None, :]).float()  # rows target, columns exemplar
    assert torch.equal(corr, want) and 0 < corr.mean() < 1
    vol = am.refiner_input(cross, corr, (SIDE, SIDE))
    assert vol.shape == (2, SIDE, SIDE, HEADS + 1, SIDE, SIDE)  # [B, h, w, H + 1, h', w']
    assert not vol.requires_grad  # the logits enter detached
    # channel j < H at target (i_h, i_w), exemplar (e_h, e_w) is head j's logit of token i on exemplar token e
    assert torch.equal(vol[:, :, :, :HEADS].permute(0, 3, 1, 2, 4, 5).reshape(2, HEADS, N, N), cross.detach())
    assert torch.equal(vol[:, :, :, HEADS].reshape(2, N, N), corr)


def test_shift_and_output_match_the_official_layout_reference() -> None:
    attn, adapter = _attention()
    d = _inputs()
    adapter.exemplar = am.Exemplar(d["x_e"], d["lt"], d["le"])
    with torch.no_grad():
        got, probs = adapter.augmented(attn, d["x"], d["x_e"])
        corr = am.label_correlation(d["lt"], d["le"], (SIDE, SIDE))
        want, want_probs = _reference(attn, d["x"], d["x_e"], adapter.encoder, corr)
        frozen, _ = _reference(attn, d["x"], d["x_e"], None, corr)
    close(probs, want_probs)
    close(got, want)
    assert (got - frozen).abs().max() > 1e-3 * frozen.abs().max()  # the shift does change the output


def test_attention_rows_sum_to_one() -> None:
    attn, adapter = _attention()
    d = _inputs()
    adapter.exemplar = am.Exemplar(d["x_e"], d["lt"], d["le"])
    with torch.no_grad():
        _, probs = adapter.augmented(attn, d["x"], d["x_e"])
    assert probs.shape == (2, HEADS, N, 2 * N)  # keys [target; exemplar]: width 2n
    close(probs.sum(-1), torch.ones(2, HEADS, N), rel=1e-6)


def test_zero_encoder_gives_the_frozen_augmented_attention() -> None:
    attn, adapter = _attention()
    d = _inputs()
    adapter.exemplar = am.Exemplar(d["x_e"], d["lt"], d["le"])
    with torch.no_grad():
        for p in adapter.encoder.parameters():
            p.zero_()
        logits = torch.randn(2, HEADS, N, N)
        shift = adapter.shift(logits, am.label_correlation(d["lt"], d["le"], (SIDE, SIDE)), (SIDE, SIDE))
        assert shift.shape == (2, HEADS, N, N) and torch.equal(shift, torch.zeros_like(shift))
        got = adapter(d["x"], attn(d["x"]), BaseView(attn))
        want, _ = _reference(attn, d["x"], d["x_e"], None, torch.zeros(2, N, N))
    close(got, want)


def test_target_as_its_own_exemplar_with_zero_shift_is_plain_self_attention() -> None:
    attn, adapter = _attention()
    x = _inputs()["x"]
    with torch.no_grad():
        plain = attn(x)
        frozen, _ = adapter.augmented(attn, x, x, shift=False)  # softmax([A, A]) halves each copy's weight
    close(frozen, plain)


def test_coarse_grid_refines_at_max_grid_and_upsamples() -> None:
    torch.manual_seed(0)
    attn = Attention(query_dim=DIM, heads=HEADS, dim_head=DIM // HEADS).eval()
    adapter = am.AMAdapter(BaseView(attn), am.AMAdapterConfig(max_grid=2))
    g = torch.Generator().manual_seed(3)
    cross = torch.randn(1, HEADS, N, N, generator=g)
    with torch.no_grad():
        got = adapter.shift(cross, torch.zeros(1, N, N), (SIDE, SIDE))
        vol = am.resize_pairs(am.refiner_input(cross, torch.zeros(1, N, N), (SIDE, SIDE)), (2, 2))
        r = adapter.encoder(vol)
        r = am.resize_pairs(r - r.amax() / 4, (SIDE, SIDE))
    assert got.shape == (1, HEADS, N, N)
    close(got, r.reshape(1, N, HEADS, N).permute(0, 2, 1, 3))
    const = torch.full((1, 2, 2, 3, 2, 2), 0.7)
    close(am.resize_pairs(const, (SIDE, SIDE)), torch.full((1, SIDE, SIDE, 3, SIDE, SIDE), 0.7))


def test_conv4d_counts_and_config_checks() -> None:
    assert am.encoder_params(8, [16, 32, 16], 3) == (
        (10 * 9 * 16 + 4 * 16) + (10 * 16 * 32 + 4 * 32) + (10 * 32 * 16 + 4 * 16) + (10 * 16 * 8 + 4 * 8)
    )
    assert am.encoder_params(8, [16, 32, 16], 3) == 13248
    _, adapter = _attention()
    assert sum(p.numel() for p in adapter.parameters()) == 13248
    with pytest.raises(InvalidConfigError, match="odd"):
        am.AMAdapterConfig(kernel=2)


# ------------------------------------------------------------------------------------------------ the UNet
def _unet() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=8,  # diffusers: the number of heads here (8, as in SD 1.5)
        norm_num_groups=8,
    ).eval()


@pytest.fixture(scope="module")
def unet_inputs() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(4)
    return {
        "x": torch.randn(2, 4, 8, 8, generator=g),
        "x_e": torch.randn(2, 4, 8, 8, generator=g),
        "text": torch.randn(2, 3, 16, generator=g),
        "lt": torch.randint(0, 3, (2, 32, 32), generator=g),
        "le": torch.randint(0, 3, (2, 32, 32), generator=g),
    }


def _run(unet: nn.Module, d: dict[str, Tensor], key: str = "x") -> Tensor:
    return unet(d[key], 10, encoder_hidden_states=d["text"]).sample


def _adapted(d: dict[str, Tensor], **config: object) -> pk.AdaptedModel:
    model = pk.adapt(_unet(), am.AMAdapterConfig(**config))
    tokens = am.capture_exemplar(model, lambda u: _run(u, d, "x_e"))
    am.set_exemplar(model, tokens, target_labels=d["lt"], exemplar_labels=d["le"])
    return model


def test_unet_targets_every_attn1_and_counts_parameters(unet_inputs) -> None:
    model = pk.adapt(_unet(), am.AMAdapterConfig())
    paths = list(model.adapter_modules("default"))
    assert len(paths) == 4 and all(p.endswith("attn1") for p in paths)
    assert model.trainable_parameters().trainable == 4 * 13248
    with torch.no_grad():  # no exemplar: plain self-attention, the base exactly
        assert torch.equal(_run(model, unet_inputs), _run(_unet(), unet_inputs))


def test_unet_exemplar_changes_output_and_clears(unet_inputs) -> None:
    model = _adapted(unet_inputs)
    with torch.no_grad():
        base = _run(_unet(), unet_inputs)
        adapted = _run(model, unet_inputs)
        assert (adapted - base).abs().max() > 1e-3 * base.abs().max()
        am.clear_exemplar(model)
        assert torch.equal(_run(model, unet_inputs), base)
        tokens = am.capture_exemplar(model, lambda u: _run(u, unet_inputs, "x_e"))
        with am.exemplar(model, tokens, target_labels=unet_inputs["lt"], exemplar_labels=unet_inputs["le"]):
            close(_run(model, unet_inputs), adapted)
        assert torch.equal(_run(model, unet_inputs), base)


def test_unet_zero_encoders_and_shift_rows_give_the_frozen_augmented_attention(unet_inputs) -> None:
    model = _adapted(unet_inputs)
    tokens = am.capture_exemplar(model, lambda u: _run(u, unet_inputs, "x_e"))
    with torch.no_grad():
        shifted = _run(model, unet_inputs)
        # classifier-free guidance: row 0 (unconditional) without the shift, row 1 with it
        am.set_exemplar(
            model,
            tokens,
            shift_rows=torch.tensor([False, True]),
            target_labels=unet_inputs["lt"],
            exemplar_labels=unet_inputs["le"],
        )
        cfg = _run(model, unet_inputs)
        for adapter in model.adapter_modules("default").values():
            for p in adapter.parameters():
                p.zero_()
        am.set_exemplar(model, tokens, target_labels=unet_inputs["lt"], exemplar_labels=unet_inputs["le"])
        frozen = _run(model, unet_inputs)
        am.set_exemplar(model, None)
    close(cfg[1], shifted[1])
    close(cfg[0], frozen[0])
    assert (shifted[0] - frozen[0]).abs().max() > 1e-3 * frozen.abs().max()


def test_unet_only_the_encoders_get_gradients_and_training_reduces_loss(unet_inputs) -> None:
    torch.set_num_threads(1)
    model = _adapted(unet_inputs)
    target = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    trainable = [p for p in model.parameters() if p.requires_grad]
    encoders = {id(p) for a in model.adapter_modules("default").values() for p in a.encoder.parameters()}
    assert {id(p) for p in trainable} == encoders
    opt = torch.optim.Adam(trainable, lr=1e-2)
    losses = []
    for step in range(5):
        loss = F.mse_loss(_run(model, unet_inputs), target)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
            assert not any(p.grad is not None for p in model.get_base_model().parameters() if not p.requires_grad)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-4 * losses[0], losses


def test_unet_exemplar_errors_and_mixed_batches(unet_inputs) -> None:
    model = pk.adapt(_unet(), am.AMAdapterConfig())
    model.add_adapter("other", am.AMAdapterConfig(seed=1))
    tokens = am.capture_exemplar(model, lambda u: _run(u, unet_inputs, "x_e"))
    with pytest.raises(InvalidConfigError, match="missing"):
        am.set_exemplar(model, dict(list(tokens.items())[1:]))
    with pytest.raises(InvalidConfigError, match="both"):
        am.set_exemplar(model, tokens, target_labels=unet_inputs["lt"])
    am.set_exemplar(model, {p: t[:, :-1] for p, t in tokens.items()})
    with torch.no_grad(), pytest.raises(InvalidConfigError, match="exemplar must have the target's size"):
        _run(model, unet_inputs)
    am.set_exemplar(model, tokens)  # one exemplar per row: a mixed batch cannot tell an adapter which rows it runs
    with torch.no_grad(), pytest.raises(AdapterIdsError, match="subset of the rows"):
        model(unet_inputs["x"], 10, encoder_hidden_states=unet_inputs["text"], adapter_ids=[0, 1])
    am.set_exemplar(model, {p: t[:1] for p, t in tokens.items()})  # one exemplar shared by all rows
    with torch.no_grad():
        mixed = model(unet_inputs["x"], 10, encoder_hidden_states=unet_inputs["text"], adapter_ids=[0, 1]).sample
        rows = []
        for name in ("default", "other"):
            model.set_adapter(name)
            rows.append(_run(model, unet_inputs))
    close(mixed[0], rows[0][0])
    close(mixed[1], rows[1][1])


def test_unet2d_attention_on_maps_with_group_norm_and_residual() -> None:
    """``UNet2DModel``'s attention blocks take ``[B, C, H, W]`` maps, with a group norm, a residual connection and
    2 heads: with the target as its own exemplar and zero encoders the adapted U-Net is the base."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
    ).eval()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        base = unet(x, 5).sample
    model = pk.adapt(unet, am.AMAdapterConfig(targets=r".*attentions\.\d+", without_exemplar="self"))
    assert len(model.adapter_modules("default")) == 4
    assert model.trainable_parameters().trainable == 4 * am.encoder_params(2, [16, 32, 16], 3)
    with torch.no_grad():
        shifted = model(x, 5).sample
        for adapter in model.adapter_modules("default").values():
            for p in adapter.parameters():
                p.zero_()
        close(model(x, 5).sample, base)
    assert (shifted - base).abs().max() > 1e-3 * base.abs().max()
