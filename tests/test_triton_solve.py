"""The fused Triton sub-block kernel of the GPTQ solve equals the torch column loop (Triton's CPU interpreter)."""

import functools
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs a GPU or TRITON_INTERPRET=1 (set in conftest.py)")

pytest.importorskip("triton")

import quantizer.gptq as gptq  # noqa: E402
from quantizer.config import QuantConfig  # noqa: E402
from quantizer.kernels.triton_gptq_solve import quantize_subblock  # noqa: E402
from quantizer.result import row_output_errors  # noqa: E402


def _problem(out_f: int, in_f: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * in_f, in_f, generator=g) @ torch.randn(in_f, in_f, generator=g) / in_f**0.5
    return torch.randn(out_f, in_f, generator=g) * 0.05, 2 * x.t() @ x / x.shape[0]


@pytest.mark.parametrize("n,out_f", [(16, 200), (5, 130), (1, 64)])
def test_subblock_kernel_matches_torch_loop(n, out_f):
    w, h = _problem(out_f, 32)
    upper, _, _ = gptq.inverse_hessian_cholesky(h, 0.01)
    wt = w.t()[:n].contiguous()
    scale = torch.rand(out_f) * 0.01 + 0.005
    zero = torch.randint(0, 16, (out_f,)).float()
    results = []
    for solver in (gptq.quantize_subblock_torch, functools.partial(quantize_subblock, sub=16)):
        codes = torch.full((n, out_f), 255, dtype=torch.uint8)  # poisoned: every code must be written
        err = torch.full((n, out_f), float("nan"))
        solver(wt.clone(), upper[:n, :n], scale, zero, codes, err, 15)
        results.append((codes, err))
    (codes_t, err_t), (codes_k, err_k) = results
    assert (codes_t != codes_k).float().mean() < 1e-3  # a rounding tie may land apart after fp reassociation
    torch.testing.assert_close(err_k[codes_t == codes_k], err_t[codes_t == codes_k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("settings", [{"desc_act": True, "sym": False}, {"act_group_aware": True},
                                      {"desc_act": True, "static_groups": True}, {"group_size": -1, "bits": 3}])
def test_solve_with_kernel_matches_torch_solve(monkeypatch, settings):
    w, h = _problem(96, 256, seed=1)
    cfg = QuantConfig(**{"bits": 4, "group_size": 64, **settings})
    reference = gptq.gptq_quantize(w, h, cfg)
    monkeypatch.setattr(gptq, "subblock_solver", lambda device: functools.partial(quantize_subblock, sub=16))
    fused = gptq.gptq_quantize(w, h, cfg)
    assert torch.equal(fused.g_idx, reference.g_idx)
    assert (fused.codes != reference.codes).float().mean() < 2e-3
    measured = float(row_output_errors(w, fused.dequantize(), h).sum())
    assert measured == pytest.approx(reference.loss, rel=1e-3)
    assert fused.loss == pytest.approx(measured, rel=1e-3)
