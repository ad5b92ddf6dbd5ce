import torch

from mace_core.closed_form import Moments, apply_transform, preserve_scale, refine_transform


def _data(n=400, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    p = torch.randn(3 * n, d, generator=g, dtype=torch.float64)
    return x, y, p


def test_refine_matches_direct_least_squares():
    """W0 T equals the stacked least-squares solution of the refine objective, layer by layer."""
    x, y, p = _data()
    d = x.shape[1]
    m = Moments(d).add(x, y)
    prior = (p.T @ p) / p.shape[0]
    s, lam = 0.7, 0.05
    t = refine_transform(m, prior, s, lam)
    lam_eff = lam * float(torch.trace(m.gram)) / d
    g = torch.Generator().manual_seed(1)
    for out_dim in (5, 17):
        w0 = torch.randn(out_dim, d, generator=g, dtype=torch.float64)
        # Stack: rows x -> W0 y, sqrt(s*N/Np) p -> W0 p, sqrt(lam) e_j -> W0 e_j, solve W^T by lstsq.
        wp = (s * m.count / p.shape[0]) ** 0.5
        inputs = torch.cat([x, wp * p, lam_eff**0.5 * torch.eye(d, dtype=torch.float64)])
        targets = torch.cat([y @ w0.T, wp * p @ w0.T, lam_eff**0.5 * w0.T])
        direct = torch.linalg.lstsq(inputs, targets).solution.T
        ours = w0 + apply_transform(w0, t).double()
        rel = (ours - direct).norm() / direct.norm()
        assert rel < 1e-5, rel


def test_moments_stream_equals_batch():
    x, y, _ = _data()
    whole = Moments(x.shape[1]).add(x, y)
    parts = Moments(x.shape[1])
    for i in range(0, len(x), 37):
        parts.add(x[i:i + 37], y[i:i + 37])
    assert torch.allclose(whole.gram, parts.gram) and torch.allclose(whole.cross, parts.cross)
    assert parts.count == len(x)


def test_no_prior_no_ridge_maps_exactly_when_determined():
    x, _, _ = _data(n=200, d=8)
    t_true = torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = x @ t_true.T  # targets are an exact linear map of the inputs
    t = refine_transform(Moments(8).add(x, y), None, 0.0, 0.0)
    assert torch.allclose(t, t_true, atol=1e-8)


def test_the_preserve_list_weighs_as_the_papers_configs_weigh_it():
    """The paper's celebrity configs (one domain cache) set preserve_weight 8e3, 5e4, 8e4 and 2e5 at 1, 5, 10 and
    100 erased. The concepts' own statistics grow in proportion to the count, so what is left for the rule is the
    weight per erased concept relative to ten's: 1 up to ten, then 2e5 / 100 against 8e4 / 10 at a hundred."""
    assert [preserve_scale(n) for n in (1, 5, 10)] == [1.0, 1.0, 1.0]
    assert abs(preserve_scale(100) - (2e5 / 100) / (8e4 / 10)) < 1e-3
    assert abs(100 * preserve_scale(100) / (10 * preserve_scale(10)) - 2e5 / 8e4) < 1e-9
    steps = [preserve_scale(n) for n in (10, 11, 25, 50, 100, 1000)]
    assert all(a > b for a, b in zip(steps, steps[1:]))
    assert all(n * preserve_scale(n) < (n + 1) * preserve_scale(n + 1) for n in range(1, 300))  # the weight still grows
