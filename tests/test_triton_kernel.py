"""The Triton GPTQ kernel equals the torch QuantLinear path, run on CPU by Triton's interpreter."""

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs a GPU or TRITON_INTERPRET=1 (set in conftest.py)")

pytest.importorskip("triton")

from quantizer.config import QuantConfig  # noqa: E402
from quantizer.gptq import gptq_quantize  # noqa: E402
from quantizer.kernels.triton_gptq import gptq_matmul  # noqa: E402
from quantizer.packing import pack_result  # noqa: E402
from quantizer.qlinear import QuantLinear  # noqa: E402


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size,desc_act,sym", [(32, False, True), (64, True, False), (-1, False, False),
                                                     (128, True, True)])
@pytest.mark.parametrize("m,k,n,dtype", [(1, 128, 64, torch.float16), (5, 256, 96, torch.float32),
                                         (33, 256, 160, torch.float16)])
def test_kernel_matches_torch_path(bits, group_size, desc_act, sym, m, k, n, dtype):
    torch.manual_seed(bits + m + k + n)
    w = torch.randn(n, k) * 0.05
    calib = torch.randn(4 * k, k) * torch.linspace(0.2, 2.0, k)
    cfg = QuantConfig(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym)
    result = gptq_quantize(w, 2 * calib.t() @ calib / calib.shape[0], cfg)
    bias = torch.randn(n).half()
    layer = QuantLinear.from_packed(pack_result(result, bits), group_size, bias)
    x = torch.randn(m, k).to(dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype)  # poisoned: every element must be written
    gptq_matmul(x, layer.qweight, layer.scales, layer.qzeros, layer.g_idx, bits, bias.to(dtype), out=out)
    reference = layer(x.float()).to(dtype)  # the torch path, in fp32
    assert torch.isfinite(out).all()
    tolerance = 2e-2 if dtype == torch.float16 else 1e-4
    torch.testing.assert_close(out.float(), reference.float(), rtol=tolerance, atol=tolerance)


def test_kernel_rejects_3_bit():
    with pytest.raises(ValueError, match="not 3"):
        gptq_matmul(torch.zeros(1, 32), torch.zeros(3, 8, dtype=torch.int32), torch.zeros(1, 8),
                    torch.zeros(1, 3, dtype=torch.int32), torch.zeros(32, dtype=torch.int32), 3)
