"""FAIG's CPU path (a module copy, fused weight updates, autograd accumulation) gives captum's numbers."""
import pytest
import torch

from causalir import attribution as A
from causalir import models


def _pair():
    torch.manual_seed(0)
    base = models.build("srresnet", nf=8, nb=1).eval()
    tgt = models.build("srresnet", nf=8, nb=1).eval()
    with torch.no_grad():
        for p in tgt.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    return tgt, base, torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 16, 16, generator=g)


@pytest.mark.parametrize("method", ["riemann_right", "riemann_left", "riemann_middle"])
def test_the_cpu_loop_equals_captum(method):
    tgt, base, x, y = _pair()
    before = {k: v.clone() for k, v in tgt.state_dict().items()}
    loop = A.faig_attributions(tgt, base, x, y, 6, kernels_only=False, method=method)              # CPU default
    cap = A.faig_attributions(tgt, base, x, y, 6, kernels_only=False, method=method, vectorize=False)  # captum
    for n in cap.attributions:
        torch.testing.assert_close(loop.attributions[n], cap.attributions[n], rtol=1e-4, atol=1e-6)
    for a, b in zip(loop.per_image_scores, cap.per_image_scores):
        for n in b:
            torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loop.delta, cap.delta, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(loop.loss_target, cap.loss_target)
    torch.testing.assert_close(loop.loss_baseline, cap.loss_baseline)
    assert all(torch.equal(v, tgt.state_dict()[k]) for k, v in before.items())  # the target is not touched


def test_completeness_holds_on_the_loop_path():
    """sum(attr) ~= L(theta_t) - L(theta_b) (IG completeness), better with more steps."""
    tgt, base, x, y = _pair()
    runs = [A.faig_attributions(tgt, base, x[:1], y[:1], n, kernels_only=False) for n in (4, 32, 256)]
    d = [float(r.delta.abs()) for r in runs]
    gap = float((runs[0].loss_target - runs[0].loss_baseline).abs())
    assert d[0] > d[1] > d[2] and d[2] < 0.02 * gap  # the Riemann error falls like 1/N
