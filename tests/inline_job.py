"""A one-stage job run in the test process: the stage's own engine (`cluster.stage.stage_engine`'s StageEngine),
shard writer and checkpoint metadata, without Ray's actor start-up (seconds of imports per actor). For tests
that check what a family's layers become, not how Ray moves them; `test_inline_job_writes_what_the_pipeline_
writes` (tests/test_families.py) checks it against the pipeline bit for bit."""

from __future__ import annotations

from pathlib import Path

import torch

from cluster.job import load_job
from cluster.shards import write_layers_shard
from quantizer.activations import MemoryStore
from cluster.driver import resolve_calibration
from quantizer.calibration import make_batches, tokenize_samples
from quantizer.checkpoint import shard_name, write_metadata
from quantizer.decoder import load_tokenizer
from quantizer.engine import LayerReport, StageEngine, output_dtype
from quantizer.layer_builder import padded_intermediate
from quantizer.layer_store import FolderLayerStore
from quantizer.model_io import CheckpointReader
from quantizer.storage import Location
from tests.test_pipeline import SMALL


def quantize_inline(model: Path, out: Path, emit_outputs: bool = False, **overrides) -> list[LayerReport]:
    """Quantize `model` into `out` as a one-stage job with the tests' SMALL settings (+ overrides), on one
    torch thread as a one-CPU stage actor computes; returns the layer reports. `emit_outputs`: also run the
    model's last layer forward (a job's last stage does not)."""
    job = load_job(None, {**SMALL, "model": str(model), "output_dir": str(out), **overrides})
    reader = CheckpointReader(model)
    tokenizer = load_tokenizer(reader.model_dir, reader.config)
    samples = tokenize_samples(resolve_calibration(job.calibration_file), tokenizer, job.calibration)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = make_batches(samples, job.calibration.batch_size, pad)
    layer_store = FolderLayerStore(Location(str(out.parent / f".{out.name}.layers")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = StageEngine(reader, range(reader.num_layers), job.quant, MemoryStore(), layer_store,
                             emit_outputs=emit_outputs)
        reports = [r for r in engine.quantize([engine.embed(b) for b in batches]) if isinstance(r, LayerReport)]
    finally:
        torch.set_num_threads(threads)
    dtype = output_dtype(reader.embedding_info().dtype_torch)
    write_layers_shard(reader, layer_store, range(reader.num_layers), True, True, dtype, str(out), shard_name(0, 1))
    write_metadata(Location(str(out)), reader, job.quant,
                   padded_intermediate(reader.config, job.quant.pad_intermediate_to), dtype)
    return reports
