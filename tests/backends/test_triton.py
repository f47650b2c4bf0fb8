"""The triton backend under Triton's CPU interpreter against its emulating reference: the fp32
reference with the weights the artifact stores in bf16 rounded to bf16 (and, for INT4/FP8, the
quantization-emulating model). Presets tiny, tiny-moe, tiny-next; bf16, INT4 (weight-only) and FP8
(block weights, dynamic activations) recipes; prefill lengths around the 64-token GDN chunk, a
right-padded batch of different lengths, decode after prefill, a non-zero initial state, a prompt
on top of a non-empty state, launch counts, the plan's errors and the compiled-kernel refusal."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (the session would set it too)

from collections import Counter

import pytest
import torch

from qwen35c.backends.triton.emit import build_directory, emulating_reference
from qwen35c.backends.triton.plan import HOST_OPS, Launch, lower
from qwen35c.backends.triton.session import TritonSession, check_compiled
from qwen35c.errors import QwenError

# Measured worst max |Δlogit| vs the emulating reference (this machine, Triton 3.9 interpreter):
# bf16 2.4e-7 (tiny, tiny-moe, tiny-next), INT4 4.8e-7 (tiny-moe, experts INT4 too), FP8 1.9e-7
# (no E4M3 rounding flipped).
TOL = 2e-6
FP8_GATE = {"kl_mean": 5e-4, "top1": 0.98}      # targets.GATES["quantized-activations"]


@pytest.fixture(scope="module")
def artifact(checkpoint_factory, tmp_path_factory):
    """artifact(preset, target, **overrides) -> (TritonSession, emulating ReferenceSession), cached."""
    made = {}

    def make(preset: str, target: str = "a100-bf16", quantize: str | None = None, **overrides):
        key = (preset, target, quantize, tuple(sorted(overrides.items())))
        if key not in made:
            ckpt = checkpoint_factory(preset, **overrides)
            out = tmp_path_factory.mktemp("triton") / f"{preset}-{target}"
            manifest = build_directory(ckpt, target, out, quantize=quantize)
            made[key] = (TritonSession(out, manifest), emulating_reference(ckpt, manifest["quantization"]))
        return made[key]

    return make


def ids_for(session, batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, session.vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def check_batch_then_decode(session, ref, lengths: list[int], steps: int, seed: int, tol: float = TOL):
    """A right-padded batch vs each row alone on the reference, then `steps` decode steps vs the
    reference's batch decode (prefill + decode vs the full forward)."""
    batch, width = len(lengths), max(lengths)
    ids = ids_for(session, batch, width, seed)
    lens = torch.tensor(lengths)
    state, cache = session.new_state(batch, width + steps + 1), ref.new_state(batch, width + steps + 1)
    got = session.prefill(ids, state, lens)
    ref.prefill(ids, cache, lens)
    # padded positions too: the GDN kernels write valid tokens only, the pool starts as NaN under the
    # interpreter, so a padded row left unwritten (and routed through the MoE) shows up here
    assert torch.isfinite(got).all()
    worst = 0.0
    for b, n in enumerate(lengths):
        alone = ref.logits(ids[b:b + 1, :n])
        worst = max(worst, max_diff(got[b, :n], alone[0]))
    nxt = torch.stack([got[b, n - 1] for b, n in enumerate(lengths)]).argmax(-1).view(batch, 1)
    for _ in range(steps):
        got, want = session.decode(nxt, state), ref.decode(nxt, cache)
        worst = max(worst, max_diff(got, want))
        nxt = want[:, 0].argmax(-1).view(batch, 1)
    assert worst <= tol, worst
    return worst


def test_tiny_bf16_chunk_lengths_padded_batch_decode(artifact):
    """Lengths 65 and 1 in one right-padded batch (the GDN kernels run once per row), each row vs
    the reference alone, then a decode step. 63 / 64 / 127 / 129: the slow tests."""
    session, ref = artifact("tiny")
    check_batch_then_decode(session, ref, [65, 1], steps=1, seed=0)


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-next"])
def test_moe_presets_bf16(artifact, preset):
    session, ref = artifact(preset)
    check_batch_then_decode(session, ref, [5, 2], steps=1, seed=1)


