"""The `lightserve` command: `serve` and `bench` are the server's and the benchmark's own flags."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lightserve.cli import main


def test_no_or_unknown_subcommand_prints_the_usage_and_fails(capsys) -> None:
    assert main([]) == 2 and main(["start"]) == 2
    assert "lightserve {serve,bench}" in capsys.readouterr().err
    assert main(["--help"]) == 0 and "lightserve serve --help" in capsys.readouterr().out


@pytest.mark.parametrize("command,flag", [("serve", "--chunked_prefill_size"), ("bench", "--shared-prefix-len")])
def test_subcommands_take_their_modules_flags(capsys, command: str, flag: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and flag in capsys.readouterr().out


def test_the_installed_console_script_runs_it() -> None:
    # Installed beside the interpreter that installed the package (its bin/ may not be on PATH).
    beside = Path(sys.executable).parent / "lightserve"
    script = str(beside) if beside.exists() else shutil.which("lightserve")
    assert script is not None, "`pip install -e .` installs the `lightserve` command"
    out = subprocess.run([script, "serve", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--disable_prefix_cache" in out.stdout
