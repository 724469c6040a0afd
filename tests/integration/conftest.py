import pytest


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray per test module (starting Ray costs seconds)."""
    import ray
    import ray.data

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield ray
    finally:
        ray.shutdown()
