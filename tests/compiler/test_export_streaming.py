"""The export streams the checkpoint: no weight is read before the saver writes it (so host memory
is one tensor at a time, not the model), and the graph equals the one traced from loaded weights."""

from __future__ import annotations

import numpy as np
import torch

from moec.compiler import export as export_mod
from moec.compiler.export import ExportConfig, export_onnx


def test_weights_are_read_only_while_saving(demo_ckpt, tmp_path, monkeypatch):
    import moec.compiler.export as export_mod
    import moec.models.checkpoint as ckpt_mod

    reads: list[tuple[str, bool]] = []
    saving = [False]
    real_read, real_save = ckpt_mod.read_tensor, export_mod._save_external

    def read(source, dtype=None, *rest):
        reads.append((source[1], saving[0]))
        return real_read(source, dtype, *rest)

    def save(*args, **kwargs):
        saving[0] = True
        try:
            return real_save(*args, **kwargs)
        finally:
            saving[0] = False

    monkeypatch.setattr(ckpt_mod, "read_tensor", read)
    monkeypatch.setattr(export_mod, "_save_external", save)  # writes the data file, then the graph
    export_onnx(demo_ckpt, tmp_path / "m.onnx", ExportConfig(dtype="fp32", external_data_threshold_bytes=0))
    # Every checkpoint tensor is read (the optimizer may evaluate a small one once more), and only
    # by the saver or the optimizer's small-constant folding, never as a whole model up front.
    with torch.device("meta"):
        from moec.models import Llama4Config
        from moec.models.llama4 import Llama4ForCausalLM

        n_weights = len(Llama4ForCausalLM(Llama4Config.from_pretrained(demo_ckpt)).state_dict())  # inv_freq is not persistent
    assert len({k for k, _ in reads}) == n_weights
    read_while_saving = {k for k, during in reads if during}
    big = {k for k, _ in reads if "experts" in k or "embed" in k or "lm_head" in k}
    assert big <= read_while_saving


def test_lazy_trace_equals_loaded_trace(demo_ckpt):
    """Tracing the uninitialised module and attaching the checkpoint gives the same initializers
    and nodes as tracing the loaded model."""
    from moec.compiler.export_weights import attach_checkpoint_weights
    from moec.models import Llama4Config, load_pretrained
    from moec.models.checkpoint import load_pretrained_lazy

    cfg = Llama4Config.from_pretrained(demo_ckpt)
    config = ExportConfig(dtype="bf16")
    loaded = export_mod._trace_to_onnx(load_pretrained(demo_ckpt, dtype=torch.bfloat16), cfg, config, 64)
    model, sources = load_pretrained_lazy(demo_ckpt, dtype=torch.bfloat16)
    lazy = export_mod._trace_to_onnx(model, cfg, config, 64)
    assert attach_checkpoint_weights(lazy, model, sources) == len(sources)
    assert set(loaded.graph.initializers) == set(lazy.graph.initializers)
    for name, value in loaded.graph.initializers.items():
        want = np.asarray(value.const_value.numpy()).astype(np.float32)
        got = np.asarray(lazy.graph.initializers[name].const_value.numpy()).astype(np.float32)
        np.testing.assert_array_equal(got, want, err_msg=name)
    assert [n.op_type for n in loaded.graph] == [n.op_type for n in lazy.graph]
