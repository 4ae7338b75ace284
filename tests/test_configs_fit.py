"""Every shipped config fits the hardware it names (``HARDWARE``) by the planner; ``--hardware
cpu`` plans; the planner counts the frozen reference model in the dtype the loop holds it in."""

import dataclasses
import glob
import importlib.util
import os

import pytest

from jaxrl import config as config_lib
from jaxrl.plan import command
from jaxrl.plan.hardware import parse_hardware, resolve_model
from jaxrl.plan.memory import PlanSettings, estimate

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
SHIPPED = sorted(p for p in glob.glob(os.path.join(CONFIG_DIR, "*.py")) if not p.endswith("__init__.py"))


def _hardware_of(path):
    spec = importlib.util.spec_from_file_location("shipped_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.HARDWARE


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_shipped_config_fits_its_hardware(path):
    model, settings = command.settings_from_config(config_lib.load_config(path, check_files=False))
    result = estimate(model, settings, parse_hardware(_hardware_of(path)))
    assert result.fits, (path, result.peak_bytes / 2**30, result.hardware.usable_bytes / 2**30)


def test_plan_command_on_cpu(capsys):
    assert command.main(["--config", os.path.join(CONFIG_DIR, "default.py"), "--hardware", "cpu"]) == 0
    assert "FITS" in capsys.readouterr().out
    assert parse_hardware("cpu").num_devices == 1 and parse_hardware("h100").num_devices == 1


def test_unknown_hardware_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        command.main(["--model", "qwen3-8b", "--hardware", "tpu9"])
    assert exit_info.value.code == 2 and "unknown hardware 'tpu9'" in capsys.readouterr().err


def test_reference_model_counted_in_param_dtype():
    model = resolve_model("qwen2.5-math-1.5b")
    base = PlanSettings(mesh=(1, 1, 1), param_dtype="float32", dtype="bfloat16")
    plan = estimate(model, dataclasses.replace(base, reference_model=True), parse_hardware("h100"))
    # the loop's ref_params is jnp.copy(state.params): float32, 4 bytes per parameter
    assert plan.components["reference_params"] == plan.components["params"] == model.num_params() * 4


def test_report_copy_counted():
    model = resolve_model("qwen2.5-math-1.5b")
    settings = PlanSettings(mesh=(1, 1, 1), sampling_rows=64, eval_rows=128)
    plan = estimate(model, settings, parse_hardware("h100"))
    assert plan.components["report_params_copy"] == plan.components["params"]
    assert plan.components["report_kv_cache"] == 2 * plan.components["kv_cache"]
