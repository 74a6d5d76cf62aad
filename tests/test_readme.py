"""Every code block of README.md runs as written.

- ``python`` blocks run in order in one interpreter (the README says they are one session), in a
  temporary working directory; an error points at the README's own line.
- ``bash`` blocks run line by line in a temporary directory that links ``train.py`` and ``configs/``:
  the install lines are skipped (CI has just run them), ``python train.py`` and ``fimcb report`` run as
  written, and each ``python train.py fit ...`` line is parsed to the end with ``--print_config`` (every
  flag and class path checked; the configs themselves train in ``tests/test_cli.py``).
- ``yaml`` blocks configure the callback: merged over the default config and parsed the same way.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SETUP = ("python3 -m venv", "pip install")
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _blocks(language: str) -> list[tuple[int, str]]:
    """``(first line number, code)`` of every fenced block of ``language``, in order."""
    text = README.read_text()
    return [
        (text[: m.start(2)].count("\n") + 1, m.group(2))
        for m in BLOCK.finditer(text)
        if m.group(1) == language
    ]


def _run(command: str | list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": str(ROOT / "src")}
    env["PATH"] = (
        f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # python, fimcb: this venv
    )
    out = subprocess.run(
        command,
        cwd=cwd,
        env=env,
        shell=isinstance(command, str),
        executable="/bin/bash" if isinstance(command, str) else None,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, (
        f"{command}\n--- stdout\n{out.stdout[-3000:]}\n--- stderr\n{out.stderr[-5000:]}"
    )
    return out


def _workspace(tmp_path: Path) -> Path:
    for name in ("train.py", "configs"):
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path


def test_the_readme_has_the_blocks_this_test_runs() -> None:
    languages = {m.group(1) for m in BLOCK.finditer(README.read_text())}
    assert languages == {"bash", "python", "yaml"}, "teach tests/test_readme.py to run the new kind of block"
    assert len(_blocks("python")) >= 3


def test_python_blocks_run_in_order_as_one_session(tmp_path: Path) -> None:
    runner = (
        "import sys\n"
        "namespace = {'__name__': '__main__'}\n"
        "for line, code in BLOCKS:\n"
        "    exec(compile('\\n' * (line - 1) + code, 'README.md', 'exec'), namespace)\n"
    )
    script = tmp_path / "readme_session.py"
    script.write_text(f"BLOCKS = {_blocks('python')!r}\n{runner}")
    out = _run([sys.executable, str(script)], _workspace(tmp_path))
    assert "fim_gaussian" in out.stdout  # the OOD tables were printed
    assert (tmp_path / "runs" / "my_flow" / "version_0" / "ood_metrics.json").is_file()


def _bash_lines() -> list[str]:
    return [
        line.strip()
        for _, code in _blocks("bash")
        for line in code.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def _parse_only(line: str) -> bool:
    return shlex.split(line, comments=True)[:3] == ["python", "train.py", "fit"]


def test_bash_blocks_run_as_written(tmp_path: Path) -> None:
    workspace = _workspace(tmp_path)
    lines = _bash_lines()
    assert any(line.startswith("python train.py") and not _parse_only(line) for line in lines)
    for line in lines:
        if line.startswith(SETUP):
            continue
        if _parse_only(line):
            command = [*shlex.split(line, comments=True), "--print_config"]
            _run([sys.executable, *command[1:]], workspace)
        else:
            _run(line, workspace)
    assert (workspace / "runs" / "digits_glow" / "version_0" / "report").is_dir()


def test_yaml_blocks_configure_the_callback(tmp_path: Path) -> None:
    workspace = _workspace(tmp_path)
    for line, code in _blocks("yaml"):
        snippet = tmp_path / f"readme_{line}.yaml"
        snippet.write_text(code)
        args = [
            "train.py",
            "fit",
            "--config",
            "configs/default.yaml",
            "--config",
            str(snippet),
            "--print_config",
        ]
        printed = _run([sys.executable, *args], workspace).stdout
        assert "fimcb.FIMNormCallback" in printed
