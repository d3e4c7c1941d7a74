"""safetensors read and written a tensor at a time: the same files safetensors reads, in one tensor's memory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantizer.safetensors_stream import LazyTensor, lazy_tensors, write_streamed
from quantizer.storage import Location

ROOT = Path(__file__).resolve().parents[1]


def sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w.bf16": torch.randn(5, 7, generator=g).bfloat16(), "w.f32": torch.randn(3, generator=g),
            "q.i32": torch.randint(-2**31, 2**31 - 1, (4, 2), generator=g, dtype=torch.int32),
            "mask": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5, dtype=torch.float16),
            "empty": torch.empty(0, 4), "fp8": torch.randn(2, 3, generator=g).to(torch.float8_e4m3fn)}


def test_written_tensor_by_tensor_reads_back_bit_for_bit_with_safetensors(tmp_path):
    tensors = sample()
    loc = Location(str(tmp_path))
    entries = {k: LazyTensor(lazy.dtype, lazy.shape, lazy.load) for k, lazy in
               _as_lazy(tmp_path / "ref.safetensors", tensors).items()}
    write_streamed(loc, "ours.safetensors", entries, {"format": "pt"})
    ours, ref = load_file(str(tmp_path / "ours.safetensors")), load_file(str(tmp_path / "ref.safetensors"))
    assert ours.keys() == tensors.keys()
    for k, t in tensors.items():
        assert ours[k].dtype == t.dtype and ours[k].shape == t.shape
        assert torch.equal(ours[k].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
        assert torch.equal(ref[k].reshape(-1).view(torch.uint8), ours[k].reshape(-1).view(torch.uint8))
    assert not list(tmp_path.glob(".*.tmp"))


def _as_lazy(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, LazyTensor]:
    save_file(tensors, str(path))
    return lazy_tensors(Location(str(path.parent)), path.name)


def test_a_torn_file_raises_and_a_failed_write_leaves_nothing(tmp_path):
    lazy = _as_lazy(tmp_path / "whole.safetensors", sample())
    data = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "torn.safetensors").write_bytes(data[:-8])
    torn = lazy_tensors(Location(str(tmp_path)), "torn.safetensors")
    with pytest.raises(ValueError, match="truncated"):
        [t.load() for t in torn.values()]
    nan = {**lazy, "bad": LazyTensor("F32", (2,), lambda: torch.tensor([1.0, float("nan")]))}

    def refuse(name: str, t: torch.Tensor) -> None:
        if t.is_floating_point() and not torch.isfinite(t.float()).all():
            raise RuntimeError(f"non-finite {name}")
    with pytest.raises(RuntimeError, match="non-finite bad"):
        write_streamed(Location(str(tmp_path)), "out.safetensors", nan, {}, check=refuse)
    assert not (tmp_path / "out.safetensors").exists() and not list(tmp_path.glob(".*.tmp"))


COPY_512_MB = """
import resource, sys, torch
from quantizer.safetensors_stream import LazyTensor, lazy_tensors, write_streamed
from quantizer.storage import Location
loc = Location(sys.argv[1])
n = 16 * 2**20  # 64 MB of float32 a tensor, 8 of them
entries = {f"t{i}": LazyTensor("F32", (n,), lambda i=i: torch.full((n,), float(i))) for i in range(8)}
torch.full((n,), 0.0)  # the allocator's first large block, before the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
write_streamed(loc, "a.safetensors", entries, {})
write_streamed(loc, "b.safetensors", lazy_tensors(loc, "a.safetensors"), {})
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


def test_copying_a_512_mb_file_holds_about_one_tensor(tmp_path):
    """Eight 64 MB tensors written, then read and written again: the process grows by about one tensor (and the
    bytes it is read through), not by the file."""
    out = subprocess.run([sys.executable, "-c", COPY_512_MB, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    grown_mb = float(out.stdout.strip().splitlines()[-1])
    assert grown_mb < 3 * 64, grown_mb
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert all(torch.equal(a[k], b[k]) and float(a[k][0]) == i for i, k in enumerate(sorted(a)))
