"""Layer-range chains (moec.runtime.layer_chain, moec.runtime.trt_chain): the ranges of the demo
graph run in sequence give the single graph's logits and greedy tokens, on ONNX Runtime; the
TensorRT chain backend, with the engines' real I/O (TensorRT-RTX sm89 builds on this CPU) and a
runner at the engine seam, does too."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moec.common import contract
from moec.common.errors import MoecError
from moec.runtime.generate import GenerationConfig, generate
from moec.runtime.layer_chain import OrtLayerChain, ort_chain_backend, run_chain
from moec.runtime.ort_backend import OrtBackend

PROMPT = [[1, 5, 7, 9, 11, 13, 17, 19, 23, 29, 31]]


@pytest.fixture(scope="module")
def single(demo_onnx):
    return OrtBackend.from_onnx(demo_onnx)


@pytest.mark.parametrize("layers_per_engine", [1, 2, 3])
def test_chained_ranges_give_the_single_graphs_logits_and_tokens(demo_onnx, single, layers_per_engine):
    chain = ort_chain_backend(demo_onnx, layers_per_engine)
    assert len(chain.chain.ranges) == -(-4 // layers_per_engine)
    ids = np.array(PROMPT)
    pos = np.arange(ids.shape[1])[None]
    ref, ref_cache = single.forward(ids, pos, single.init_cache(1))
    got, got_cache = chain.forward(ids, pos, chain.init_cache(1))
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * scale)
    # A decode step on the prefilled caches (rings included).
    step = np.array([[int(ref[0, -1].argmax())]])
    ref2, _ = single.forward(step, np.array([[ids.shape[1]]]), ref_cache)
    got2, _ = chain.forward(step, np.array([[ids.shape[1]]]), got_cache)
    np.testing.assert_allclose(got2, ref2, rtol=0, atol=1e-5 * scale)
    config = GenerationConfig(max_new_tokens=16)
    assert generate(chain, PROMPT, config).sequences == generate(single, PROMPT, config).sequences


def test_a_chain_whose_range_lacks_an_input_is_named(demo_onnx):
    chain = OrtLayerChain(demo_onnx, 2)
    r0, r1 = chain.ranges
    with pytest.raises(MoecError, match="hidden.2"):
        run_chain([r1, r0], {n: None for n in r0.inputs}, lambda k, inputs: {}, chain.output_names)


@pytest.fixture(scope="module")
def chain_engines(demo_onnx, tmp_path_factory):
    pytest.importorskip("tensorrt_rtx")
    from moec.compiler.build import BuildConfig
    from moec.compiler.build.chain import build_layer_chain
    from moec.compiler.pipeline import OptimizeConfig, optimize_onnx

    root = tmp_path_factory.mktemp("trt_chain")
    opt = root / "model.onnx"
    optimize_onnx(demo_onnx, opt, OptimizeConfig(target="trt-rtx:sm89"))
    build_layer_chain(opt, root / "eng", BuildConfig(archs=("sm89",), backend="tensorrt-rtx", progress=False), 2)
    return opt, root / "eng"


class OrtAtTheSeam:
    """An engine runner (EngineRunner's seam) that runs the range's ONNX graph on ONNX Runtime,
    after checking it is handed exactly the engine's input names and shapes its profile holds, and
    output tensors of exactly the shapes the graph computes (written in place, as TensorRT does),
    none of them memory an input of the step is read from. ``ptrs``: every output's addresses."""

    def __init__(self, session, engine_io: dict, calls: list, ptrs: dict | None = None):
        self.session, self.io, self.calls = session, engine_io, calls
        self.ptrs = {} if ptrs is None else ptrs

    def run(self, inputs, outputs, profile):
        assert list(inputs) == [t["name"] for t in self.io["inputs"]]
        assert profile.misfit({n: tuple(t.shape) for n, t in inputs.items()}) is None
        self.calls.append(profile.name)
        names = [t["name"] for t in self.io["outputs"]]
        assert set(outputs) == set(names)
        import torch

        outs = self.session.run(names, {n: t.numpy() for n, t in inputs.items()})
        read = {t.data_ptr() for t in inputs.values() if t.numel()}
        for n, o in zip(names, outs):
            assert tuple(outputs[n].shape) == o.shape, n
            assert outputs[n].data_ptr() not in read, f"{n} would overwrite an input of the same step"
            outputs[n].copy_(torch.from_numpy(o))
            self.ptrs.setdefault(n, set()).add(outputs[n].data_ptr())
        return outputs


@pytest.mark.trt
def test_trt_chain_backend_runs_the_engines_io_in_order(chain_engines, single):
    from moec.compiler.build.chain import load_layer_chain
    from moec.runtime.trt_chain import TrtChainBackend

    opt, eng = chain_engines
    chain, engines = load_layer_chain(eng)
    manifests = [json.loads((eng / r["dir"] / contract.ENGINE_MANIFEST).read_text()) for r in chain["ranges"]]
    ort_chain = OrtLayerChain(opt, chain["layers_per_engine"])
    calls: list = []
    runners = [OrtAtTheSeam(s, m["io"], calls) for s, m in zip(ort_chain.sessions, manifests)]
    backend = TrtChainBackend(eng, chain, manifests, runners)
    config = GenerationConfig(max_new_tokens=8)
    reference = OrtBackend.from_onnx(opt)
    assert generate(backend, PROMPT, config).sequences == generate(reference, PROMPT, config).sequences
    # Both ranges every step, prefill's profile for the prompt, decode's for each token after it.
    assert calls[:2] == ["prefill", "prefill"] and set(calls[2:]) == {"decode"}
    assert len(calls) == 2 * 8


@pytest.mark.trt
def test_trt_chain_backend_reuses_its_output_buffers(chain_engines):
    from moec.compiler.build.chain import load_layer_chain
    from moec.runtime.trt_chain import TrtChainBackend

    opt, eng = chain_engines
    chain, _ = load_layer_chain(eng)
    manifests = [json.loads((eng / r["dir"] / contract.ENGINE_MANIFEST).read_text()) for r in chain["ranges"]]
    ort_chain = OrtLayerChain(opt, chain["layers_per_engine"])
    ptrs: dict = {}
    runners = [OrtAtTheSeam(s, m["io"], [], ptrs) for s, m in zip(ort_chain.sessions, manifests)]
    backend = TrtChainBackend(eng, chain, manifests, runners)
    reference = OrtBackend.from_onnx(opt)
    config = GenerationConfig(max_new_tokens=8)
    assert generate(backend, PROMPT, config).sequences == generate(reference, PROMPT, config).sequences
    # Eight steps: logits and the residual stream in one buffer each, every present in two (its
    # past's and the other), whatever the step's shape.
    assert {n: len(p) for n, p in ptrs.items() if not n.startswith("present_")} == {contract.LOGITS: 1, "hidden.2": 1}
    presents = {n: len(p) for n, p in ptrs.items() if n.startswith("present_")}
    assert len(presents) == 2 * 4 and set(presents.values()) == {2}