def test_uniform_batch_one_launch_last_only(artifact):
    """Rows of equal length run the chunk kernels once for the whole batch (N = B sequences); with
    last_only the LM head runs on each row's last valid token only."""
    session, ref = artifact("tiny")
    session.counts.clear()
    ids = ids_for(session, 2, 4, 2)
    got = session.prefill(ids, session.new_state(2, 5), last_only=True)
    assert got.shape == (2, 1, session.vocab)
    assert max_diff(got[:, 0], ref.logits(ids)[:, -1]) <= TOL
    gdn_layers = sum(t == "linear_attention" for t in session.plan.model["layer_types"])
    assert session.counts["gdn_chunk_fwd_h"] == gdn_layers


def test_nonzero_initial_state_and_continuation(artifact):
    """Random conv / recurrent states in both models, a prompt, then a second prompt on top of the
    state (the prefill program from each row's q_start); final GDN states compared too."""
    session, ref = artifact("tiny")
    gen = torch.Generator().manual_seed(3)
    state, cache = session.new_state(2, 16), ref.new_state(2, 16)
    for i, kind in enumerate(session.plan.model["layer_types"]):
        if kind == "linear_attention":
            conv, rec = cache.conv[i], cache.recurrent[i]
            conv.copy_(torch.randn(conv.shape, generator=gen))
            rec.copy_(0.1 * torch.randn(rec.shape, generator=gen))
            state.set_ir(f"layers.{i}.conv", conv)
            state.set_ir(f"layers.{i}.recurrent", rec)
    ids = ids_for(session, 2, 4, 4)
    lens = torch.tensor([4, 3])
    got, want = session.prefill(ids, state, lens), ref.prefill(ids, cache, lens)
    assert max(max_diff(got[b, :n], want[b, :n]) for b, n in enumerate(lens.tolist())) <= TOL
    ids2, lens2 = ids_for(session, 2, 2, 5), torch.tensor([2, 1])
    got, want = session.prefill(ids2, state, lens2), ref.prefill(ids2, cache, lens2)
    assert max(max_diff(got[b, :n], want[b, :n]) for b, n in enumerate(lens2.tolist())) <= TOL
    assert state.q_start.tolist() == [6, 4]
    for i, kind in enumerate(session.plan.model["layer_types"]):
        if kind == "linear_attention":
            assert max_diff(state.ir(f"layers.{i}.conv"), cache.conv[i]) <= 1e-6
            assert max_diff(state.ir(f"layers.{i}.recurrent"), cache.recurrent[i]) <= 1e-6


def test_chunked_prefill_across_chunk_and_block_boundaries(artifact):
    """A ragged batch (lengths 130 and 70) fed as prompts of 63, then 2, then 65 tokens on top of the
    state: every chunk's logits equal the whole prompt's at the same positions (the GDN chunk of 64
    and attention's 64-row query blocks start mid-sequence), then a decode step."""
    session, ref = artifact("tiny")
    lengths, pieces = [130, 70], [63, 2, 65]
    ids = ids_for(session, 2, 130, 11)
    want = [ref.logits(ids[b:b + 1, :n])[0] for b, n in enumerate(lengths)]
    state = session.new_state(2, 131)
    begin, worst = 0, 0.0
    for size in pieces:
        lens = torch.tensor([max(0, min(size, n - begin)) for n in lengths])
        got = session.prefill(ids[:, begin:begin + size], state, lens)
        assert torch.isfinite(got).all()
        for b, n in enumerate(lens.tolist()):
            worst = max(worst, max_diff(got[b, :n], want[b][begin:begin + n]) if n else 0.0)
        begin += size
    assert state.q_start.tolist() == lengths and worst <= TOL, worst
    nxt = torch.stack([w[-1] for w in want]).argmax(-1).view(2, 1)
    cache = ref.new_state(2, 131)
    ref.prefill(ids, cache, torch.tensor(lengths))
    assert max_diff(session.decode(nxt, state), ref.decode(nxt, cache)) <= TOL


