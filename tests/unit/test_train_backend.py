"""The process group backend raybm hands Ray Train: the controller that unpickles it never
imports torch (it is a fresh process per run, and torch costs it about 2 s)."""

import subprocess
import sys

import cloudpickle

from raybm.ray_patches import TorchProcessGroup, TorchProcessGroupConfig


def test_the_train_controller_reads_the_backend_without_importing_torch():
    pickled = cloudpickle.dumps(TorchProcessGroupConfig(backend="gloo", timeout_s=60))
    code = (
        "import pickle, sys\n"
        f"config = pickle.loads({pickled!r})\n"
        "backend = config.backend_cls()\n"
        "assert (config.backend, config.timeout_s) == ('gloo', 60), config\n"
        "assert backend.share_cuda_visible_devices\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_it_records_what_ray_s_torch_config_records():
    from ray.train.torch import TorchConfig

    ours, rays = TorchProcessGroupConfig(backend="nccl", timeout_s=90), TorchConfig(backend="nccl", timeout_s=90)
    assert ours.to_dict() == rays.to_dict() and ours.framework == rays.framework
    assert ours.train_func_context is rays.train_func_context  # the worker's CUDA device, as Ray sets it
    assert TorchProcessGroup.share_cuda_visible_devices == rays.backend_cls.share_cuda_visible_devices
