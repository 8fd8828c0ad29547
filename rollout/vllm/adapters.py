"""LoRA adapter versions for vLLM: each written in PEFT's file format to RAM, loaded by path.

vLLM 0.32 loads an adapter from a directory only (`LoRARequest(name, id, path)` in-process,
`POST /v1/load_lora_adapter` on a server), so every version the trainer pushes is written to its
own directory under a root in /dev/shm (a RAM-backed filesystem, where there is one): the tensors
as `adapter_model.safetensors` (PEFT's names, without the adapter name) and `adapter_config.json`.
Once vLLM holds a newer version, the older one is removed from vLLM and from RAM.

`vllm` is imported only inside functions of this module.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

LORA_RANK_SLOTS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted `max_lora_rank` values


def lora_rank_slot(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds an adapter of `rank`.

    >>> lora_rank_slot(4), lora_rank_slot(16), lora_rank_slot(17)
    (8, 16, 32)
    """
    for slot in LORA_RANK_SLOTS:
        if slot >= rank:
            return slot
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank ({LORA_RANK_SLOTS[-1]})")


def ram_dir(prefix: str) -> str:
    """A new private directory in /dev/shm (RAM) where it is writable, else in the temporary directory."""
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix=prefix, dir=shm)


def write_adapter(path: str, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> str:
    """Write an adapter in PEFT's format to the new directory `path`; returns it."""
    from safetensors.torch import save_file

    os.makedirs(path)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(dict(config), f)
    return path


class AdapterVersions:
    """The policy's adapter versions: version n is written to `root/v{n}` and named `{prefix}-v{n}`;
    `swap` makes one current and deletes the files of the one it replaces."""

    def __init__(self, prefix: str = "policy"):
        self.root = ram_dir("grpo-lora-")
        self.prefix = prefix
        self.version = 0
        self.request = None  # the vLLM LoRARequest generation uses (in-process engine)
        self.path: str | None = None  # the current version's directory

    def name(self, version: int) -> str:
        return f"{self.prefix}-v{version}"

    def write(self, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> str:
        """The next version's files; returns their directory."""
        self.version += 1
        return write_adapter(os.path.join(self.root, f"v{self.version}"), tensors, config)

    def request_for(self, path: str):
        """vLLM's `LoRARequest` of the version just written to `path`."""
        from vllm.lora.request import LoRARequest

        return LoRARequest(self.name(self.version), self.version, path)

    def swap(self, request=None, path: str | None = None):
        """Make the latest version current; returns the request it replaces (its files deleted)."""
        old, old_path = self.request, self.path
        self.request, self.path = request, path or (request.lora_path if request is not None else None)
        if old_path is not None:
            shutil.rmtree(old_path, ignore_errors=True)
        return old

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
