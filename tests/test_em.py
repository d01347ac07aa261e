"""EM bases against an independent float64 implementation of the paper's formulas."""

import pytest
import torch

from stem.em import estimate_bases, init_bases
from stem.em_reference import reference_em as reference, responsibilities


def reference_em(keys, values, init, num_iters, tau=0.01):
    """The formulas written out in float64 with full (B, L, K) responsibilities (`stem.em_reference`)."""
    key_bases, value_bases, _ = reference(keys, init, num_iters, tau, values)
    return key_bases, value_bases


@pytest.mark.parametrize("B,L,C,Cv,K,R", [(2, 50, 8, 8, 4, 1), (3, 200, 16, 12, 16, 5), (1, 333, 5, 7, 32, 3)])
@pytest.mark.parametrize("chunk_elements", [1 << 24, 97])  # one chunk, and many ragged chunks
@pytest.mark.parametrize("gpu_layout", [False, True])  # the M-step as on the CPU, or as on GPUs (token slices)
def test_matches_float64_reference(B, L, C, Cv, K, R, chunk_elements, gpu_layout):
    g = torch.Generator().manual_seed(B * L)
    keys = torch.randn(B, L, C, generator=g) * 0.3
    values = torch.randn(B, L, Cv, generator=g)
    init = init_bases(keys, K, torch.Generator().manual_seed(1))
    key_bases, value_bases = estimate_bases(keys, values, K, R, init=init, chunk_elements=chunk_elements,
                                            gpu_layout=gpu_layout)
    ref_k, ref_v = reference_em(keys, values, init, R)
    assert key_bases.shape == (B, K, C) and value_bases.shape == (B, K, Cv)
    assert key_bases.dtype == torch.float32
    torch.testing.assert_close(key_bases.double(), ref_k, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(value_bases.double(), ref_v, rtol=1e-4, atol=1e-5)


def test_half_precision_inputs_run_in_float32():
    keys = torch.randn(2, 64, 8).half()
    values = torch.randn(2, 64, 8).half()
    init = init_bases(keys, 4, torch.Generator().manual_seed(0))
    key_bases, value_bases = estimate_bases(keys, values, 4, 3, init=init)
    ref_k, ref_v = reference_em(keys.float(), values.float(), init, 3)
    assert key_bases.dtype == value_bases.dtype == torch.float32
    torch.testing.assert_close(key_bases.double(), ref_k, rtol=1e-4, atol=1e-5)


def test_responsibilities_sum_to_one_over_bases():
    keys, bases = torch.randn(3, 100, 8), torch.randn(3, 10, 8)
    z = responsibilities(keys, bases)
    assert z.shape == (3, 100, 10)
    torch.testing.assert_close(z.sum(-1), torch.ones(3, 100, dtype=z.dtype))
    assert (z >= 0).all()


def test_init_uses_each_channels_statistics():
    keys = torch.randn(1, 5000, 3) * torch.tensor([1.0, 5.0, 0.1]) + torch.tensor([10.0, -3.0, 0.0])
    bases = init_bases(keys, 4000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(bases.mean(1), keys.mean(1), rtol=0.1, atol=0.05)
    torch.testing.assert_close(bases.std(1), keys.std(1), rtol=0.1, atol=0.05)


def test_deterministic_with_a_generator():
    keys, values = torch.randn(2, 300, 8), torch.randn(2, 300, 8)
    run = lambda seed: estimate_bases(keys, values, 16, 3, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_well_separated_clusters_are_found():
    # Keys drawn around 3 distinct directions: with 3 bases, EM recovers the cluster means.
    centres = torch.eye(3, 8) * 4
    labels = torch.arange(600) % 3
    keys = (centres[labels] + 0.05 * torch.randn(600, 8))[None]
    init = centres[None] + 0.5 * torch.randn(1, 3, 8)
    key_bases, value_bases = estimate_bases(keys, keys, 3, 5, init=init)
    torch.testing.assert_close(key_bases[0], centres, atol=0.02, rtol=0)
    torch.testing.assert_close(value_bases[0], centres, atol=0.02, rtol=0)


def test_rejects_zero_bases_or_iterations():
    with pytest.raises(ValueError):
        estimate_bases(torch.randn(1, 4, 2), torch.randn(1, 4, 2), 0, 1)
    with pytest.raises(ValueError):
        estimate_bases(torch.randn(1, 4, 2), torch.randn(1, 4, 2), 2, 0)