def test_launch_counts(artifact):
    """A decode step runs exactly the plan's launches (each once) and its named host ops, nothing else."""
    session, _ref = artifact("tiny-moe")
    state = session.new_state(2, 4)             # decode on an empty state is a valid first step
    session.counts.clear()
    session.decode(torch.tensor([[1], [2]]), state)
    steps = session.plan.programs["decode"]
    want = Counter(s.spec for s in steps if isinstance(s, Launch))
    want.update("host:" + s.op for s in steps if not isinstance(s, Launch))
    assert Counter(session.counts) == want
    assert {k[5:] for k in session.counts if k.startswith("host:")} <= set(HOST_OPS)
    kernels = {s.kernel for s in steps if isinstance(s, Launch)}
    assert kernels <= set(session.kernels)       # every launch is a kernel of the library


def int4_case(artifact, preset: str, **overrides):
    """INT4 g128 weight-only (RTN here for speed: GPTQ packs the same layout)."""
    session, ref = artifact(preset, "a100-int4", quantize="int4-rtn group-size=128", **overrides)
    assert any(w.dtype == "u8" for w in session.plan.weights)
    check_batch_then_decode(session, ref, [9], steps=1, seed=8)
    return session


def test_int4_moe_with_quantized_experts(artifact):
    """hidden = moe_intermediate = 128 so the group divides K: the routed experts are quantized at pack
    time (moe_gate_up_int4 / moe_down_int4) and so is the shared expert (gemm_int4)."""
    session = int4_case(artifact, "tiny-moe", hidden_size=128, moe_intermediate_size=128)
    assert any(n.startswith("routed experts quantized at pack time: int4") for n in session.plan.notes)
    assert session.counts.get("moe_down_int4_decode") and session.counts.get("gemm_int4_g128_decode")


@pytest.mark.slow
def test_int4_dense(artifact):
    session = int4_case(artifact, "tiny")       # parity asserted inside, vs the emulating reference
    assert session.counts.get("gemm_int4_g128_decode")   # the decode step ran the INT4 GEMM


def fp8_case(artifact, preset: str):
    """FP8 block weights, activations quantized per token per 128 channels at run time (E4M3 rounding
    emulated in fp32 under the interpreter). linear_key_head_dim=64: the q/k/v row split of
    in_proj_qkv must fall on the 128-row scale blocks."""
    session, ref = artifact(preset, "h100-fp8", linear_key_head_dim=64)
    assert any(w.dtype == "f8e4m3" for w in session.plan.weights)
    ids = ids_for(session, 1, 6, 9)
    got, want = session.logits(ids)[0], ref.logits(ids)[0]
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1)
    top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert kl.mean().item() <= FP8_GATE["kl_mean"] and top1 >= FP8_GATE["top1"]
    assert max_diff(got, want) <= 1e-3      # measured 1.5e-7 (tiny-moe), 1.9e-7 (tiny): no rounding flipped
    return session


def test_fp8_moe_with_quantized_experts(artifact):
    session = fp8_case(artifact, "tiny-moe")
    assert any(n.startswith("routed experts quantized at pack time: fp8") for n in session.plan.notes)
    assert session.counts.get("moe_gate_up_fp8_prefill") and session.counts.get("gemm_fp8_block_prefill")


@pytest.mark.slow
def test_fp8_dense(artifact):
    session = fp8_case(artifact, "tiny")        # the FP8 gate and max |Δlogit| asserted inside
    assert session.counts.get("gemm_fp8_block_prefill")  # the prefill ran the FP8 block GEMM


def test_fp8_misaligned_split_refused(checkpoint_factory, tmp_path):
    with pytest.raises(QwenError, match="128-row scale block"):
        build_directory(checkpoint_factory("tiny"), "h100-fp8", tmp_path / "out")


def test_unsupported_op_named(checkpoint_factory):
    from qwen35c.graph.trace import trace_checkpoint
    from qwen35c.passes.manager import PassManager

    graph = PassManager("cleanup,fuse-deltanet{chunk-size=64},insert-state,cleanup").run(
        trace_checkpoint(checkpoint_factory("tiny")).graph).graph
    with pytest.raises(QwenError, match=r"IR op '\w+' \(node %"):
        lower(graph)


