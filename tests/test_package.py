"""The package as users meet it: cheap import, the command, the public names."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

import trainguard

from _rig import run_python

HEAVY = ("torch", "transformers", "accelerate", "datasets", "peft", "trl", "safetensors.torch")


def test_import_trainguard_loads_no_model_stack():
    code = (
        "import sys, trainguard\n"
        "names = [n for n in trainguard.__all__]\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(','.join(heavy) or 'none')\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "none"


def test_callbacks_load_the_model_stack_only_when_first_used():
    code = (
        "import sys, trainguard\n"
        "assert 'transformers' not in sys.modules\n"
        "guards = trainguard.all_guards()\n"
        "from transformers import TrainerCallback\n"
        "assert all(isinstance(g, TrainerCallback) for g in guards)\n"
        "print('transformers' in sys.modules)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


def test_every_public_name_resolves():
    for name in trainguard.__all__:
        assert getattr(trainguard, name) is not None, name
    with pytest.raises(AttributeError):
        trainguard.no_such_name  # noqa: B018


def test_all_guards_rejects_an_unknown_guard_keyword():
    with pytest.raises(TypeError, match="unknown guard keyword"):
        trainguard.all_guards(no_such_guard=False)


def test_package_ships_py_typed_marker():
    assert (Path(trainguard.__file__).parent / "py.typed").is_file()


def _trainguard_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("trainguard")
    return [str(exe)] if exe.exists() else [shutil.which("trainguard") or "trainguard"]


def test_command_and_module_print_the_version():
    import subprocess

    from _rig import subprocess_env

    for cmd in (_trainguard_cmd(), [sys.executable, "-m", "trainguard"]):
        result = subprocess.run([*cmd, "--version"], capture_output=True, text=True, env=subprocess_env())
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"trainguard {trainguard.__version__}"


def test_help_exits_zero_and_explains_exit_codes():
    result = run_python("import sys; from trainguard.cli import main; sys.exit(main(['--help']))")
    assert result.returncode == 0
    assert "usage: trainguard" in result.stdout
    assert "0 all good, 1 a check failed, 2 usage or I/O error" in " ".join(result.stdout.split())


@pytest.mark.parametrize("argv", [[], ["no-such-command"], ["--no-such-flag"]])
def test_usage_errors_exit_two_without_a_traceback(argv):
    result = run_python(f"import sys; from trainguard.cli import main; sys.exit(main({argv!r}))")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
