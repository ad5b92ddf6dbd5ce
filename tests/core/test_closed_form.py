import torch

from mace_core.closed_form import Moments, apply_transform, refine_transform


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
