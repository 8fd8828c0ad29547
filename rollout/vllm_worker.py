"""Inside vLLM's workers: loading new policy weights in place, and the server-mode weight channel.

`reload_in_place(worker, weights)` is what both engines run on every vLLM worker to apply a weight
update (the colocated engine through `LLM.collective_rpc`, the server through the worker extension
below). It uses vLLM's layer-wise reload (`vllm.model_executor.model_loader.reload`, 0.1x+): each
layer is rebuilt in checkpoint layout, loaded, post-processed again (CPU GEMM packing, MoE weight
shuffles) and copied back into the tensors the engine already uses. Two gaps of vLLM 0.32 are
closed here, both of which otherwise leave old weights in use without any error:

* CPU MoE experts: on a reload the unquantised MoE method only copies the new weights into the
  prepacked storage and skips the CPU kernel's prepacking (`_setup_kernel`: "is_weight_update");
  dropping the built kernel first makes the reload take the first-load path (prepack included).
* CPU tied embeddings: a tied `lm_head` loads no tensor of its own, so its packed GEMM handle
  (`cpu_linear`) is never rebuilt; it is rebuilt here from the (updated) shared weight.

Every parameter of the vLLM model must be reached by the update; a missing one is an error
(never a silent half update).

`WeightSyncExtension` is mixed into the server's workers by `--worker-extension-cls
rollout.vllm_worker.WeightSyncExtension`; `rollout.vllm.VLLMServerClient` calls its methods through
`/collective_rpc` (`VLLM_SERVER_DEV_MODE=1`), which passes JSON-able arguments only.

`vllm` is imported only inside the functions of this module.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import torch


def _unwrap(worker):
    """`WorkerWrapperBase` -> the worker; the worker's model (unwrapped from CUDA-graph wrappers)."""
    worker = getattr(worker, "worker", worker)
    runner = worker.model_runner
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    return worker, model


def _cpu_moe_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Quantisation methods of the MoE layers whose kernel prepacks weights (vLLM's CPU experts)."""
    methods = []
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if getattr(method, "moe_kernel", None) is not None:
            methods.append(method)
    return methods


def _rebuild_cpu_heads(model: torch.nn.Module) -> int:
    """Rebuild the packed GEMM of every embedding-shaped output head (CPU only, see the module doc)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    rebuilt = 0
    for module in model.modules():
        if isinstance(module, ParallelLMHead) and hasattr(module, "cpu_linear") and module.weight.numel():
            module.quant_method.process_weights_after_loading(module)
            rebuilt += 1
    return rebuilt


def reload_in_place(worker, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Load `weights` (vLLM checkpoint names, e.g. from `rollout.vllm.hf_to_vllm_weights`) into the
    worker's model in place; returns the number of vLLM parameters updated.

    Raises RuntimeError when some parameter of the model received no tensor.
    """
    from vllm.config import set_current_vllm_config
    from vllm.platforms import current_platform

    worker, model = _unwrap(worker)
    expected = {name for name, _ in model.named_parameters()}
    try:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload
    except ImportError:  # vLLM before the layer-wise reload: loaders copy into the live tensors
        with torch.no_grad():
            loaded = set(model.load_weights(weights) or ())
    else:
        cpu = current_platform.is_cpu()
        if cpu:
            for method in _cpu_moe_layers(model):
                method.moe_kernel = None  # rebuilt (and its weights prepacked) by the reload
        with torch.no_grad(), set_current_vllm_config(worker.vllm_config):
            initialize_layerwise_reload(model)
            loaded = set(model.load_weights(weights) or ())
            finalize_layerwise_reload(model, worker.model_config)
            if cpu:
                _rebuild_cpu_heads(model)
    missing = sorted(expected - loaded)
    if missing:
        raise RuntimeError(
            f"the weight update reached {len(expected) - len(missing)} of {len(expected)} vLLM parameters; "
            f"none given for {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    return len(loaded & expected)


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
        stream = torch.cuda.current_stream()
        tensors = []
        for name, dtype, shape in json.loads(meta):
            tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
            comm.broadcast(tensor, src=self._grpo_client_rank, stream=stream)
            tensors.append((name, tensor))
        stream.synchronize()
        return reload_in_place(self, tensors)

    def grpo_close_weight_channel(self) -> None:
        self._grpo_comm = None
