"""Server mode of the vLLM engine: a client of a vLLM OpenAI server, with weight pushes.

See `VLLMServerClient`. `vllm` is imported only inside functions of this module.
"""

from __future__ import annotations

import json
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from rollout.base import Rollout, SamplingParams
from rollout.vllm import completion_response_to_rollouts, hf_to_vllm_weights, to_vllm_sampling_kwargs

class VLLMServerClient:
    """A client of `vllm serve`, with weight updates pushed over NCCL.

    Start the server with the worker extension and vLLM's development endpoints
    (`/collective_rpc`, `/reset_prefix_cache`, `/sleep`, `/wake_up`):

        VLLM_SERVER_DEV_MODE=1 vllm serve MODEL_DIR --logprobs-mode processed_logprobs \\
            --worker-extension-cls rollout.vllm_worker.WeightSyncExtension [--tensor-parallel-size T]

    (`rollout` must be importable by the server, e.g. `PYTHONPATH=/path/to/grpo-zero`.) Only one
    training process (usually rank 0) should own the client and call `update_weights`; it joins an
    NCCL group with the server's workers (workers are ranks 0..W-1, the client is rank W; worker 0
    hosts the rendezvous store on `group_port`), so it needs a CUDA device that can reach the
    server's GPUs. Routed experts are not available through the completions endpoint
    (`routed_experts` stays None).
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        model: str | None = None,
        group_port: int = 51216,
        timeout: float = 600.0,
        model_type: str = "qwen3_moe",
        tie_word_embeddings: bool = False,
        device: torch.device | int | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.host = urllib.parse.urlparse(self.base_url).hostname or "127.0.0.1"
        self.group_port = group_port
        self.timeout = timeout
        self.model_type = model_type
        self.tie_word_embeddings = tie_word_embeddings
        self.device = device
        self.model = model or self._get("/v1/models")["data"][0]["id"]
        self._comm = None
        self._client_rank = None

    # --- HTTP -------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base_url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def _get(self, path: str) -> Any:
        return self._request("GET", path)

    def _post(self, path: str, body: Any = None) -> Any:
        return self._request("POST", path, {} if body is None else body)

    def _rpc(self, method: str, *args: str) -> list[Any]:
        """Call a worker-extension method on every server worker (`/collective_rpc`, string args)."""
        out = self._post("/collective_rpc", {"method": method, "args": list(args)})
        return (out or {}).get("results", [])

    def _rpc_in_background(self, method: str, arg: str) -> tuple[threading.Thread, list[BaseException]]:
        """Start an RPC that blocks on the server until this process joins the NCCL side."""
        errors: list[BaseException] = []

        def call() -> None:
            try:
                self._rpc(method, arg)
            except BaseException as exc:  # surfaced by the caller after join
                errors.append(exc)

        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        return thread, errors

    @staticmethod
    def _join(thread: threading.Thread, errors: list[BaseException]) -> None:
        thread.join()
        if errors:
            raise RuntimeError("the vLLM server's workers failed") from errors[0]

    # --- generation -------------------------------------------------------------------------

    def completion_body(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams) -> dict:
        """The `/v1/completions` request for token-id prompts (vLLM's extra fields included)."""
        if sampling.record_routing:
            raise ValueError("vllm serve's completions endpoint does not return routed experts")
        body = {"model": self.model, "prompt": [[int(t) for t in p] for p in prompts]}
        body.update(to_vllm_sampling_kwargs(sampling, n))
        body["return_token_ids"] = True
        body["return_tokens_as_token_ids"] = True
        return body

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams) -> list[Rollout]:
        if not prompts:
            return []
        response = self._post("/v1/completions", self.completion_body(prompts, n, sampling))
        return completion_response_to_rollouts(response, prompts, n)

    # --- weights over NCCL ------------------------------------------------------------------

    def init_communicator(self) -> None:
        """Join an NCCL group with the server's workers (once, before the first update)."""
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        workers = len(self._rpc("grpo_worker_rank"))
        world_size = workers + 1
        self._client_rank = workers
        spec = json.dumps({"port": self.group_port, "world_size": world_size, "client_rank": workers})
        # The workers block in the rendezvous until this process joins it.
        pending = self._rpc_in_background("grpo_init_weight_channel", spec)
        device = self.device if self.device is not None else torch.cuda.current_device()
        group = StatelessProcessGroup.create(host=self.host, port=self.group_port, rank=workers, world_size=world_size)
        self._comm = PyNcclCommunicator(group, device=device)
        self._join(*pending)

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, chunk_bytes: int = 1 << 30
    ) -> None:
        """Broadcast new weights (transformers names) to the server's workers, then reset its cache.

        Tensors go in chunks of about `chunk_bytes`: for each chunk one `/collective_rpc` call tells
        the workers the names, dtypes and shapes to receive, and the tensors follow over NCCL in that
        order.
        """
        if self._comm is None:
            self.init_communicator()
        device = self.device if self.device is not None else torch.cuda.current_device()
        chunk: list[tuple[str, torch.Tensor]] = []
        size = 0
        mapped = hf_to_vllm_weights(
            named_tensors, model_type=self.model_type, tie_word_embeddings=self.tie_word_embeddings
        )
        for name, tensor in mapped:
            tensor = tensor.detach().to(device).contiguous()
            chunk.append((name, tensor))
            size += tensor.numel() * tensor.element_size()
            if size >= chunk_bytes:
                self._send_chunk(chunk)
                chunk, size = [], 0
        if chunk:
            self._send_chunk(chunk)
        self._post("/reset_prefix_cache")

    def _send_chunk(self, chunk: list[tuple[str, torch.Tensor]]) -> None:
        meta = json.dumps(
            [[name, str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in chunk]
        )
        pending = self._rpc_in_background("grpo_receive_weights", meta)
        stream = torch.cuda.current_stream()
        for _, tensor in chunk:
            self._comm.broadcast(tensor, src=self._client_rank, stream=stream)
        stream.synchronize()
        self._join(*pending)

    # --- memory phases ----------------------------------------------------------------------

    def sleep(self, level: int = 1) -> None:
        self._post(f"/sleep?level={int(level)}")

    def wake(self) -> None:
        self._post("/wake_up")

    def close(self) -> None:
        if self._comm is not None:
            try:
                self._rpc("grpo_close_weight_channel")
            finally:
                self._comm = None
