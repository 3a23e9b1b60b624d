"""CLIP2Point's Dual-Path Adapter on two tiny CLIP vision encoders built from a config: the adapter against an
independent re-implementation of the official ``SimplifiedAdapter``, unit-norm fused features, the parameter
count, frozen encoders, logits against class-prompt embeddings, and training on a toy task."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import peftkit as pk
from peftkit.errors import InvalidConfigError, UnsupportedLayerError
from peftkit.methods.clip2point import (
    CLIP2PointAdapter,
    CLIP2PointConfig,
    DualPathAdapter,
    class_logits,
    dual_path,
    object_features,
)

pytestmark = pytest.mark.usefixtures("one_thread")

V, P, SIDE = 4, 16, 16  # views, projection width, render side


def clip_encoder(seed: int) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=SIDE,
        patch_size=8,
        projection_dim=P,
        num_channels=3,
    )
    return CLIPVisionModelWithProjection(cfg).eval()


def renders(objects: int = 6, seed: int = 1) -> Tensor:
    """Depth-render-like inputs: ``[objects, V, 3, SIDE, SIDE]`` (one grey channel repeated, as CLIP2Point feeds
    its depth maps)."""
    depth = torch.rand(objects, V, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))
    return depth.expand(-1, -1, 3, -1, -1).contiguous()


def dual(**fields: object) -> DualPathAdapter:
    config = CLIP2PointConfig(views=V, **fields)  # type: ignore[arg-type]
    return DualPathAdapter(pk.adapt(clip_encoder(0), config), pk.adapt(clip_encoder(1), config), views=V)


def path_adapter(model: pk.AdaptedModel) -> CLIP2PointAdapter:
    (adapter,) = model.adapter_modules("default").values()
    assert isinstance(adapter, CLIP2PointAdapter)
    return adapter


class ReferenceAdapter(nn.Module):
    """The official ``SimplifiedAdapter``'s structure, written out independently (spec: ω ⊙ F, BN1d over all
    views, dropout, flatten, Linear(V·p→p), BN1d, ReLU, dropout, Linear(p→p))."""

    def __init__(self, views: int, p: int) -> None:
        super().__init__()
        self.views, self.p = views, p
        self.w = nn.Parameter(torch.full((views,), 0.5))
        self.bn1, self.bn2 = nn.BatchNorm1d(p), nn.BatchNorm1d(p)
        self.fc1, self.fc2 = nn.Linear(views * p, p), nn.Linear(p, p)

    def forward(self, feat: Tensor) -> Tensor:
        f = feat.reshape(-1, self.views, self.p) * self.w.reshape(1, -1, 1)
        n = f.shape[0]
        f = self.bn1(f.reshape(n * self.views, self.p)).reshape(n, self.views * self.p)
        return self.fc2(F.relu(self.bn2(self.fc1(f))))


def _reference_from(adapter: CLIP2PointAdapter) -> ReferenceAdapter:
    ref = ReferenceAdapter(V, P)
    ref.load_state_dict(
        {
            "w": adapter.view_weights,
            **{f"bn1.{k}": t for k, t in adapter.bn1.state_dict().items()},
            **{f"bn2.{k}": t for k, t in adapter.bn2.state_dict().items()},
            **{f"fc1.{k}": t for k, t in adapter.fc1.state_dict().items()},
            **{f"fc2.{k}": t for k, t in adapter.fc2.state_dict().items()},
        }
    )
    return ref


@pytest.mark.parametrize("train", [False, True])
def test_path_matches_the_reference_adapter(train: bool) -> None:
    """One path = the reference head on the frozen encoder's ``V`` view embeddings, written into each view's row;
    in eval mode (running statistics) and in a training step (batch statistics), without dropout."""
    base = clip_encoder(0)
    model = pk.adapt(clip_encoder(0), CLIP2PointConfig(views=V, dropout=0.0))
    adapter = path_adapter(model)
    with torch.no_grad():
        for bn in (adapter.bn1, adapter.bn2):  # running statistics off their init, so eval mode tests them
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 2.0)
        adapter.view_weights.copy_(torch.linspace(0.2, 1.0, V))
    ref = _reference_from(adapter)
    model.train(train)
    ref.train(train)
    x = renders().flatten(0, 1)
    with torch.no_grad():
        feats = base(pixel_values=x).image_embeds
    want = ref(feats)
    got = model(pixel_values=x).image_embeds
    assert got.shape == (6 * V, P)
    torch.testing.assert_close(object_features(got, V), want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
    # every view row of an object carries the object's feature
    torch.testing.assert_close(got.view(6, V, P), want[:, None].expand(-1, V, -1), rtol=0.0, atol=0.0)
    if train:  # the training step updated the running statistics as nn.BatchNorm1d does
        torch.testing.assert_close(adapter.bn1.running_mean, ref.bn1.running_mean)
        torch.testing.assert_close(adapter.bn2.running_var, ref.bn2.running_var)


def test_fused_features_have_unit_norm_and_average_the_paths() -> None:
    head = dual().eval()
    r = renders()
    with torch.no_grad():
        g = head(r)
        flat = r.flatten(0, 1)
        a1 = object_features(head.depth_encoder(pixel_values=flat).image_embeds, V)
        a2 = object_features(head.clip_encoder(pixel_values=flat).image_embeds, V)
    assert g.shape == (6, P)
    torch.testing.assert_close(g.norm(dim=-1), torch.ones(6), rtol=0.0, atol=1e-6)
    mean = (a1 + a2) / 2
    torch.testing.assert_close(g, mean / mean.norm(dim=-1, keepdim=True), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(a1, a2), "the two paths (different encoders and adapters) gave the same features"


def test_trainable_count_is_the_spec_formula() -> None:
    per_path = V + 2 * P + (V * P) * P + P + 2 * P + P * P + P  # spec, with 512 → the projection width
    head = dual()
    assert head.depth_encoder.trainable_parameters().trainable == per_path == 1380
    total = sum(p.numel() for p in head.parameters() if p.requires_grad)
    assert total == 2 * per_path


def test_logits_against_class_prompt_embeddings() -> None:
    """Logits are ``scale`` × the cosine similarity of ``g`` with each class prompt's text embedding (random text
    embeddings stand in for CLIP's text encoder)."""
    head = dual().eval()
    text = torch.randn(5, P, generator=torch.Generator().manual_seed(2)) * 3.0
    with torch.no_grad():
        g = head(renders())
    logits = class_logits(g, text, scale=100.0)
    assert logits.shape == (6, 5)
    cos = F.cosine_similarity(g[:, None], text[None], dim=-1)
    torch.testing.assert_close(logits, 100.0 * cos, rtol=1e-5, atol=1e-4)
    assert logits.abs().max() <= 100.0 + 1e-3  # unit vectors: |cos| ≤ 1


