"""The GPTQ solve against round-to-nearest on real SmolLM2 activations, and its edge cases."""

import pytest
import torch

from quantizer.config import QuantConfig
from quantizer.errors import ConfigError
from quantizer.gptq import gptq_quantize, inverse_hessian_cholesky
from quantizer.hessian import HessianAccumulator
from quantizer.result import row_output_errors
from quantizer.rtn import rtn_quantize


def _hessian(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[1])
    for part in x.split(100):
        acc.add(part)
    return acc.hessian()


def _relative_output_error(w, w_q, x):
    return float((x @ (w - w_q).t()).norm() / (x @ w.t()).norm())


@pytest.mark.parametrize("which", ["attn", "down"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_loss_below_rtn(captured_layer, which, bits, sym):
    w, x = captured_layer[which]
    h = _hessian(x)
    cfg = QuantConfig(bits=bits, group_size=64, sym=sym, desc_act=True)
    gptq = gptq_quantize(w, h, cfg)
    rtn = rtn_quantize(w, cfg, h)
    assert gptq.loss < rtn.loss
    # the reported loss is the real mean squared output error per token (H = 2/n ΣXᵀX)
    measured = float(((x @ (w - gptq.dequantize()).t()) ** 2).sum(dim=1).mean())
    assert gptq.loss == pytest.approx(measured, rel=1e-3)


@pytest.mark.parametrize("settings", [{"desc_act": True}, {"desc_act": False}, {"act_group_aware": False},
                                      {"desc_act": True, "static_groups": True}, {"group_size": -1}])
def test_reported_row_losses_are_the_measured_output_errors(captured_layer, settings):
    # the solve reports the loss from its own error terms; it must equal ΔW H ΔWᵀ / 2 row by row
    w, x = captured_layer["attn"]
    h = _hessian(x)
    result = gptq_quantize(w, h, QuantConfig(**{"bits": 3, "group_size": 64, "sym": False, **settings}))
    measured = row_output_errors(w, result.dequantize(), h)
    torch.testing.assert_close(result.row_losses, measured, rtol=2e-3, atol=1e-6 * float(measured.max()))
    assert result.loss == pytest.approx(float(measured.sum()), rel=1e-3)


@pytest.mark.parametrize("which", ["attn", "down"])
def test_group_aware_order_beats_natural_order_at_no_layout_cost(captured_layer, which):
    w, x = captured_layer[which]
    h = _hessian(x)
    natural = gptq_quantize(w, h, QuantConfig(bits=4, group_size=64, act_group_aware=False))
    group_aware = gptq_quantize(w, h, QuantConfig(bits=4, group_size=64, act_group_aware=True))
    # measured from the stored codes/scales/g_idx: a group given another group's grid would blow this up
    measured = float(row_output_errors(w, group_aware.dequantize(), h).sum())
    assert measured < float(row_output_errors(w, natural.dequantize(), h).sum())
    # groups stay contiguous and in column order: a plain desc_act=False checkpoint
    assert torch.equal(group_aware.g_idx, (torch.arange(w.shape[1]) // 64).int())


def test_inverse_hessian_factor_matches_the_reference_construction():
    torch.manual_seed(0)
    x = torch.randn(2048, 600) @ torch.randn(600, 600)
    h = 2 * x.t() @ x / 2048
    upper, fallback, lam = inverse_hessian_cholesky(h, 0.01)
    damped = h.double() + lam * torch.eye(600, dtype=torch.float64)
    reference = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    assert fallback == "" and lam == pytest.approx(0.01 * float(torch.diag(h).mean()), rel=1e-5)
    assert torch.equal(upper, torch.triu(upper))
    torch.testing.assert_close(upper.double(), reference, rtol=0, atol=2e-4 * float(reference.abs().max()))


def test_8bit_is_nearly_exact(captured_layer):
    w, x = captured_layer["attn"]
    result = gptq_quantize(w, _hessian(x), QuantConfig(bits=8, group_size=64))
    assert _relative_output_error(w, result.dequantize(), x) < 5e-3


@pytest.mark.parametrize("desc_act,static_groups", [(False, False), (True, False), (True, True)])
def test_act_order_variants_keep_group_layout(captured_layer, desc_act, static_groups):
    w, x = captured_layer["attn"]
    cfg = QuantConfig(bits=4, group_size=64, desc_act=desc_act, static_groups=static_groups)
    result = gptq_quantize(w, _hessian(x), cfg)
    counts = torch.bincount(result.g_idx.long())
    assert counts.tolist() == [64] * (w.shape[1] // 64)  # every group holds exactly group_size columns
    if not desc_act or static_groups:
        assert torch.equal(result.g_idx, (torch.arange(w.shape[1]) // 64).int())
    assert result.loss < rtn_quantize(w, cfg, _hessian(x)).loss


def test_dead_inputs_get_zero_weights():
    torch.manual_seed(0)
    x = torch.randn(512, 64)
    x[:, 5] = 0
    w = torch.randn(32, 64)
    result = gptq_quantize(w, _hessian(x), QuantConfig(bits=4, group_size=32))
    assert torch.isfinite(result.dequantize()).all()
    assert (result.dequantize()[:, 5] == 0).all()  # no error feedback reaches a dead column


def test_group_size_must_divide_inputs():
    with pytest.raises(ConfigError, match="does not divide in_features=576"):
        QuantConfig(group_size=128).check_in_features("q_proj", 576)


@pytest.mark.parametrize("bad", [{"bits": 5}, {"group_size": 48}, {"damp_percent": 0}, {"method": "awq"}])
def test_bad_settings_are_rejected(bad):
    with pytest.raises(ConfigError):
        QuantConfig(**bad)


def test_hessian_masks_padding():
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    acc = HessianAccumulator(8)
    acc.add(x, mask)
    kept = x[mask]
    assert acc.count == 8
    torch.testing.assert_close(acc.hessian(), 2 * kept.t() @ kept / 8)


def test_ill_conditioned_hessian_falls_back_and_says_so():
    torch.manual_seed(0)
    x = torch.randn(64, 8) @ torch.randn(8, 64)  # rank 8 of 64: H is singular
    h = 2 * x.t() @ x / 64  # with almost no dampening, float32 round-off makes it indefinite
    result = gptq_quantize(torch.randn(16, 64), h, QuantConfig(bits=4, group_size=32, damp_percent=1e-9))
    assert result.cholesky_fallback.startswith("float64")
    assert torch.isfinite(result.dequantize()).all()


def test_solve_order_is_recorded_in_quantization_config():
    assert QuantConfig(desc_act=False).to_hf()["meta"]["act_group_aware"] is True
    assert QuantConfig(desc_act=True).to_hf()["meta"]["act_group_aware"] is False  # act-order takes precedence
    assert QuantConfig(act_group_aware=False).to_hf()["meta"]["act_group_aware"] is False


@pytest.mark.parametrize("bits,group_size,desc_act,static_groups,sym", [
    (4, 64, False, False, True), (4, 64, True, False, True), (4, 64, True, True, False), (3, -1, False, False, False),
    (2, 32, True, False, True), (8, 128, False, False, True)])
def test_row_shares_solved_apart_are_the_bits_of_one_solve(bits, group_size, desc_act, static_groups, sym):
    """Data-parallel workers each solve a share of a unit's rows against the same factorization: merged in
    row order they are the whole solve's codes, grids and per-row losses, bit for bit — on row counts that are
    not multiples of the share alignment, and whatever the number of shares."""
    from quantizer.gptq import factorize
    from quantizer.solvers import SHARE_ALIGN, SolveJob, merge_rows, row_shares, run_job, solve_share

    torch.manual_seed(0)
    cfg = QuantConfig(bits=bits, group_size=group_size, desc_act=desc_act, static_groups=static_groups, sym=sym)
    x = torch.randn(2048, 256) * torch.linspace(0.1, 3, 256)
    fact = factorize(2 * x.T @ x / 2048, cfg)
    for rows in (1000, 640, 200):
        job = SolveJob(("w",), torch.randn(rows, 256), fact)
        whole = run_job(job, cfg)
        for parts in (2, 3, 8):
            shares = row_shares(rows, parts)
            assert [s.start % SHARE_ALIGN for s in shares] == [0] * len(shares)
            assert all(s.stop - s.start >= SHARE_ALIGN for s in shares) and shares[-1].stop == rows
            merged = merge_rows([solve_share(job, cfg, k, parts) for k in range(len(shares))])
            assert solve_share(job, cfg, len(shares), parts) is None
            for field in ("codes", "scales", "zeros", "g_idx", "row_losses"):
                assert torch.equal(getattr(merged, field), getattr(whole, field)), (rows, parts, field)
            assert merged.loss == pytest.approx(whole.loss, rel=1e-6)


def _textbook_subblock(w, hinv, scale, zero, codes, err, maxq):
    """The per-column loop as the GPTQ reference writes it: quantize, dequantize, scaled error, rank-1 update
    (written as ours is, one fused op: as `w -= outer(h, e)` it rounds differently in the last bit)."""
    from quantizer.grid import dequantize_codes, quantize_codes

    for c in range(w.shape[0]):
        s, z = (scale[c], zero[c]) if scale.dim() == 2 else (scale, zero)
        q = quantize_codes(w[c], s, z, maxq)
        codes[c] = q
        err[c] = (w[c] - dequantize_codes(q, s, z)) / hinv[c, c]
        w[c + 1:].addr_(hinv[c, c + 1:], err[c], alpha=-1)


@pytest.mark.parametrize("settings", [{"bits": 4, "sym": True, "desc_act": True, "static_groups": True},
                                      {"bits": 3, "sym": False, "desc_act": False}, {"bits": 2, "sym": False}])
def test_the_column_loop_gives_the_textbook_loops_bits(captured_layer, settings, monkeypatch):
    # the CPU loop rounds straight to q − z in fewer torch calls per column: codes, grids and losses stay the same
    from quantizer import gptq

    w, x = captured_layer["attn"]
    h = _hessian(x)
    cfg = QuantConfig(group_size=64, **settings)
    ours = gptq_quantize(w, h, cfg)
    monkeypatch.setattr(gptq, "subblock_solver", lambda device: _textbook_subblock)
    textbook = gptq_quantize(w, h, cfg)
    assert ours.codes.equal(textbook.codes) and ours.scales.equal(textbook.scales)
    assert ours.zeros.equal(textbook.zeros) and ours.loss == textbook.loss
