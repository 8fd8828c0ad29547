"""Launching: `grpo train` re-runs itself under `accelerate launch` with a config file.

    accelerate launch --config_file recipes/accelerate/cpu-2proc.yaml -m grpo train RECIPE ...

`NAME` is a file of `recipes/accelerate/` without `.yaml` (`grpo.config.resolve_accelerate_config`).
On CPU the configs say `distributed_type: MULTI_GPU` with `use_cpu: true`: accelerate then starts
its processes with torchrun and the Accelerator runs as `MULTI_CPU` over gloo. (A `MULTI_CPU`
config makes `accelerate launch` go through MPI and, without `mpirun`, it started one process only.)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(config: Path, train_args: list[str], *, num_machines: int | None = None,
                   machine_rank: int | None = None, main_process_ip: str | None = None,
                   main_process_port: int | None = None) -> list[str]:
    """`accelerate launch --config_file CONFIG [overrides] -m grpo train ARGS`."""
    import yaml

    conf = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    machines = num_machines or conf.get("num_machines", 1)
    if num_machines is not None:
        # accelerate reads num_processes as the total over machines
        per_machine = conf.get("num_processes", 1) // max(1, conf.get("num_machines", 1))
        cmd += ["--num_machines", str(num_machines), "--num_processes", str(per_machine * num_machines)]
    if machine_rank is not None:
        cmd += ["--machine_rank", str(machine_rank)]
    if main_process_ip is not None:
        cmd += ["--main_process_ip", main_process_ip]
    port = main_process_port or conf.get("main_process_port")
    if port is None and machines == 1:
        port = free_port()  # never collide with another job on this machine
    if port is not None:
        cmd += ["--main_process_port", str(port)]
    return cmd + ["-m", "grpo", "train", *train_args]


def launched_processes(config: Path, num_machines: int | None = None) -> int:
    """Processes in the whole job that `launch_command` starts for this config."""
    import yaml

    conf = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    total = conf.get("num_processes", 1)
    if num_machines is not None:
        total = total // max(1, conf.get("num_machines", 1)) * num_machines
    return max(1, total)


def launch(config: Path, train_args: list[str], **overrides) -> int:
    cmd = launch_command(config, train_args, **overrides)
    env = {**os.environ, "GRPO_ZERO_LAUNCHED": "1"}
    return subprocess.call(cmd, env=env)