def test_compiled_kernels_refused_on_mismatch(artifact):
    import triton

    session, _ref = artifact("tiny")
    backend = dict(session.backend)
    with pytest.raises(QwenError, match="no compiled kernels"):
        check_compiled(dict(backend, kernels=None), sm=80)
    good = {"triton_version": triton.__version__, "sm": 80}
    check_compiled(dict(backend, kernels=good), sm=80)
    with pytest.raises(QwenError, match="Triton 0.0.1"):
        check_compiled(dict(backend, kernels=dict(good, triton_version="0.0.1")), sm=80)
    with pytest.raises(QwenError, match="sm_80, this GPU is sm_90"):
        check_compiled(dict(backend, kernels=good), sm=90)


def test_plan_text_and_json_round_trip(artifact):
    from qwen35c.backends.triton.plan import Plan, plan_text

    session, _ref = artifact("tiny-next")
    plan = session.plan
    assert Plan.from_json(plan.to_json()).text() == plan.text()
    text = (session.directory / "plan.txt").read_text()
    assert text == plan.text() and "launch gdn_chunk_prep" in text and "host embedding" in text
    assert plan_text(session.directory) == text
    # a launch binding (or zero-padding) a buffer / weight / state the plan does not declare: refused at load
    for index in (0, None):
        data = plan.to_json()
        launch = next(s["launch"] for s in data["programs"]["prefill"] if "launch" in s and s["launch"]["pads"])
        if index is None:
            launch["pads"] = ["nowhere"]
        else:
            launch["args"][index][1] = "buf:nowhere"
        with pytest.raises(QwenError, match="binds buf:nowhere, which the plan does not declare"):
            Plan.from_json(data)


@pytest.mark.slow
@pytest.mark.parametrize("length", [63, 64, 127, 129])
def test_tiny_bf16_more_lengths(artifact, length):
    session, ref = artifact("tiny")
    check_batch_then_decode(session, ref, [length], steps=1, seed=10 + length)


@pytest.mark.slow
def test_deterministic_bytes(checkpoint_factory, tmp_path):
    import hashlib

    ckpt = checkpoint_factory("tiny")
    digests = []
    for name in ("a", "b"):
        build_directory(ckpt, "a100-int4", tmp_path / name)
        digests.append([hashlib.sha256((tmp_path / name / f).read_bytes()).hexdigest()
                        for f in ("plan.json", "plan.txt", "weights.safetensors")])
    assert digests[0] == digests[1]


def test_ship_kernels_one_specialisation(artifact, tmp_path):
    """The compile driver on one small specialisation of a real plan (sm_90, no GPU needed): cubin,
    PTX and Triton's metadata written, hashed, the Triton version recorded. The whole plan: slow."""
    import hashlib

    import triton

    from qwen35c.backends.triton.kernels import ship

    session, _ref = artifact("tiny")
    entry = ship(session.plan, 90, tmp_path, only=["swiglu"])
    assert entry["triton_version"] == triton.__version__ and entry["sm"] == 90
    assert entry["specialisations"] == ["swiglu"] and len(entry["files"]) == 3
    for f in entry["files"]:
        assert hashlib.sha256((tmp_path / f["file"]).read_bytes()).hexdigest() == f["sha256"]
    assert (tmp_path / "kernels" / "swiglu.cubin").stat().st_size > 0


@pytest.mark.slow
def test_ship_kernels_whole_plan(checkpoint_factory, tmp_path):
    manifest = build_directory(checkpoint_factory("tiny-moe"), "a100-bf16", tmp_path / "out", ship_kernels=True)
    kernels = manifest["backend"]["kernels"]
    assert kernels["sm"] == 80 and sorted(kernels["specialisations"]) == manifest["backend"]["specialisations"]


def test_generate_matches_reference(artifact):
    """The inherited Session.generate (last_only prefill, then decode) gives the reference's greedy tokens."""
    session, ref = artifact("tiny")
    prompts = [[1, 2, 3], [4]]
    assert session.generate(prompts, 2).tokens == ref.generate(prompts, 2).tokens
