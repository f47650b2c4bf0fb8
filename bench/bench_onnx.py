"""Benchmark the onnx backend on a checkpoint (not a test), side by side with its peers.

    python bench/bench_onnx.py --model /work/ckpt/0.8b --out /tmp/art-0.8b --threads 2 [--skip-build]
        [--target cpu|cpu-int4] [--pipeline onnx-cpu] [--contexts 512,4096] [--new 64] [--repeats 3]
        [--long-repeats 1] [--genai-python /work/venv-genai/bin/python --genai-model DIR]
        [--peers hf,reference] [--llama-bench BUILD/bin/llama-bench --gguf F32.gguf[,Q4_0.gguf,...]]
        [--gemv-bound]

Reports `qwen35c build` time and peak RSS (skipped with --skip-build), then for every engine prefill
tok/s (a CONTEXT-token prompt, logits at the last position only) and decode tok/s (NEW greedy tokens,
batch 1) at each context, with N intra-op threads, medians of the repeats, and each peer's ratio to
ours. Every engine lives in its own worker process (its peak RSS is reported) and the workers take
turns per repeat (ours, peer, ours, peer, ...), so the noise of a shared machine hits all alike; each
makes one short untimed run first (page faults of the first pass over the weights); the load
average is recorded before and after.

Bytes per decode token, for every engine from its own files: the weights a step reads (every ONNX
initializer or GGUF tensor, except a table only gathered from: an embedding lookup reads one row a
token; a tied head reads its table whole), plus our artifact's recurrent/conv state and KV cache at
that context (the same model for every engine; llama.cpp keeps its KV in f16, so its figure is an
upper bound). The decode roofline of an engine = the better of the two read-bandwidth probes over
that.

Peers:
  genai      ONNX Runtime GenAI (a model made by its builder, e.g. `python -m
             onnxruntime_genai.models.builder -i CKPT -o DIR -p fp32 -e cpu --extra_options
             exclude_mtp=true prune_lm_head=true`), run by --genai-python, a separate venv, so
             this project's venv stays clean. Prefill = append_tokens(prompt); decode = NEW
             generate_next_token() calls after one untimed call (see notes/cpu-peers).
  llama      llama.cpp's `llama-bench` on GGUFs of the same checkpoint (made with llama.cpp's
             convert_hf_to_gguf.py, quantized with llama-quantize), one engine per file
             (`llama-<file stem>`, e.g. llama-q35-0.8b-q4_0): prefill = `-p CONTEXT -n 0`, decode = `-p 0 -n NEW -d CONTEXT`
             (the depth-CONTEXT prefill is untimed), one repetition per turn after its warm-up run;
             peak RSS is the largest llama-bench child's (the GGUF is memory-mapped).
  hf         HF transformers eager (fp32, fla blocked, logits_to_keep=1 at prefill).
  reference  qwen35c's reference eager model (`qwen35c run` without an artifact), fp32.
With --gemv-bound, engine `gemv-bound` runs only the artifact's MatMul/Gemm nodes (decode only): the
step time ONNX Runtime's GEMV kernels need for these weights, whatever the rest of the graph does.
Peer numbers measured earlier on this machine are in ../shared/notes/cpu-peers.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

# ---- workers: one engine each, commands on stdin, one JSON line per result on stdout --------------


def _rss_mib() -> float:
    """Peak RSS of this worker or of its largest finished child (llama-bench), whichever is larger.
    The worker's own peak is VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec, so it
    would start at the driver's size."""
    import resource

    own = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    return max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024


