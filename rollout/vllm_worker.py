"""Server side of `rollout.vllm.VLLMServerClient`'s weight updates: a vLLM worker extension.

`vllm serve ... --worker-extension-cls rollout.vllm_worker.WeightSyncExtension` mixes this class into
every GPU worker of the server; the client calls its methods through vLLM's `/collective_rpc`
development endpoint (`VLLM_SERVER_DEV_MODE=1`), which passes string arguments only, so every
argument here is a JSON string.

Protocol (one NCCL group: the W server workers are ranks 0..W-1, the training client is rank W):
1. `grpo_worker_rank()` on every worker tells the client how many workers there are.
2. `grpo_init_weight_channel(spec)` with `{"port", "world_size", "client_rank"}`: worker 0 hosts the
   rendezvous store on all interfaces, the other workers (same node) connect to it on loopback, and
   all of them join a `PyNcclCommunicator` with the client.
3. `grpo_receive_weights(meta)` with `[[name, dtype, shape], ...]`: each worker receives the tensors
   in that order by NCCL broadcast from the client and hands them to its model's `load_weights`
   (which keeps its own tensor-parallel shard). Names are already vLLM's (the client maps them).
4. `grpo_close_weight_channel()`.

The methods run inside vLLM's worker, where `self.rank`, `self.device` and `self.model_runner`
exist (`vllm/v1/worker/gpu_worker.py`). `vllm` is imported only inside them.
"""

from __future__ import annotations

import json

import torch


class WeightSyncExtension:
    """Mixed into vLLM's GPU worker; receives new policy weights over NCCL."""

    def grpo_worker_rank(self) -> int:
        return int(self.rank)

    def grpo_init_weight_channel(self, spec: str) -> None:
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        cfg = json.loads(spec)
        rank = int(self.rank)
        host = "0.0.0.0" if rank == 0 else "127.0.0.1"
        group = StatelessProcessGroup.create(host=host, port=int(cfg["port"]), rank=rank, world_size=int(cfg["world_size"]))
        self._grpo_comm = PyNcclCommunicator(group, device=self.device)
        self._grpo_client_rank = int(cfg["client_rank"])

    def grpo_receive_weights(self, meta: str) -> int:
        comm = getattr(self, "_grpo_comm", None)
        if comm is None:
            raise RuntimeError("grpo_init_weight_channel was not called")
        runner = self.model_runner
        model = runner.get_model() if hasattr(runner, "get_model") else runner.model
        stream = torch.cuda.current_stream()
        received = 0
        with torch.no_grad():
            for name, dtype, shape in json.loads(meta):
                tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
                comm.broadcast(tensor, src=self._grpo_client_rank, stream=stream)
                model.load_weights([(name, tensor)])  # same stream: ordered after the receive
                received += 1
        stream.synchronize()
        return received

    def grpo_close_weight_channel(self) -> None:
        self._grpo_comm = None
