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

Every parameter of the vLLM model in checkpoint layout must be reached by the update; a missing one
is an error (never a silent half update). Parameters that vLLM derives after loading (MLA's `W_UK_T`,
`W_UV`) are recomputed by the reload and need no tensor. vLLM's own per-layer warning for a layer
that received no tensor ("RotaryEmbedding: Failed to load weights", a tied "ParallelLMHead: ...")
fires on every update for layers that need none (a rotary cache derived from the config, a head
that shares the embedding's tensor), so it is held back (`_QuietLayerWarnings`); the check by
parameter name above is what stops an update that missed something.

`WeightSyncExtension` is mixed into the server's workers by `--worker-extension-cls
rollout.vllm.worker.WeightSyncExtension`; `rollout.vllm.server.VLLMServerClient` calls its methods
through `/collective_rpc` (`VLLM_SERVER_DEV_MODE=1`), which passes string arguments only (JSON here)
and returns what they return. The protocol is described in `rollout/vllm/server.py`.

`vllm` is imported only inside the functions of this module.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

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


class _QuietLayerWarnings(logging.Filter):
    """Holds back vLLM's "<Layer>: Failed to load weights" warnings while a reload finishes; other
    records pass. (vLLM clears its child loggers' filters when it starts: attached per reload.)"""

    LOGGER = "vllm.model_executor.model_loader.reload.layerwise"

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).endswith(": Failed to load weights")

    def __enter__(self) -> _QuietLayerWarnings:
        logging.getLogger(self.LOGGER).addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger(self.LOGGER).removeFilter(self)


def reload_in_place(worker, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Load `weights` (vLLM checkpoint names, e.g. from `rollout.vllm.weights.hf_to_vllm_weights`)
    into the worker's model in place; returns the number of vLLM parameters updated.

    Raises RuntimeError when some parameter of the model received no tensor.
    """
    from vllm.config import set_current_vllm_config
    from vllm.platforms import current_platform

    worker, model = _unwrap(worker)
    expected = {name for name, _ in model.named_parameters()}  # a shared tensor once: no tied lm_head
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
            # Only parameters that exist in checkpoint layout, which the reload has just put every layer
            # back into, can receive a tensor. Those that post-load processing derives from others (MLA's
            # W_UK_T and W_UV, split from kv_b_proj) do not; finalize derives them again from the new
            # weights. (The layout unties shared tensors, hence the intersection with the running model's.)
            expected &= {name for name, _ in model.named_parameters()}
            loaded = set(model.load_weights(weights) or ())
            with _QuietLayerWarnings():  # judged by parameter below, not by vLLM's per-layer line
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


# --- server mode: the workers' side of the weight channel ---------------------------------------

# safetensors' dtype codes; a push may change a floating dtype (the loaders cast), nothing else.
_DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip
_FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})
_KEPT_SESSIONS = 16  # push records kept per worker (one per training run that pushed)


class PushRejected(Exception):
    """A push refused before anything was loaded into the model."""


@dataclass
class _SyncState:
    """What a server worker keeps between weight-channel calls (`worker._grpo_sync`)."""

    manifest: dict[str, tuple[str, tuple[int, ...]]] | None  # checkpoint: name -> (dtype code, shape)
    # open safetensors files holding the weights in use (None: they exist only in the model); kept
    # open, they stay readable after the client deletes them
    last_good: list | None
    consistent: bool = True  # False: a failed load changed the model and restoring it failed too
    version: int = 0  # successful pushes since start-up
    pushes: OrderedDict = field(default_factory=OrderedDict)  # session -> {"seq", "ok", "error"}
    comm: object = None  # NCCL: PyNcclCommunicator with the client
    stream: object = None  # NCCL: the channel's own CUDA stream
    client_rank: int = -1
    pending: list[tuple[str, torch.dtype, tuple[int, ...]]] | None = None  # NCCL push being received
    pending_id: tuple[str, int] | None = None
    staged: dict[int, torch.Tensor] = field(default_factory=dict)  # NCCL: received tensors, on the CPU


def _checkpoint_files(model_config) -> list[Path]:
    """The safetensors files the server loaded at start-up ([] when there are none to read)."""
    path = Path(model_config.model)
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(model_config.model, revision=model_config.revision,
                                          local_files_only=True, allow_patterns=["*.safetensors", "*.json"]))
        except Exception:  # not a cached Hub checkpoint: pushes are then checked by reload_in_place only
            return []
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    return sorted(path.glob("*.safetensors"))


def _open(files: Iterable[str | Path]) -> list:
    """Open safetensors files (memory-mapped: readable for as long as the handles live)."""
    from safetensors import safe_open

    return [safe_open(os.fspath(f), framework="pt", device="cpu") for f in files]


def _read_spec(handles: list) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype code, shape) from safetensors headers (no tensor is read)."""
    spec: dict[str, tuple[str, tuple[int, ...]]] = {}
    for handle in handles:
        for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            if name in spec:
                raise PushRejected(f"{name} is in more than one file")
            piece = handle.get_slice(name)
            spec[name] = (piece.get_dtype(), tuple(piece.get_shape()))
    return spec


def _iter_tensors(handles: list) -> Iterator[tuple[str, torch.Tensor]]:
    for handle in handles:
        for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            yield name, handle.get_tensor(name)


def _few(names: list[str]) -> str:
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")


def spec_problems(manifest: dict, pushed: dict) -> list[str]:
    """Why `pushed` (name -> (dtype code, shape)) cannot replace `manifest` ([] when it can).

    >>> spec_problems({"a": ("F32", (2,))}, {"a": ("BF16", (2,))})
    []
    >>> spec_problems({"a": ("F32", (2,))}, {"a": ("I64", (3,)), "b": ("F32", (1,))})
    ['1 not in the served checkpoint: b', 'wrong shape: a [3] (served [2])', 'wrong dtype: a I64 (served F32)']
    """
    problems = []
    unknown = sorted(set(pushed) - set(manifest))
    missing = sorted(set(manifest) - set(pushed))
    if unknown:
        problems.append(f"{len(unknown)} not in the served checkpoint: {_few(unknown)}")
    if missing:
        problems.append(f"{len(missing)} missing: {_few(missing)}")
    shapes, dtypes = [], []
    for name in sorted(set(pushed) & set(manifest)):
        (code, shape), (want_code, want_shape) = pushed[name], manifest[name]
        if tuple(shape) != tuple(want_shape):
            shapes.append(f"{name} {list(shape)} (served {list(want_shape)})")
        if code != want_code and not (code in _FLOAT_CODES and want_code in _FLOAT_CODES):
            dtypes.append(f"{name} {code} (served {want_code})")
    if shapes:
        problems.append(f"wrong shape: {_few(shapes)}")
    if dtypes:
        problems.append(f"wrong dtype: {_few(dtypes)}")
    return problems


def checkpoint_manifest(model_config) -> dict[str, tuple[str, tuple[int, ...]]] | None:
    """name -> (dtype code, shape) of the checkpoint vLLM started from (`model_config` is vLLM's);
    None when it cannot be read (no local safetensors files)."""
    try:
        handles = _open(_checkpoint_files(model_config))
        return _read_spec(handles) if handles else None
    except Exception:
        return None


def update_problems(manifest: dict | None, weights: list[tuple[str, torch.Tensor]]) -> list[str]:
    """Why `weights` (vLLM checkpoint names) cannot replace the checkpoint `manifest` describes: a
    missing or unknown name, a wrong shape or a non-float dtype change ([] when they can, or when
    there is no manifest). Finer than `reload_in_place`'s check, which sees vLLM's fused parameters
    (a q_proj missing beside its k_proj and v_proj passes there)."""
    if manifest is None:
        return []
    pushed = {name: (_DTYPE_CODES.get(t.dtype, str(t.dtype)), tuple(t.shape)) for name, t in weights}
    return spec_problems(manifest, pushed)


def _sync_state(worker) -> _SyncState:
    state = getattr(worker, "_grpo_sync", None)
    if state is None:
        try:
            handles = _open(_checkpoint_files(worker.model_config))
        except Exception:  # unreadable: pushes are then checked by reload_in_place only, with no restore
            handles = []
        state = _SyncState(manifest=_read_spec(handles) if handles else None, last_good=handles or None)
        worker._grpo_sync = state
    return state


def _check_push(state: _SyncState, pushed: dict, check: bool) -> None:
    if check and state.manifest is not None:
        problems = spec_problems(state.manifest, pushed)
        if problems:
            raise PushRejected("; ".join(problems) + "; nothing was loaded")


def _apply(worker, state: _SyncState, weights: Iterable[tuple[str, torch.Tensor]], handles: list | None) -> int:
    """`reload_in_place`; when it fails after touching the model, reload the last good weights.
    On success the weights' open files (`handles`, None for weights that have none) become those."""
    try:
        count = reload_in_place(worker, weights)
    except Exception as exc:
        try:
            if not state.last_good:
                raise RuntimeError("no file holds them after an NCCL push") from None
            reload_in_place(worker, _iter_tensors(state.last_good))
        except Exception as again:
            state.consistent = False
            raise RuntimeError(f"loading the pushed weights failed ({exc}); restoring the last good weights failed "
                               f"({again}): the model holds partly updated weights until a push succeeds") from exc
        state.consistent = True
        raise RuntimeError(f"loading the pushed weights failed ({exc}); the last good weights were restored") from exc
    state.last_good, state.consistent = handles, True
    state.version += 1
    return count


def _push_answer(worker, session: str | None, seq: int, run, *, final: bool = True) -> dict:
    """Run one step of a push; every failure is an answer ({"ok": False, "error"}), never an exception.
    A failure, and the success of a push's final step, are recorded for `grpo_push_status`."""
    state = _sync_state(worker)
    try:
        answer = {"ok": True, **run(state)}
    except Exception as exc:
        if state.pending_id == (session, seq):
            state.pending, state.pending_id, state.staged = None, None, {}
        answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "rejected": isinstance(exc, PushRejected)}
        final = True
    if final and session is not None:
        state.pushes[session] = {"seq": seq, "ok": answer["ok"], "error": answer.get("error")}
        state.pushes.move_to_end(session)
        while len(state.pushes) > _KEPT_SESSIONS:
            state.pushes.popitem(last=False)
    return {**answer, "rank": int(worker.rank), "version": state.version, "consistent": state.consistent}


def wait_for_stream(stream, timeout: float, what: str) -> None:
    """Wait for the work queued on a CUDA stream, at most `timeout` seconds (NCCL has no timeout)."""
    done = torch.cuda.Event()
    done.record(stream)
    deadline = time.monotonic() + timeout
    while not done.query():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not finish within {timeout:g} s")
        time.sleep(0.002)


def _close_nccl(state: _SyncState) -> None:
    if state.comm is not None:
        state.comm.destroy()  # ncclCommAbort: also ends a broadcast stuck on a dead peer
    state.comm, state.stream, state.pending, state.pending_id, state.staged = None, None, None, None, {}


def nccl_library_loads() -> bool:
    """Whether vLLM's NCCL wrapper finds a library here (it silently disables itself otherwise)."""
    try:
        import vllm.envs as envs
        from vllm.distributed.device_communicators.pynccl_wrapper import NCCLLibrary

        if envs.VLLM_DISABLE_PYNCCL:
            return False
        NCCLLibrary()
    except Exception:
        return False
    return True


class WeightSyncExtension:
    """Mixed into every worker of a vLLM server (`--worker-extension-cls
    rollout.vllm.worker.WeightSyncExtension`): the workers' end of `VLLMServerClient`'s weight
    channel. Methods take JSON strings and answer JSON-able dicts; a failed push is an answer with
    `ok: false` and an `error`, never a hung or half-loaded worker:

    * before anything is loaded, the pushed names, shapes and dtypes are checked against the
      checkpoint the server started from (the same tensor names, the same shapes, a floating dtype
      where it has one): a mismatch is refused with the model untouched;
    * if loading fails all the same, the last good weights are reloaded from their files (the last
      file push, else the start-up checkpoint), which the workers keep open (memory-mapped), so the
      client may delete them; after an NCCL push there is no such file, and the answer (and every
      later status) says `consistent: false` until a push succeeds.
    """

    def grpo_info(self) -> dict:
        """Where this worker runs (platform, GPU, host) and its weight version."""
        state = _sync_state(self)
        device = torch.device(self.device)
        cuda = device.type == "cuda"
        return {
            "rank": int(self.rank), "device": str(device), "platform": device.type, "host": socket.gethostname(),
            "gpu_uuid": str(torch.cuda.get_device_properties(device).uuid) if cuda else None,
            "nccl": cuda and nccl_library_loads(), "checked": state.manifest is not None,
            "version": state.version, "consistent": state.consistent,
        }  # fmt: skip

    def grpo_push_status(self, session: str) -> dict:
        """The last push of a session: {"seq": 0} before its first."""
        state = _sync_state(self)
        record = state.pushes.get(session, {"seq": 0, "ok": None, "error": None})
        return {**record, "version": state.version, "consistent": state.consistent}

    def grpo_load_weights(self, request: str) -> dict:
        """File channel: load {"files": [safetensors paths], "session", "seq", "check"} in one update."""
        req = json.loads(request)
        files = [os.fspath(p) for p in req["files"]]

        def run(state: _SyncState) -> dict:
            try:
                handles = _open(files)
                pushed = _read_spec(handles)
            except Exception as exc:
                raise PushRejected(f"cannot read the pushed files ({exc})") from exc
            _check_push(state, pushed, bool(req.get("check", True)))
            return {"parameters": _apply(self, state, _iter_tensors(handles), handles)}

        return _push_answer(self, str(req["session"]), int(req["seq"]), run)

    def grpo_nccl_open(self, request: str) -> dict:
        """NCCL channel: join {"port", "world_size", "client_rank", "timeout"} (worker 0 hosts the
        rendezvous store on `port`; the client is the last rank)."""
        req = json.loads(request)

        def run(state: _SyncState) -> dict:
            from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
            from vllm.distributed.utils import StatelessProcessGroup

            if torch.device(self.device).type != "cuda" or not nccl_library_loads():
                raise PushRejected(f"no NCCL on this worker ({self.device}); use the file channel")
            _close_nccl(state)
            rank = int(self.rank)
            group = StatelessProcessGroup.create(
                host="0.0.0.0" if rank == 0 else "127.0.0.1", port=int(req["port"]), rank=rank,
                world_size=int(req["world_size"]), store_timeout=max(1, round(float(req["timeout"]))),
            )  # fmt: skip
            comm = PyNcclCommunicator(group, device=self.device)
            if comm.disabled:
                raise RuntimeError("vLLM disabled the NCCL communicator")
            state.comm, state.stream = comm, torch.cuda.Stream(device=self.device)
            state.client_rank = int(req["client_rank"])
            return {}

        return _push_answer(self, None, 0, run, final=False)

    def grpo_nccl_begin(self, request: str) -> dict:
        """NCCL channel: announce a push {"session", "seq", "tensors": [[name, dtype, shape], ...],
        "check"}; it is checked here, before any tensor is sent."""
        req = json.loads(request)
        session, seq = str(req["session"]), int(req["seq"])

        def run(state: _SyncState) -> dict:
            if state.comm is None:
                raise PushRejected("the NCCL channel is not open")
            state.pending, state.pending_id, state.staged = None, None, {}
            pending, pushed = [], {}
            for name, dtype, shape in req["tensors"]:
                torch_dtype = getattr(torch, str(dtype), None)
                if torch_dtype not in _DTYPE_CODES:
                    raise PushRejected(f"{name}: unsupported dtype {dtype}")
                if name in pushed:
                    raise PushRejected(f"{name} is pushed twice")
                pushed[name] = (_DTYPE_CODES[torch_dtype], tuple(int(s) for s in shape))
                pending.append((name, torch_dtype, pushed[name][1]))
            _check_push(state, pushed, bool(req.get("check", True)))
            state.pending, state.pending_id = pending, (session, seq)
            return {}

        return _push_answer(self, session, seq, run, final=False)

    def grpo_nccl_receive(self, request: str) -> dict:
        """NCCL channel: receive tensors [start, stop) of the announced push (staged on the CPU);
        {"session", "seq", "start", "stop", "timeout"}. A transfer past `timeout` closes the channel."""
        req = json.loads(request)
        session, seq = str(req["session"]), int(req["seq"])

        def run(state: _SyncState) -> dict:
            if state.comm is None or state.pending_id != (session, seq):
                raise PushRejected("no such push announced on the NCCL channel")
            received = []
            with torch.cuda.stream(state.stream):
                for i in range(int(req["start"]), int(req["stop"])):
                    _, dtype, shape = state.pending[i]
                    buffer = torch.empty(shape, dtype=dtype, device=self.device)
                    state.comm.broadcast(buffer, src=state.client_rank, stream=state.stream)
                    received.append((i, buffer))
            try:
                wait_for_stream(state.stream, float(req["timeout"]), "receiving the weights over NCCL")
            except TimeoutError:
                _close_nccl(state)
                raise
            for i, buffer in received:
                state.staged[i] = buffer.to("cpu")
            return {}

        return _push_answer(self, session, seq, run, final=False)

    def grpo_nccl_finish(self, request: str) -> dict:
        """NCCL channel: load the received push {"session", "seq"} in one update."""
        req = json.loads(request)
        session, seq = str(req["session"]), int(req["seq"])

        def run(state: _SyncState) -> dict:
            if state.pending_id != (session, seq):
                raise PushRejected("no such push announced on the NCCL channel")
            pending, staged = state.pending, state.staged
            state.pending, state.pending_id, state.staged = None, None, {}
            if len(staged) != len(pending):
                raise PushRejected(f"{len(pending) - len(staged)} of {len(pending)} tensors never arrived")
            weights = [(pending[i][0], staged[i]) for i in range(len(pending))]
            return {"parameters": _apply(self, state, weights, None)}

        return _push_answer(self, session, seq, run)

    def grpo_nccl_close(self) -> dict:
        _close_nccl(_sync_state(self))
        return {"ok": True, "rank": int(self.rank)}

    def grpo_push_failed(self, request: str) -> dict:
        """Record {"session", "seq", "error"}: the client failed a push before the workers could
        (so the ranks waiting for it stop at once); a push the workers already recorded is kept."""
        req = json.loads(request)
        state = _sync_state(self)
        session, seq = str(req["session"]), int(req["seq"])
        if state.pushes.get(session, {}).get("seq") != seq:
            state.pushes[session] = {"seq": seq, "ok": False, "error": str(req["error"])}
            state.pushes.move_to_end(session)
        return {"ok": True, "rank": int(self.rank)}
