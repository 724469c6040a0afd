"""How much of a training worker's steady compute Ray's own processes take on a small machine.

    .venv/bin/python bench/ray_tax.py [--seconds 30] [--threads 2] \
        [--setting "name:VAR=VALUE,VAR=VALUE" ...]      # alone on the machine: no other Ray

A fixed torch workload (a MiniLM-sized feed-forward block, forward and backward, on
``--threads`` threads) runs for ``--seconds`` in a plain process and then in the one worker
of a ``TorchTrainer`` on a fresh local Ray started as raybm starts one, once per setting
(environment variables the Ray side starts with), then in a Tune trial's process holding
one CPU (where a sweep trial of one worker trains: ``--where``). Printed for each: steps/s, the ratio to
the plain process, and the CPU seconds every other process on the machine used in the same
window (read from /proc), grouped by what it is: that is the tax Ray's resident processes
(controller, actors, raylet, GCS, dashboard) take from the worker's cores. Without a
setting, it compares raybm's defaults against Ray's (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT_SETTINGS = [
    "raybm (poll 0.5 s):RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.5",
    "Ray's poll (2 s):RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=2",
    "poll 5 s:RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=5",
]
WARMUP_S = 3.0


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """{pid: (what it is, user + system CPU seconds so far)} for every process on the machine."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(pid)] = (kind(cmd or stat.split("(", 1)[1].split(")")[0]), (int(fields[11]) + int(fields[12])) / tick)
    return out


def kind(cmd: str) -> str:
    """A short name for a process: Ray's processes by role, anything else by its program."""
    for marker in (
        "ray::",
        "gcs_server",
        "raylet",
        "dashboard/agent",
        "dashboard.py",
        "runtime_env/agent",
        "log_monitor",
        "monitor.py",
        "dashboard/dashboard",
    ):
        if marker in cmd:
            return cmd[cmd.index(marker) :].split()[0][:48] if marker == "ray::" else marker
    return os.path.basename(cmd.split()[0]) if cmd else "?"


def used_between(before: dict, after: dict, exclude: int) -> dict[str, float]:
    """CPU seconds each kind of process used between two readings, but the measured one."""
    used: dict[str, float] = defaultdict(float)
    for pid, (name, cpu) in after.items():
        if pid == exclude:
            continue
        used[name] += cpu - before.get(pid, (name, 0.0))[1]
    return {k: round(v, 2) for k, v in sorted(used.items(), key=lambda kv: -kv[1]) if v >= 0.05}


def thread_seconds() -> dict[str, float]:
    """{thread name: CPU seconds so far} for this process's threads (names summed)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = defaultdict(float)
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat.split("(", 1)[1].rsplit(")", 1)[0]
        fields = stat.rsplit(")", 1)[1].split()
        out[name] += (int(fields[11]) + int(fields[12])) / tick
    return out


def workload(seconds: float, threads: int) -> dict:
    """Forward and backward steps of a MiniLM-sized block for ``seconds`` after a warm-up:
    steps/s, and what the other processes used in that window."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(384, 1536), torch.nn.GELU(), torch.nn.Linear(1536, 384))
    x = torch.randn(32 * 64, 384)

    def step():
        block.zero_grad()
        block(x).pow(2).mean().backward()

    end = time.perf_counter() + WARMUP_S
    while time.perf_counter() < end:
        step()
    own_before, before, started, steps = thread_seconds(), cpu_seconds(), time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        step()
        steps += 1
    elapsed = time.perf_counter() - started
    own = {k: round(v - own_before.get(k, 0.0), 2) for k, v in thread_seconds().items()}
    return {
        "steps_per_s": steps / elapsed,
        "window_s": elapsed,
        "others_cpu_s": used_between(before, cpu_seconds(), exclude=os.getpid()),
        "own_threads_cpu_s": {k: v for k, v in sorted(own.items(), key=lambda kv: -kv[1]) if v >= 0.05},
    }


def ray_side(seconds: float, threads: int, out: str, where: str) -> None:
    """The workload on a fresh local Ray started as raybm starts one: in the one worker of a
    TorchTrainer (``where="train"``, as a raybm run trains), or in the process of a Tune
    trial holding one CPU (``"tune"``, as a sweep trial of one worker trains)."""
    import ray

    from raybm.config import build_config
    from raybm.runtime import ensure_ray

    ensure_ray(build_config().ray)

    def loop(config):
        with open(config["out"], "w") as f:
            json.dump(workload(config["seconds"], config["threads"]), f)

    config = {"seconds": seconds, "threads": threads, "out": out}
    if where == "tune":
        from ray import tune

        tune.Tuner(
            tune.with_resources(lambda _params: loop(config), {"CPU": 1}),
            run_config=tune.RunConfig(storage_path=tempfile.mkdtemp(prefix="ray-tax-"), verbose=0),
        ).fit()
    else:
        import ray.train
        from ray.train.torch import TorchTrainer

        TorchTrainer(
            loop,
            train_loop_config=config,
            scaling_config=ray.train.ScalingConfig(num_workers=1),
            run_config=ray.train.RunConfig(storage_path=tempfile.mkdtemp(prefix="ray-tax-")),
        ).fit()
    ray.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--setting", action="append", help="'name:VAR=VALUE,VAR=VALUE' (repeatable)")
    parser.add_argument(
        "--where",
        default="train,tune",
        help="train: a TorchTrainer worker, once per setting; tune: a Tune trial's process, once",
    )
    parser.add_argument("--ray-side", help=argparse.SUPPRESS)  # internal: the child run, writing to this file
    args = parser.parse_args()
    if args.ray_side:
        ray_side(args.seconds, args.threads, args.ray_side, args.where)
        return 0

    plain = workload(args.seconds, args.threads)
    print(
        f"{'plain process':<28} {plain['steps_per_s']:7.2f} steps/s           others: {plain['others_cpu_s']}; "
        f"own threads: {plain['own_threads_cpu_s']}",
        flush=True,
    )
    wheres = args.where.split(",")
    runs = [("train", setting) for setting in (args.setting or DEFAULT_SETTINGS) if "train" in wheres]
    runs += [("tune", "a Tune trial's process:")] if "tune" in wheres else []
    for where, setting in runs:
        name, _, assignments = setting.partition(":")
        env = dict(os.environ, PYTHONPATH=ROOT)
        env.update(a.split("=", 1) for a in assignments.split(",") if a)
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--seconds",
                    str(args.seconds),
                    "--threads",
                    str(args.threads),
                    "--where",
                    where,
                    "--ray-side",
                    out.name,
                ],
                env=env,
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            got = json.load(open(out.name))
        others = got["others_cpu_s"]
        print(
            f"{name:<28} {got['steps_per_s']:7.2f} steps/s  x{got['steps_per_s'] / plain['steps_per_s']:.3f}  "
            f"others {sum(others.values()):5.1f} CPU s in {got['window_s']:.0f} s: {others}; "
            f"own threads: {got['own_threads_cpu_s']}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
