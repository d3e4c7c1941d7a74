"""671B-class mixtures of experts: experts streamed a chunk at a time (the same bits as held at once, a bounded
number of float experts in memory, per-chunk times in the report) and FP8 block-scaled sources (DeepSeek-V3 /
Kimi-K2 releases) dequantized as they are read, against a reference dequantization; bad FP8 input refused naming
the tensor, nothing published."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bench.tiny_families import write_tiny_family
from quantizer.activations import MemoryStore, TokenBatch
from quantizer.config import QuantConfig
from quantizer.engine import LayerWork, StageEngine
from quantizer.errors import ConfigError
from quantizer.fp8 import dequantize
from quantizer.host_memory import _malloc_trim, release_free_heap, resident_mb
from quantizer.layer_store import FolderLayerStore
from quantizer.model_io import CheckpointReader
from quantizer.passes import chunk_ranges, layer_passes
from quantizer.storage import Location
from rayquant.cli import main
from tests.inline_job import quantize_inline
from tests.test_moe import KeptLayers
from tests.test_pipeline import checkpoint_tensors

BLOCK = [128, 128]


def batches(count: int = 2, rows: int = 3, length: int = 24) -> list[TokenBatch]:
    out = []
    for seed in range(count):
        ids = torch.randint(0, 1000, (rows, length), generator=torch.Generator().manual_seed(seed))
        mask = torch.ones(rows, length, dtype=torch.bool)
        mask[1, length // 2:] = False
        out.append(TokenBatch(ids, mask))
    return out


def quantize_layers(model: Path, **quant) -> KeptLayers:
    reader = CheckpointReader(model)
    kept = KeptLayers()
    eng = StageEngine(reader, range(reader.num_layers), QuantConfig(**{"bits": 4, "group_size": 32, **quant}),
                      MemoryStore(), kept)
    list(eng.quantize([eng.embed(b) for b in batches()]))
    return kept


@pytest.fixture(scope="module")
def moe_families(tmp_path_factory):
    root = tmp_path_factory.mktemp("large-moe")
    return {family: write_tiny_family(root / family, family) for family in ("deepseek_v3", "gpt_oss", "llama4_text")}


def assert_bit_identical(a: dict[int, dict[str, torch.Tensor]], b: dict[int, dict[str, torch.Tensor]]) -> None:
    assert a.keys() == b.keys()
    for index in a:
        assert sorted(a[index]) == sorted(b[index])
        differ = [k for k, v in a[index].items() if not torch.equal(v, b[index][k])]
        assert not differ, (index, differ[:5])


@pytest.mark.parametrize("family,quant", [
    ("deepseek_v3", {}), ("deepseek_v3", {"moe_calibration": "routed"}), ("deepseek_v3", {"moe_calibration": "all"}),
    ("deepseek_v3", {"true_sequential": False}), ("gpt_oss", {}), ("llama4_text", {})])
def test_experts_streamed_in_chunks_give_the_same_bits(moe_families, family, quant):
    """Three experts at a time (not a divisor of the expert count) against every expert held at once: every
    tensor of every layer is the same, in each calibration mode, without true-sequential passes, for experts stored
    per expert (DeepSeek-V3), fused on disk (gpt-oss) and router-scaled (Llama 4)."""
    whole = quantize_layers(moe_families[family], **quant)
    chunked = quantize_layers(moe_families[family], experts_per_chunk=3, **quant)
    assert_bit_identical(whole.tensors, chunked.tensors)
    sparse = [i for i, r in chunked.reports.items() if r.expert_tokens]
    assert sparse
    for index in sparse:
        report = chunked.reports[index]
        experts = len(report.expert_tokens)
        assert report.experts_per_chunk == 3 and len(report.chunk_seconds) == -(-experts // 3)
        assert all(s > 0 for s in report.chunk_seconds)
        assert len(report.chunk_rss_mb) == len(report.chunk_seconds) and all(m > 50 for m in report.chunk_rss_mb)
        assert whole.reports[index].experts_per_chunk == experts and len(whole.reports[index].chunk_seconds) == 1


def test_a_worker_holds_at_most_one_chunk_of_float_experts(moe_families, monkeypatch):
    """While a sparse layer is quantized, no more than experts_per_chunk experts have float weights: the others
    are not read yet (meta) or are packed (QuantLinear, which keeps no dequantized copy), before and after each
    pass, and in the quantized layer's forward."""
    from quantizer.experts import ExpertList
    from quantizer.qlinear import QuantLinear

    seen: list[int] = []
    capture = LayerWork.capture

    def floats(layer) -> int:
        count = 0
        for block in (m for m in layer.modules() if isinstance(m, ExpertList)):
            for e in range(block.num_experts):
                down = block.expert(e).down_proj
                count += (down._weight is not None) if isinstance(down, QuantLinear) else not down.weight.is_meta
        return count

    def counting(self, step, handles, settle=True):
        accs = capture(self, step, handles, settle)
        seen.append(floats(self.layer))
        return accs

    monkeypatch.setattr(LayerWork, "capture", counting)
    forward = StageEngine.forward_layer

    def forward_counting(self, layer, index, chunk):
        out = forward(self, layer, index, chunk)
        seen.append(floats(layer))
        return out

    monkeypatch.setattr(StageEngine, "forward_layer", forward_counting)
    quantize_layers(moe_families["deepseek_v3"], experts_per_chunk=2)
    assert seen and max(seen) == 2


