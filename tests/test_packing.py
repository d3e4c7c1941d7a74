"""GPTQ v1 packing: bit-exact round trips, the v1 zero convention, and AutoGPTQ's 3-bit layout."""

import numpy as np
import pytest
import torch

from quantizer.config import QuantConfig
from quantizer.gptq import gptq_quantize
from quantizer.packing import pack_bits, pack_result, unpack_bits, unpack_result
from quantizer.rtn import rtn_quantize


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_bits_round_trip(bits):
    values = torch.randint(0, 2**bits, (256, 24))
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (256 * bits // 32, 24)
    assert torch.equal(unpack_bits(packed, bits, 256), values)


def _autogptq_pack_3bit(intweight: np.ndarray) -> np.ndarray:
    """AutoGPTQ's 3-bit packing loop (independent oracle): intweight [in, out] → [in·3/32, out]."""
    qweight = np.zeros((intweight.shape[0] // 32 * 3, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        for j in range(i, i + 10):
            qweight[row] |= intweight[j] << (3 * (j - i))
        i += 10
        qweight[row] |= intweight[i] << 30
        row += 1
        qweight[row] |= (intweight[i] >> 2) & 1
        i += 1
        for j in range(i, i + 10):
            qweight[row] |= intweight[j] << (3 * (j - i) + 1)
        i += 10
        qweight[row] |= intweight[i] << 31
        row += 1
        qweight[row] |= (intweight[i] >> 1) & 0x3
        i += 1
        for j in range(i, i + 10):
            qweight[row] |= intweight[j] << (3 * (j - i) + 2)
        i += 10
        row += 1
    return qweight.astype(np.int32)


def test_3bit_layout_matches_autogptq():
    values = torch.randint(0, 8, (64, 5))
    expected = _autogptq_pack_3bit(values.numpy().astype(np.uint32))
    assert np.array_equal(pack_bits(values, 3).numpy(), expected)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_whole_field_layout_matches_autogptq(bits):
    """2/4/8 bits (each word holds whole fields, packed by shifting in place): value j of a word's column
    sits at bits j·bits up — AutoGPTQ's `qweight[row] |= intweight[j] << (bits * (j - i))` loop."""
    values = torch.randint(0, 2**bits, (64, 5))
    per = 32 // bits
    expected = np.zeros((64 // per, 5), dtype=np.uint32)
    for row in range(64 // per):
        for j in range(per):
            expected[row] |= values[row * per + j].numpy().astype(np.uint32) << np.uint32(bits * j)
    assert np.array_equal(pack_bits(values, bits).numpy(), expected.astype(np.int32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
@pytest.mark.parametrize("desc_act", [False, True])
def test_quant_result_round_trips_bit_for_bit(bits, group_size, desc_act):
    torch.manual_seed(bits * 100 + group_size)
    w = torch.randn(96, 256)
    x = torch.randn(600, 256) * torch.linspace(0.1, 3, 256)
    cfg = QuantConfig(bits=bits, group_size=group_size, desc_act=desc_act, sym=False)
    result = gptq_quantize(w, 2 * x.t() @ x / 600, cfg)
    back = unpack_result(pack_result(result, bits))
    assert torch.equal(back.codes, result.codes)
    assert torch.equal(back.zeros, result.zeros)
    assert torch.equal(back.scales, result.scales)
    assert torch.equal(back.g_idx, result.g_idx)
    assert torch.equal(back.dequantize(), result.dequantize())


def test_v1_zero_convention_for_sym_4bit():
    result = rtn_quantize(torch.randn(64, 128), QuantConfig(bits=4, group_size=64, sym=True))
    packed = pack_result(result, 4)
    assert packed.qzeros.shape == (2, 64 * 4 // 32)
    assert (packed.qzeros == 0x77777777).all()  # true zero 8 stored as 8 − 1 in every nibble
    assert packed.qweight.shape == (128 * 4 // 32, 64)
    assert packed.scales.dtype == torch.float16 and packed.g_idx.dtype == torch.int32