def _worker_ours(args):
    """The artifact as `qwen35c run` runs it: numpy and ONNX Runtime, no torch in the process."""
    import numpy as np

    from qwen35c.runtime import load

    session = load(args.model, threads=args.threads)
    # --baseline sources from before the numpy runtime have only the torch-returning steps
    prefill_step = getattr(session, "prefill_array", session.prefill)
    decode_step = getattr(session, "decode_array", session.decode)

    def run(context, new, vocab=session.config.vocab_size):
        ids = np.random.default_rng(0).integers(0, vocab, (1, context))
        state = session.new_state(1, context + new + 8)
        t = time.perf_counter()
        logits = prefill_step(ids, state, last_only=True)
        prefill = time.perf_counter() - t
        token = np.asarray(logits[:, -1]).argmax(-1).reshape(1, 1)
        t = time.perf_counter()
        for _ in range(new):
            token = np.asarray(decode_step(token, state)[:, -1]).argmax(-1).reshape(1, 1)
        return prefill, time.perf_counter() - t
    return run


def _worker_genai(args):
    import numpy as np
    import onnxruntime_genai as og

    cfg = og.Config(args.model)
    cfg.clear_providers()
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": args.threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(cfg)

    def run(context, new):
        ids = np.random.default_rng(0).integers(0, 240000, size=context, dtype=np.int32)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=context + new + 2, min_length=context + new + 2, do_sample=False,
                                  batch_size=1)
        gen = og.Generator(model, params)
        t = time.perf_counter()
        gen.append_tokens(ids)
        prefill = time.perf_counter() - t
        gen.generate_next_token()  # selects the first token from the prefill logits (no forward)
        t = time.perf_counter()
        for _ in range(new):
            gen.generate_next_token()
        return prefill, time.perf_counter() - t
    return run


def _worker_llama(args):
    def tokens_per_second(*flags) -> float:
        cmd = [args.llama_bench, "-m", args.model, "-t", str(args.threads), "-r", "1", "-o", "json", *flags]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        return json.loads(proc.stdout)[0]["avg_ts"]

    def run(context, new):
        prefill = tokens_per_second("-p", str(context), "-n", "0")
        decode = tokens_per_second("-p", "0", "-n", str(new), "-d", str(context))
        return context / prefill, new / decode
    return run