def test_chunks_cut_the_expert_groups_and_keep_shared_units_last(moe_families):
    reader = CheckpointReader(moe_families["deepseek_v3"])
    sparse = next(i for i in range(reader.num_layers) if reader.arch.is_sparse(i))
    spec = reader.arch.spec(sparse)
    experts = reader.arch.num_experts(sparse)
    passes = layer_passes(spec, experts, 3, True)
    chunked = [p for p in passes if p.experts is not None]
    assert experts > 3 and [p.experts for p in chunked] == [r for r in chunk_ranges(experts, 3) for _ in (0, 1)]
    units = [u for p in passes for g in p.groups for u in g]
    assert sorted(units) == sorted(u for g in spec.groups for u in g)  # every unit once
    shared = [u for p in chunked[:-2] for g in p.groups for u in g if "shared" in u[0]]
    assert not shared  # the shared expert rides with the last chunk



@pytest.mark.parametrize("stop,then", [(2, "resume"), (2, "torn last part"), (0, "another chunk size")])
def test_a_layer_stopped_between_chunks_resumes_at_its_last_checkpointed_chunk(moe_families, tmp_path, monkeypatch,
                                                                                stop, then):
    """A stage stopped inside a streamed sparse layer (one expert per chunk) — its attention part and two chunks
    of experts checkpointed as parts — continues after the last part that reads back whole: the passes before it
    are not run again, the layer's tensors and losses are the same bits as an uninterrupted run's, and the parts
    are gone once the layer is saved. Parts cut for another experts_per_chunk are not used, even the attention
    part alone: the layer starts over (same bits)."""
    model = moe_families["deepseek_v3"]
    reader = CheckpointReader(model)
    sparse = next(i for i in range(reader.num_layers) if reader.arch.is_sparse(i))
    whole = quantize_layers(model, experts_per_chunk=1)
    store = FolderLayerStore(Location(str(tmp_path / "layers")))
    cfg = QuantConfig(bits=4, group_size=32, experts_per_chunk=1)
    first = StageEngine(reader, range(reader.num_layers), cfg, MemoryStore(), store)
    for item in first.quantize([first.embed(b) for b in batches()]):  # stopped as chunk `stop` begins
        if getattr(item, "layer", None) == sparse and str(getattr(item, "what", "")).startswith(f"experts {stop}-"):
            assert (item.experts_done, item.experts) == (stop, reader.arch.num_experts(sparse))  # for progress
            break
    first.background.shutdown(wait=True)
    assert store.parts(sparse) == list(range(stop + 1)) and not store.has(sparse)
    passes = layer_passes(reader.arch.spec(sparse), reader.arch.num_experts(sparse), 1, True)
    chunk_start = {p.chunk: k for k, p in reversed(list(enumerate(passes))) if p.chunk is not None}
    expected = chunk_start[stop]
    if then == "torn last part":
        path = tmp_path / "layers" / store.part_name(sparse, 2)
        path.write_bytes(path.read_bytes()[:100])
        expected = chunk_start[1]
    elif then == "another chunk size":
        cfg = QuantConfig(bits=4, group_size=32, experts_per_chunk=2)
        expected = 0
        whole = quantize_layers(model, experts_per_chunk=2)

    captured: list[int | None] = []
    capture = LayerWork.capture

    def recording(self, step, handles, settle=True):
        if self.index == sparse:
            captured.append(step.chunk)
        return capture(self, step, handles, settle)

    monkeypatch.setattr(LayerWork, "capture", recording)
    second = StageEngine(reader, range(reader.num_layers), cfg, MemoryStore(), store)
    reports = {r.layer: r for r in second.quantize([second.embed(b) for b in batches()]) if hasattr(r, "losses")}
    assert reports[sparse].resumed_at_pass == expected
    assert len(captured) == len(layer_passes(reader.arch.spec(sparse), reader.arch.num_experts(sparse),
                                             cfg.experts_per_chunk, True)) - expected
    saved = {i: store.load(i)[0] for i in whole.tensors}
    assert_bit_identical(whole.tensors, saved)
    assert reports[sparse].losses == whole.reports[sparse].losses
    assert reports[sparse].expert_tokens == whole.reports[sparse].expert_tokens
    assert not store.parts(sparse)



