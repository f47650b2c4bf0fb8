"""The Triton Inference Server Python-backend model of a `qwen35c export --format triton-server` entry
for a `triton` (GPU runtime) artifact. Copied into the entry as `NAME/1/model.py`, next to the
artifact in `NAME/1/artifact/`; the server's Python environment needs qwen35c installed.

One sequence per correlation id (sequence batching, `oldest` strategy). A request carries
`input_ids` [1, T]: the prompt on the sequence's first request (control START), then one or more
tokens per request; the response is `logits` [1, V] at the request's last token. The session state
(conv, recurrent, KV cache for `max_length` positions) lives here, keyed by the correlation id, and
is dropped on the request flagged END (or when the server unloads the model). Requests run one at a
time through `qwen35c.load(artifact)`: its prefill program for T > 1, its decode program for T = 1.
"""

from __future__ import annotations

import json
from pathlib import Path


class TritonPythonModel:
    def initialize(self, args):
        import torch
        import triton_python_backend_utils   # provided by the server's Python backend

        from qwen35c.runtime import load

        self.pb = triton_python_backend_utils
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        directory = Path(args["model_repository"]) / args["model_version"] / params.get("artifact", "artifact")
        self.torch = torch
        self.session = load(directory)           # every file's sha256 checked before it is opened
        self.max_length = int(params.get("max_length", "4096"))
        self.sequences: dict[int, list] = {}     # correlation id -> [state, tokens so far]

    def execute(self, requests):
        pb_utils, responses = self.pb, []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(output_tensors=[self._step(request)]))
            except Exception as err:  # noqa: BLE001 - one bad request answers with its error, not the server's
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(err))))
        return responses

    def _step(self, request):
        pb_utils = self.pb

        def scalar(name):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            return int(tensor.as_numpy().reshape(-1)[0]) if tensor is not None else 0

        ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy().reshape(1, -1)
        corrid, start, end = scalar("CORRID"), scalar("START"), scalar("END")
        if start:
            self.sequences[corrid] = [self.session.new_state(1, self.max_length), 0]
        if corrid not in self.sequences:
            raise ValueError(f"sequence {corrid}: no START request seen (or it has ended)")
        entry = self.sequences[corrid]
        if entry[1] + ids.shape[1] > self.max_length:
            raise ValueError(f"sequence {corrid}: {entry[1] + ids.shape[1]} tokens exceed max_length {self.max_length}")
        tokens = self.torch.from_numpy(ids.astype("int64"))
        if ids.shape[1] == 1 and entry[1] > 0:
            logits = self.session.decode(tokens, entry[0])[:, -1]
        else:
            logits = self.session.prefill(tokens, entry[0], last_only=True)[:, -1]
        entry[1] += ids.shape[1]
        if end:
            del self.sequences[corrid]
        return pb_utils.Tensor("logits", logits.float().numpy())

    def finalize(self):
        self.sequences.clear()