def _worker_hf(args):
    import torch

    sys.modules.setdefault("fla", None)
    import transformers
    from transformers import DynamicCache

    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()

    @torch.no_grad()
    def run(context, new):
        ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
        cache = DynamicCache(config=model.config)
        t = time.perf_counter()
        out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - t
        token = out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(new):
            out = model(token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        return prefill, time.perf_counter() - t
    return run


def _worker_reference(args):
    import torch

    from qwen35c.runtime import load

    torch.set_num_threads(args.threads)
    session = load(args.model, "float32")

    def run(context, new):
        prompt = torch.randint(0, session.config.vocab_size, (context,),
                               generator=torch.Generator().manual_seed(0)).tolist()
        result = session.generate([prompt], new + 1, stop_ids=())
        return context / result.prefill_tokens_per_second, new / result.decode_tokens_per_second
    return run


def _worker_gemv(args):
    """ONNX Runtime's own bound on a decode step: the artifact's MatMul and Gemm nodes alone, on
    their weights (ORT prepacks them as in the artifact), one run a step, outputs bound once. No
    attention, recurrence, norms or small kernels: what is left is the GEMV kernel's weight stream."""
    import atexit
    import tempfile

    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper

    manifest = json.load(open(os.path.join(args.model, "manifest.json")))
    graph = onnx.load(os.path.join(args.model, manifest["backend"]["model"]), load_external_data=False).graph
    weights = {w.name: w for w in graph.initializer}
    nodes, inputs, outputs = [], {}, []
    for node in graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) == 2 and node.input[1] in weights:
            w = weights[node.input[1]]
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            k = w.dims[1] if trans_b else w.dims[0]
            inputs[k] = helper.make_tensor_value_info(f"x{k}", onnx.TensorProto.FLOAT, [1, k])
            outputs.append((f"y{len(nodes)}", w.dims[0] if trans_b else w.dims[1]))
            nodes.append(helper.make_node(node.op_type, [f"x{k}", w.name], [outputs[-1][0]], name=node.name))
            nodes[-1].attribute.extend(node.attribute)
    used = {n.input[1] for n in nodes}
    model = helper.make_model(helper.make_graph(
        nodes, "gemv_bound", list(inputs.values()),
        [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [1, n]) for name, n in outputs],
        [w for w in graph.initializer if w.name in used]), opset_imports=[helper.make_opsetid("", 21)])
    folder = tempfile.mkdtemp(prefix=".gemv-bound-", dir=os.path.dirname(os.path.abspath(args.model)))
    atexit.register(shutil.rmtree, folder, True)
    for name in {e.value for w in model.graph.initializer for e in w.external_data if e.key == "location"}:
        os.link(os.path.join(args.model, name), os.path.join(folder, name))  # ORT wants the data beside the model
    onnx.save(model, os.path.join(folder, "model.onnx"))
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    session = ort.InferenceSession(os.path.join(folder, "model.onnx"), options, providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    keep = []
    for k, info in inputs.items():
        keep.append(np.full((1, k), 0.01, np.float32))
        binding.bind_cpu_input(info.name, keep[-1])
    for name, n in outputs:
        keep.append(ort.OrtValue.ortvalue_from_numpy(np.empty((1, n), np.float32)))
        binding.bind_ortvalue_output(name, keep[-1])

    def run(context, new):
        t = time.perf_counter()
        for _ in range(new):
            session.run_with_iobinding(binding)
        return None, time.perf_counter() - t
    return run


def worker_main(args) -> None:
    t = time.perf_counter()
    run = globals()[f"_worker_{args.worker}"](args)
    load_seconds = time.perf_counter() - t
    run(32, 2)  # warm-up, untimed: the first pass over the weights takes their page faults
    print(json.dumps({"ready": True, "load_seconds": load_seconds}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        prefill, decode = run(cmd["context"], cmd["new"])
        print(json.dumps({"prefill_tok_s": prefill and cmd["context"] / prefill, "decode_tok_s": cmd["new"] / decode,
                          "rss_mib": _rss_mib()}), flush=True)
    print(json.dumps({"peak_rss_mib": _rss_mib()}), flush=True)


# ---- driver ------------------------------------------------------------------------------------


def read_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Memory read bandwidth (GB/s) as torch sums a float32 array larger than the caches, median."""
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(int(gib * (1 << 30)) // 4)
    a.sum()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t)
    return a.numel() * 4 / statistics.median(times) / 1e9


def state_bytes(artifact: str, context: int) -> int:
    """Our artifact's recurrent and conv states (read and written) and its KV cache up to `context`."""
    manifest = json.load(open(os.path.join(artifact, "manifest.json")))
    total = 0
    for spec in manifest["backend"]["states"]:
        shape = [context if d == "S" else 1 if d == "B" else d for d in spec["shape"]]
        size = 4 * math.prod(shape)
        total += size if "S" in spec["shape"] else 2 * size
    return total


_GATHERS = {("Gather", 0), ("GatherBlockQuantized", 0), ("GatherBlockQuantized", 2)}


def onnx_weight_bytes(path: str) -> int:
    """Bytes of the initializers a decode step reads: all but tables that only gathers read."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    readers: dict[str, set] = {}

    def walk(graph):
        for node in graph.node:
            for i, name in enumerate(node.input):
                readers.setdefault(name, set()).add((node.op_type, i))
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    walk(sub)
    walk(model.graph)
    total = 0
    for init in model.graph.initializer:
        if readers.get(init.name, set()) <= _GATHERS:
            continue
        external = {e.key: e.value for e in init.external_data}
        if "length" in external:
            total += int(external["length"])
        elif init.raw_data:
            total += len(init.raw_data)
        else:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
            total += math.prod(init.dims) * dtype.itemsize
    return total


_GGML_BLOCK = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
               10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
               30: (1, 2)}    # ggml type -> (elements per block, bytes per block): F32 F16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2..Q8_K BF16


def gguf_weight_bytes(path: str) -> int:
    """Bytes of the tensors a decode step reads from a GGUF: all but token_embd when a separate
    output.weight exists (a tied model's head reads token_embd whole)."""
    import struct

    with open(path, "rb") as f:
        def read(fmt):
            return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))[0]

        def string():
            return f.read(read("Q")).decode()
        scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

        def value(kind):
            if kind == 8:
                return string()
            if kind == 9:
                inner, count = read("I"), read("Q")
                return [value(inner) for _ in range(count)]
            return read(scalar[kind])
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        read("I")
        n_tensors, n_kv = read("Q"), read("Q")
        for _ in range(n_kv):
            string()
            value(read("I"))
        sizes = {}
        for _ in range(n_tensors):
            name = string()
            dims = [read("Q") for _ in range(read("I"))]
            kind = read("I")
            read("Q")
            per_block, block_bytes = _GGML_BLOCK[kind]
            sizes[name] = math.prod(dims) // per_block * block_bytes
    if "output.weight" in sizes:
        sizes.pop("token_embd.weight", None)
    return sum(sizes.values())


def weight_bytes(kind: str, model: str) -> int | None:
    if kind in ("ours", "gemv"):
        manifest = json.load(open(os.path.join(model, "manifest.json")))
        return onnx_weight_bytes(os.path.join(model, manifest["backend"]["model"]))
    if kind == "genai":
        return onnx_weight_bytes(os.path.join(model, "model.onnx"))
    if kind == "llama":
        return gguf_weight_bytes(model)
    return None


def build(model: str, out: str, target: str, pipeline: str | None) -> dict:
    cmd = ["/usr/bin/time", "-v", shutil.which("qwen35c") or "qwen35c", "build", "--model", model,
           "--target", target, "-o", out, "--force", "--no-check"] + (["--pipeline", pipeline] if pipeline else [])
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"build failed:\n{proc.stderr[-3000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return {"build_seconds": round(seconds, 1), "build_peak_rss_mib": int(rss.group(1)) / 1024 if rss else None,
            "target": target, "pipeline": pipeline or "(target default)"}


class Worker:
    def __init__(self, name: str, python: str, model: str, threads: int, kind: str | None = None,
                 env: dict | None = None, extra: tuple = ()):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), **(env or {}))
        self.name = name
        self.proc = subprocess.Popen([python, os.path.abspath(__file__), "--worker", kind or name, "--model", model,
                                      "--threads", str(threads), *extra], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.ready = self._read()

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"worker {self.name} died (exit {self.proc.wait()})")
            if line.startswith("{"):
                return json.loads(line)

    def run(self, context: int, new: int) -> dict:
        self.proc.stdin.write(json.dumps({"context": context, "new": new}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> dict:
        self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        self.proc.wait()
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/work/ckpt/0.8b")
    ap.add_argument("--out", default="/tmp/qwen35c-bench-0.8b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contexts", default="512,4096")
    ap.add_argument("--new", type=int, default=64, help="decode tokens per measurement")
    ap.add_argument("--repeats", type=int, default=3, help="at context <= 512")
    ap.add_argument("--long-repeats", type=int, default=1, help="at context > 512 (prefill is long)")
    ap.add_argument("--target", default="cpu", help="build target (cpu, cpu-int4)")
    ap.add_argument("--pipeline", default="", help="build pipeline ('' = the target's default)")
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--genai-python", default=None, help="python of a venv with onnxruntime-genai")
    ap.add_argument("--genai-model", default=None, help="an ORT GenAI model directory (builder output)")
    ap.add_argument("--llama-bench", default=None, help="llama.cpp's llama-bench binary")
    ap.add_argument("--gguf", default=None, help="GGUFs of the same checkpoint (comma list), for llama-bench")
    ap.add_argument("--peers", default="", help="comma list of in-venv peers: hf, reference")
    ap.add_argument("--gemv-bound", action="store_true",
                    help="also time the artifact's MatMul/Gemm nodes alone: ORT's bound on a decode step")
    ap.add_argument("--baseline", default=None, metavar="ARTIFACT:SRC",
                    help="also run ARTIFACT with the qwen35c sources at SRC (a checkout of an older commit, "
                         "put first on PYTHONPATH) as engine 'before'")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker_main(args)

    report = {"load_average_before": os.getloadavg(), "read_gb_s_before": round(read_bandwidth(args.threads), 1)}
    if not args.skip_build:
        report.update(build(args.model, args.out, args.target, args.pipeline or None))
    engines = [("ours", sys.executable, args.out, "ours", None, ())]
    if args.baseline:
        artifact, src = args.baseline.split(":", 1)
        engines.append(("before", sys.executable, artifact, "ours", {"PYTHONPATH": src}, ()))
    if args.genai_python and args.genai_model:
        engines.append(("genai", args.genai_python, args.genai_model, "genai", None, ()))
    if args.llama_bench and args.gguf:
        for gguf in args.gguf.split(","):
            name = "llama-" + os.path.basename(gguf).removesuffix(".gguf")
            engines.append((name, sys.executable, gguf, "llama", None, ("--llama-bench", args.llama_bench)))
    for peer in filter(None, args.peers.split(",")):
        engines.append((peer, sys.executable, args.model, peer, None, ()))
    if args.gemv_bound:
        engines.append(("gemv-bound", sys.executable, args.out, "gemv", None, ()))
    streamed = {name: weight_bytes(kind, model) for name, _, model, kind, _, _ in engines}
    workers = []
    for name, python, model, kind, env, extra in engines:  # loaded one after another, not interleaved
        w = Worker(name, python, model, args.threads, kind, env, extra)
        report[f"{name}.load_seconds"] = round(w.ready["load_seconds"], 1)
        workers.append(w)
    results = {w.name: {} for w in workers}
    for context in (int(c) for c in args.contexts.split(",")):
        runs = {w.name: [] for w in workers}
        for rep in range(args.repeats if context <= 512 else args.long_repeats):
            for w in workers:
                runs[w.name].append(w.run(context, args.new))
                print(f"# ctx {context} rep {rep} {w.name}: {runs[w.name][-1]}", file=sys.stderr, flush=True)
        for name, rs in runs.items():
            if rs[0]["prefill_tok_s"]:  # the GEMV bound has no prefill
                results[name][f"prefill_tok_s@{context}"] = round(statistics.median(r["prefill_tok_s"] for r in rs), 2)
            results[name][f"decode_tok_s@{context}"] = round(statistics.median(r["decode_tok_s"] for r in rs), 3)
            results[name][f"raw@{context}"] = [(r["prefill_tok_s"] and round(r["prefill_tok_s"], 2),
                                                round(r["decode_tok_s"], 3)) for r in rs]
    for w in workers:
        results[w.name]["peak_rss_mib"] = round(w.close()["peak_rss_mib"])
    report["engines"] = results
    ours = results["ours"]
    report["ratio_peer_to_ours"] = {
        name: {k: round(v / ours[k], 3) for k, v in r.items() if k in ours and "tok_s" in k and ours[k]}
        for name, r in results.items() if name != "ours"}
    report["load_average_after"] = os.getloadavg()
    report["read_gb_s_after"] = round(read_bandwidth(args.threads), 1)
    bandwidth = max(report["read_gb_s_before"], report["read_gb_s_after"]) * 1e9
    contexts = [int(c) for c in args.contexts.split(",")]
    report["decode_bytes_per_token_mb"] = {name: {f"@{c}": round((b + state_bytes(args.out, c)) / 1e6, 1)
                                                  for c in contexts} for name, b in streamed.items() if b}
    report["decode_roofline_tok_s"] = {name: {f"@{c}": round(bandwidth / (b + state_bytes(args.out, c)), 2)
                                              for c in contexts} for name, b in streamed.items() if b}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