@pytest.mark.skipif(_malloc_trim() is None, reason="the C library has no malloc_trim")
def test_memory_freed_inside_mallocs_heap_goes_back_to_the_os():
    """Freed tensors below malloc's mmap threshold stay resident (here: every other 64 KB block of 256 MB freed,
    the heap fragmented) until release_free_heap, which the engine calls after every pass (a streamed DeepSeek-V3
    layer grew ≈ 0.1 GB per chunk without it)."""
    blocks = [torch.ones(16 * 1024) for _ in range(4096)]
    del blocks[::2]
    freed = resident_mb()
    release_free_heap()
    assert freed - resident_mb() > 64, "half of 256 MB was freed; at least 64 MB of it must leave the resident set"


# ---- FP8 block-scaled sources ------------------------------------------------------------------------
def reference_dequantize(weight: torch.Tensor, scale: torch.Tensor, block: list[int]) -> torch.Tensor:
    """Element by block, the slow way: w[i, j] · scale[i // b0, j // b1]."""
    out = torch.empty(weight.shape, dtype=torch.float32)
    for bi in range(scale.shape[0]):
        for bj in range(scale.shape[1]):
            rows, cols = slice(bi * block[0], (bi + 1) * block[0]), slice(bj * block[1], (bj + 1) * block[1])
            out[rows, cols] = weight[rows, cols].float() * scale[bi, bj]
    return out.to(torch.bfloat16)


