"""The checkpoints bundled in qwen35c/models: layout, size, tokenizer, loading, HF parity, routing."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qwen35c.errors import QwenError
from qwen35c.models import BUNDLED, bundled, default_model_path, resolve_model
from reference.checkpoint import load_model
from reference.config import load_config

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"
HELDOUT_FILE = Path(sysconfig.get_paths()["stdlib"]) / "colorsys.py"  # held out from training


@pytest.fixture(scope="module", params=BUNDLED)
def model_dir(request) -> Path:
    return bundled(request.param)


def test_paths():
    assert default_model_path() == bundled("qwen35-tiny")
    assert resolve_model(None) == default_model_path()
    assert resolve_model("qwen35-tiny-moe") == bundled("qwen35-tiny-moe")
    assert resolve_model("some/dir") == Path("some/dir")
    with pytest.raises(QwenError, match="not a bundled model"):
        bundled("qwen35-huge")


def test_files_and_total_size():
    total = 0
    for name in BUNDLED:
        d = bundled(name)
        for f in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
            assert (d / f).is_file(), d / f
        total += sum(f.stat().st_size for f in d.iterdir() if f.is_file())
    # the bundled-models issue: both checkpoints together <= 30 MB; issue 18's MTP heads add 3.4 MB
    assert total <= 32_000_000, total


def test_config_is_official_nested_schema(model_dir):
    raw = json.loads((model_dir / "config.json").read_text())
    assert raw["architectures"][0].endswith("ForConditionalGeneration") and "text_config" in raw
    cfg = load_config(model_dir)
    assert cfg.num_hidden_layers == 8 and cfg.hidden_size == 256 and cfg.vocab_size == 4096
    assert cfg.layer_types == (["linear_attention"] * 3 + ["full_attention"]) * 2
    assert cfg.linear_num_value_heads == 2 * cfg.linear_num_key_heads
    assert cfg.head_dim >= 64 and 0 < cfg.partial_rotary_factor < 1
    if model_dir.name.endswith("moe"):
        assert cfg.model_type == "qwen3_5_moe" and (cfg.num_experts, cfg.num_experts_per_tok) == (8, 2)
        assert cfg.shared_expert_intermediate_size > 0
    else:
        assert cfg.model_type == "qwen3_5" and not cfg.is_moe


def test_weights_are_bf16_with_official_names(model_dir):
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
        dtypes = {f.get_slice(n).get_dtype() for n in names}
    assert dtypes == {"BF16"}
    assert all(n.startswith(("model.language_model.", "mtp.")) for n in names), names[:3]
    assert "mtp.fc.weight" in names and "mtp.layers.0.self_attn.q_proj.weight" in names
    assert "model.language_model.layers.0.linear_attn.in_proj_qkv.weight" in names
    assert "model.language_model.layers.3.self_attn.q_proj.weight" in names


def test_tokenizer(model_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert tok.get_vocab_size() == 4096
    ids = [tok.token_to_id(s) for s in SPECIALS]
    assert None not in ids and sorted(ids) == [4093, 4094, 4095]
    cfg = load_config(model_dir)
    assert cfg.eos_token_id == tok.token_to_id("<|endoftext|>")
    text = "class A:\n    def f(self, x):\n        return x ** 2  # ok\n"
    enc = tok.encode(text)
    assert tok.decode(enc.ids) == text and len(enc.ids) < len(text) / 2
    assert tok.encode("<|im_start|>user\nhi<|im_end|>").ids[0] == tok.token_to_id("<|im_start|>")


def test_matches_transformers_fp32(model_dir):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    ids = torch.tensor([Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(PROMPT).ids])
    ours = load_model(model_dir, dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        a = ours(ids)
        b = hf(ids).logits
    assert a.shape == b.shape == (1, ids.shape[1], 4096)
    assert (a - b).abs().max().item() <= 1e-4   # measured worst 9.5e-6 (1 and 2 threads)


def test_moe_uses_its_experts_on_heldout_text():
    from tokenizers import Tokenizer

    from reference import ops
    from reference.model import SparseMoeBlock

    d = bundled("qwen35-tiny-moe")
    model = load_model(d, dtype=torch.float32)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    # 4 x 1024 tokens of held-out files (one short file alone is too small a sample per layer)
    texts = [(HELDOUT_FILE.parent / name).read_text() for name in ("heapq.py", "queue.py", "shlex.py", "textwrap.py")]
    ids = torch.tensor([tok.encode(text).ids[:1024] for text in texts])
    blocks = [m for m in model.model.modules() if isinstance(m, SparseMoeBlock)]   # the decoder, not the MTP
    assert len(blocks) == 8
    counts = torch.zeros(len(blocks), 8, dtype=torch.long)  # [layer, expert]

    def hook(module, args):
        x = args[0].reshape(-1, args[0].shape[-1])
        _, experts = ops.moe_route(x, module.gate.weight, module.top_k, module.norm_topk_prob)
        counts[blocks.index(module)] += torch.bincount(experts.reshape(-1), minlength=8)

    for b in blocks:
        b.register_forward_pre_hook(hook)
    with torch.no_grad():
        model(ids)
    share = counts.double() / counts.sum(dim=1, keepdim=True)  # every layer on its own
    assert share.min() >= 0.03 and share.max() <= 0.40, share.tolist()


def test_mtp_head_was_trained_with_the_base_frozen(model_dir):
    """The MTP head (issue 18) was added without touching a base tensor (training.json's digest over
    them still holds), loads as the reference's MTP module, and drafts better than chance on a
    held-out file: its first draft often equals the base's greedy token."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_tiny", Path(__file__).parents[1] / "tools" / "train_tiny.py")
    train_tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_tiny)
    record = json.loads((model_dir / "training.json").read_text())["mtp"]
    assert record["base_frozen"] and train_tiny.base_digest(model_dir) == record["base_tensors_sha256"]
    model = load_model(model_dir, dtype=torch.float32)
    assert model.config.mtp_num_hidden_layers == 1 and model.mtp is not None
    from tokenizers import Tokenizer

    ids = torch.tensor([Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(HELDOUT_FILE.read_text()).ids[:258]])
    with torch.no_grad():
        greedy = model(ids[:, :257])[0].argmax(-1)
        hidden = model.hidden_states(ids[:, :256])
        draft = model.lm_head(model.mtp(hidden, model.model.embed_tokens(ids[:, 1:257]),
                                        torch.arange(1, 257)[None]))[0].argmax(-1)
    accept = (draft == greedy[1:257]).float().mean().item()
    assert accept >= 0.25, accept     # random heads: ~1 / 4096; the card records the full held-out rate
