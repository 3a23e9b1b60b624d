"""``peftkit.merge.cma``: the CMA-ES behind LoraHub."""

from __future__ import annotations

import numpy as np

from peftkit.merge.cma import cma_es


def _shifted_sphere(x: np.ndarray) -> float:
    return float(((x - np.array([0.5, -1.0, 0.25, 1.0, -0.75])) ** 2).sum())


def test_converges_on_a_quadratic_within_bounds() -> None:
    seen: list[np.ndarray] = []

    def f(x: np.ndarray) -> float:
        seen.append(x.copy())
        return _shifted_sphere(x)

    found = cma_es(f, np.zeros(5), 0.5, lower=-1.5, upper=1.5, budget=400, seed=0)
    assert found.value < 1e-4 and _shifted_sphere(found.x) == found.value
    assert len(found.history) == len(seen) == 400 and min(found.history) == found.value
    assert all(np.all(x >= -1.5) and np.all(x <= 1.5) for x in seen)
    # an optimum outside the box: the search ends on its face
    edge = cma_es(lambda x: float(((x - 3.0) ** 2).sum()), np.zeros(3), 0.5, lower=-1.5, upper=1.5, budget=200)
    np.testing.assert_allclose(edge.x, 1.5, atol=1e-3)


def test_same_seed_same_search() -> None:
    a = cma_es(_shifted_sphere, np.zeros(5), 0.5, lower=-1.5, upper=1.5, budget=40, seed=7)
    b = cma_es(_shifted_sphere, np.zeros(5), 0.5, lower=-1.5, upper=1.5, budget=40, seed=7)
    c = cma_es(_shifted_sphere, np.zeros(5), 0.5, lower=-1.5, upper=1.5, budget=40, seed=8)
    assert a.history == b.history and a.history != c.history and len(a.history) == 40