def to_fp8(weight: torch.Tensor, block: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight in DeepSeek-V3's release format: e4m3 values and one float32 scale_inv per block."""
    rows, cols = -(-weight.shape[0] // block[0]), -(-weight.shape[1] // block[1])
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(rows, cols, generator=g) * 1e-3 + 1e-4
    full = scale.repeat_interleave(block[0], 0)[:weight.shape[0]].repeat_interleave(block[1], 1)[:, :weight.shape[1]]
    return (weight.float() / full).clamp(-448, 448).to(torch.float8_e4m3fn), scale


def write_fp8_twin(float_dir: Path, fp8_dir: Path, ref_dir: Path, block: list[int] = BLOCK) -> None:
    """From a bf16 checkpoint: its FP8 release (every quantized projection's weight in e4m3 + weight_scale_inv,
    quantization_config fp8) and the reference dequantization of that release, as a bf16 checkpoint."""
    reader = CheckpointReader(float_dir)
    linears = {f"{reader.arch.layer_prefix(i)}.{name}.weight" for i in range(reader.num_layers)
               for name in reader.arch.linear_names(i)}
    tensors = load_file(str(float_dir / "model.safetensors"))
    fp8, ref = {}, {}
    for seed, (name, t) in enumerate(sorted(tensors.items())):
        if name in linears:
            fp8[name], fp8[name + "_scale_inv"] = to_fp8(t, block, seed)
            ref[name] = reference_dequantize(fp8[name], fp8[name + "_scale_inv"], block)
        else:
            fp8[name] = ref[name] = t
    for folder, data in ((fp8_dir, fp8), (ref_dir, ref)):
        shutil.copytree(float_dir, folder)
        save_file(data, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((fp8_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": block}
    (fp8_dir / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("shape", [(256, 384), (300, 200), (7, 129)])
def test_fp8_dequantization_matches_the_reference(shape):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.05
    fp8, scale = to_fp8(weight, BLOCK, 0)
    ours = dequantize("w", fp8, scale, (128, 128))
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, reference_dequantize(fp8, scale, BLOCK))


@pytest.fixture(scope="module")
def fp8_model(moe_families, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    write_fp8_twin(moe_families["deepseek_v3"], root / "fp8", root / "reference")
    return root / "fp8", root / "reference"


def test_fp8_source_quantizes_as_its_reference_dequantization(fp8_model, tmp_path):
    """A DeepSeek-V3 checkpoint in the FP8 release layout (weights not multiples of 128: partial blocks) gives
    the GPTQ checkpoint its reference bf16 dequantization gives, bit for bit, with an ordinary GPTQ config."""
    fp8, reference = fp8_model
    reader = CheckpointReader(fp8)
    assert reader.fp8 is not None and not any(n.endswith("_scale_inv") for n in reader.tensors)
    quantize_inline(fp8, tmp_path / "from-fp8")
    quantize_inline(reference, tmp_path / "from-reference")
    ours, theirs = checkpoint_tensors(tmp_path / "from-fp8"), checkpoint_tensors(tmp_path / "from-reference")
    assert sorted(ours) == sorted(theirs)
    assert not [k for k, v in ours.items() if not torch.equal(v, theirs[k])]
    config = json.loads((tmp_path / "from-fp8" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq" and "weight_block_size" not in json.dumps(config)


def _broken_copy(fp8: Path, dest: Path, change) -> Path:
    shutil.copytree(fp8, dest)
    tensors = load_file(str(dest / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def test_fp8_missing_scale_or_wrong_block_is_refused_naming_the_tensor(fp8_model, tmp_path, caplog):
    fp8, _ = fp8_model
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    missing = _broken_copy(fp8, tmp_path / "missing", lambda t: t.pop(name + "_scale_inv"))
    assert main(["quantize", "--model", str(missing), "--out", str(tmp_path / "out1")]) == 2
    assert f"FP8 tensor {name} has no {name}_scale_inv" in caplog.text
    wrong = tmp_path / "wrong"
    shutil.copytree(fp8, wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [64, 64]
    (wrong / "config.json").write_text(json.dumps(config))
    assert main(["quantize", "--model", str(wrong), "--out", str(tmp_path / "out2")]) == 2
    assert "weight_block_size in config.json does not match" in caplog.text
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


def test_fp8_without_block_scales_is_refused_naming_the_fix(fp8_model, tmp_path):
    fp8, _ = fp8_model
    per_tensor = tmp_path / "per-tensor"
    shutil.copytree(fp8, per_tensor)
    config = json.loads((per_tensor / "config.json").read_text())
    del config["quantization_config"]["weight_block_size"]
    (per_tensor / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="FP8 without block scales.*bf16 release"):
        CheckpointReader(per_tensor)


def test_fp8_non_finite_weight_stops_naming_the_tensor(fp8_model, tmp_path):
    fp8, _ = fp8_model
    name = "model.layers.0.mlp.up_proj.weight"

    def poison(tensors):
        tensors[name + "_scale_inv"][0, 0] = float("inf")
    broken = _broken_copy(fp8, tmp_path / "nan", poison)
    with pytest.raises(ConfigError, match=f"{name}: the dequantized FP8 weight holds NaN/Inf"):
        quantize_inline(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fused_experts_are_read_a_chunk_at_a_time(moe_families, monkeypatch):
    """gpt-oss and Llama 4 store a block's experts as one tensor per projection ([experts, …]): a chunk reads
    only its experts' rows from disk, the layer without its experts reads none of them, and both give the
    tensors of a whole read."""
    from quantizer.passes import expert_of

    reads: list[tuple[str, range]] = []
    load_rows = CheckpointReader.load_rows
    monkeypatch.setattr(CheckpointReader, "load_rows",
                        lambda self, name, rows: reads.append((name, rows)) or load_rows(self, name, rows))
    for family in ("gpt_oss", "llama4_text"):
        reader = CheckpointReader(moe_families[family])
        index = next(i for i in range(reader.num_layers) if reader.arch.is_sparse(i))
        spec = reader.arch.spec(index)
        whole = reader.layer_state(index)
        reads.clear()
        chunk = reader.layer_state(index, lambda k: expert_of(k, spec) in {1, 2})
        assert chunk and sorted(chunk) == sorted(k for k in whole if expert_of(k, spec) in {1, 2})
        assert all(torch.equal(v, whole[k]) for k, v in chunk.items())
        assert reads and all(rows == range(1, 3) for _, rows in reads), reads
        reads.clear()
        rest = reader.layer_state(index, lambda k: expert_of(k, spec) is None)
        assert not reads and rest and sorted(rest) == sorted(k for k in whole if expert_of(k, spec) is None)
