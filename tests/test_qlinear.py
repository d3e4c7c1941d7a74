"""QuantLinear computes x @ dequant(W)ᵀ + b from packed tensors, close to the float layer."""

import torch

from quantizer.config import QuantConfig
from quantizer.gptq import gptq_quantize
from quantizer.hessian import HessianAccumulator
from quantizer.packing import pack_result
from quantizer.qlinear import QuantLinear


def _quantize(linear: torch.nn.Linear, x: torch.Tensor, cfg: QuantConfig):
    acc = HessianAccumulator(linear.in_features)
    acc.add(x)
    return gptq_quantize(linear.weight.detach(), acc.hessian(), cfg)


def test_quantlinear_matches_dequantized_weight_and_float_layer(captured_layer):
    w, x = captured_layer["down"]
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=True)
    with torch.no_grad():
        linear.weight.copy_(w)
        linear.bias.normal_()
    for bits, tolerance in ((8, 0.01), (4, 0.15)):
        result = _quantize(linear, x, QuantConfig(bits=bits, group_size=64))
        qlinear = QuantLinear.from_packed(pack_result(result, bits), 64, linear.bias)
        with torch.inference_mode():
            y_q = qlinear(x)
            y_ref = torch.nn.functional.linear(x, result.dequantize(), linear.bias.half().float())
            y_float = linear(x)
        torch.testing.assert_close(y_q, y_ref)
        assert float((y_q - y_float).norm() / y_float.norm()) < tolerance


def test_quantlinear_state_dict_round_trip():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64, bias=False)
    result = _quantize(linear, torch.randn(300, 128), QuantConfig(bits=3, group_size=32, desc_act=True))
    a = QuantLinear.from_packed(pack_result(result, 3), 32, None)
    b = QuantLinear(3, 32, 128, 64, bias=False)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 128)
    assert torch.equal(a(x), b(x))
    assert set(a.state_dict()) == {"qweight", "qzeros", "scales", "g_idx"}