def test_training_reduces_the_loss_and_leaves_the_encoders_frozen() -> None:
    """A toy task: 12 objects, 3 classes (labels depend on the mean depth), cross-entropy on the logits against
    fixed random class embeddings; AdamW on the adapters only. The encoders get no gradients."""
    torch.set_num_threads(1)
    head = dual().train()
    r = renders(12, seed=3)
    r[:4] *= 0.2
    r[8:] = 1.0 - 0.5 * r[8:]
    labels = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
    text = torch.randn(3, P, generator=torch.Generator().manual_seed(4))
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(class_logits(head(r), text, scale=10.0), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    for enc in (head.depth_encoder, head.clip_encoder):
        frozen = [p for p in enc.get_base_model().parameters() if not p.requires_grad]
        assert frozen and all(p.grad is None for p in frozen)
    assert all(p.grad is not None for p in params)


def test_errors_name_the_problem() -> None:
    model = pk.adapt(clip_encoder(0), CLIP2PointConfig(views=V))
    with pytest.raises(InvalidConfigError, match=r"views=4 .* has 6 rows"):
        model(pixel_values=torch.rand(6, 3, SIDE, SIDE))
    with pytest.raises(UnsupportedLayerError):  # not a Linear projection
        pk.adapt(clip_encoder(0), CLIP2PointConfig(targets=["embeddings.patch_embedding"]))
    one = pk.adapt(clip_encoder(0), CLIP2PointConfig(views=V)).train()
    with pytest.raises(InvalidConfigError, match="at least 2 objects"):
        one(pixel_values=torch.rand(V, 3, SIDE, SIDE))
    with pytest.raises(InvalidConfigError, match="views=3"):
        DualPathAdapter(model, pk.adapt(clip_encoder(1), CLIP2PointConfig(views=3)), views=V)
    with pytest.raises(InvalidConfigError, match=r"renders must be \[objects, views=4"):
        DualPathAdapter(model, pk.adapt(clip_encoder(1), CLIP2PointConfig(views=V)), views=V)(torch.rand(2, 3, 3, 8, 8))
    with pytest.raises(InvalidConfigError, match="not objects of views=4"):
        dual_path(torch.rand(6, P), torch.rand(6, P), V)
