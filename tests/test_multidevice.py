"""Synchronised BatchNorm on 8 simulated CPU devices, each scenario in a subprocess.

JAX fixes the number of CPU devices when it starts, so the checks live in scripts
under `tests/multidevice/` that set `--xla_force_host_platform_device_count=8`
before importing JAX; this process keeps its single device. Each script runs all of
its checks (one start-up for many) and reports them as one JSON line, and each
test below fails with the tracebacks of the checks that failed.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest
from helpers import PYTHON_WARNINGS

TESTS = pathlib.Path(__file__).parent
ROOT = TESTS.parent
PREFIX = "MULTIDEVICE-RESULTS "

# Every check each script must report, so that none is skipped silently.
CHECKS = {
    "accumulation_checks.py": [
        "micro_batches_stay_sharded",
        "pooled_step_sharded",
        "exact_step_sharded",
        "whole_batch_layers_sharded",
    ],
    "sync_checks.py": [
        "shard_map_vmap_inside",
        "shard_map_mesh_axis_check_vma",
        "shard_map_two_mesh_axes",
        "pmap_vmap_inside",
        "vmap_inside_shard_map_check_vma",
        "masks_uneven_counts_exact",
        "flax_matches_without_mask",
        "flax_averages_device_means_with_mask",
        "groups_pmap",
        "groups_shard_map",
        "groups_errors",
        "unbiased_one_element_per_group_errors",
        "unbound_axis_errors",
    ],
    "recalibrate_checks.py": [
        "default_call_sharded_batches",
        "whole_batch_model_sharded_batches",
        "population_sharded_batches",
        "shard_map_apply",
    ],
    "sharding_checks.py": [
        "explicit_mesh",
        "auto_mesh",
        "masks_uneven_over_shards",
        "two_steps_running_stats",
        "state_off_the_mesh_error",
    ],
    "variants_checks.py": [
        "ghost_spans_devices_when_the_device_axis_is_named",
        "ghost_numbering_follows_the_order_of_the_names",
        "ghost_stays_on_each_device_when_only_the_vmap_axis_is_named",
        "ghost_with_masks_over_devices",
        "ghost_with_axis_index_groups",
        "renorm_over_devices",
        "ghost_and_renorm_over_devices",
        "ghost_whole_batch_sharded_by_jit",
    ],
}


def run_python(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run(
        [sys.executable, *PYTHON_WARNINGS, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )


def test_this_process_keeps_one_device():
    assert jax.device_count() == 1


def test_every_check_script_is_run():
    """A script under tests/multidevice/ that CHECKS does not list would never run
    (variants_checks.py was written and not listed)."""
    scripts = {p.name for p in (TESTS / "multidevice").glob("*_checks.py")}
    assert scripts == set(CHECKS)


@pytest.mark.multidevice
@pytest.mark.parametrize("script", sorted(CHECKS))
def test_multidevice_checks(script):
    proc = run_python(str(TESTS / "multidevice" / script))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(PREFIX)]
    assert lines, (
        f"{script} stopped before reporting (exit {proc.returncode}):\n"
        f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    results = json.loads(lines[-1][len(PREFIX) :])
    assert sorted(results) == sorted(CHECKS[script])
    failed = {name: tb for name, tb in results.items() if tb is not None}
    assert not failed, "\n".join(f"--- {name}\n{tb}" for name, tb in failed.items())


@pytest.mark.multidevice
def test_data_parallel_example(tmp_path):
    proc = run_python("examples/data_parallel.py", "--smoke", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "8 devices (cpu)" in proc.stdout
    assert proc.stdout.count("equal to the single-device step: True") == 2, proc.stdout
