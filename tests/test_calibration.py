"""Hessians collected by the calibration hooks: H = 2·XᵀX summed over samples, one product shared by Linears that
read the same tensor, each Linear seeing its own input."""

import torch

from sage_export.pipeline.calibration import _hessian_hooks, averaged_hessians


class TwoBranch(torch.nn.Module):
    """a and b read the same tensor (like q/k/v); c reads a's output (like down_proj)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 5, bias=False)
        self.b = torch.nn.Linear(8, 3, bias=False)
        self.c = torch.nn.Linear(5, 4, bias=False)

    def forward(self, x):
        y, z = self.a(x), self.b(x)  # b right after a on the same tensor, as k_proj after q_proj
        return self.c(y) + z.sum(-1, keepdim=True)


def test_hessians_match_direct_sum_over_samples():
    torch.manual_seed(0)
    block = TwoBranch()
    samples = [torch.randn(1, 6, 8) for _ in range(3)]
    store, counts = {}, {}
    handles = _hessian_hooks(block, ("a", "b", "c"), store, counts)
    with torch.no_grad():
        for x in samples:
            block(x)
    for h in handles:
        h.remove()
    xs = torch.cat([x.reshape(-1, 8) for x in samples]).double()
    hs = torch.cat([block.a(x).reshape(-1, 5) for x in samples]).detach().double()
    torch.testing.assert_close(store["a"], 2 * xs.T @ xs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(store["b"], store["a"], rtol=0, atol=0)
    torch.testing.assert_close(store["c"], 2 * hs.T @ hs, rtol=1e-6, atol=1e-6)
    assert counts == {"a": 18, "b": 18, "c": 18}
    assert store["a"].dtype == torch.float64
    # Shared, not copied: one accumulator for a and b, and their averages are one array too.
    assert store["a"] is store["b"] and store["c"] is not store["a"]
    expected = {name: (store[name] / counts[name]).numpy() for name in store}
    averaged = averaged_hessians(store, counts)
    assert averaged["a"] is averaged["b"]
    assert all((averaged[name] == expected[name]).all() for name in expected)  # to the bit
