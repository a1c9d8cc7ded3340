"""The command line: help, config show, migrate."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from dicomcloud.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]


def dicomcloud(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomcloud", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_help_lists_every_command() -> None:
    result = dicomcloud("--help")
    assert result.returncode == 0
    for command in ("run", "migrate", "import", "config", "certs"):
        assert command in result.stdout


def test_run_help_documents_every_option() -> None:
    result = dicomcloud("run", "--help")
    for option in ("--roles", "--data-dir", "--http-port", "--dimse-port", "--ae-title",
                   "--config"):
        assert option in result.stdout


def test_settings_toml_documents_exactly_the_defaults() -> None:
    documented = tomllib.loads((ROOT / "config" / "settings.toml").read_text())
    defaults = Settings()
    for key, value in documented.items():
        if isinstance(value, dict):
            section = getattr(defaults, key)
            for name, item in value.items():
                current = getattr(section, name)
                assert (dict(current) if name == "ae_tenants" else current) == (
                    tuple(item) if isinstance(item, list) else item), f"{key}.{name}"
        elif key == "roles":
            assert tuple(value) == defaults.roles
        elif key == "data_dir":
            assert Path(value) == defaults.data_dir
        else:
            assert getattr(defaults, key) == value, key


def test_environment_overrides_nested_settings(monkeypatch) -> None:
    monkeypatch.setenv("DICOMCLOUD_SCP__PORT", "10104")
    monkeypatch.setenv("DICOMCLOUD_INDEX_URL", "postgresql+asyncpg://u:secret@db/dicom")
    settings = load_settings()
    assert settings.scp.port == 10104
    assert settings.index_url == "postgresql+asyncpg://u:secret@db/dicom"


def test_config_show_masks_passwords(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "DICOMCLOUD_INDEX_URL": "postgresql+asyncpg://u:hunter2@db/dicom"}
    result = dicomcloud("config", "show", cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout
    assert "u:***@db/dicom" in result.stdout


def test_bad_role_is_a_clear_error() -> None:
    result = dicomcloud("run", "--roles", "scp,bogus")
    assert result.returncode == 2
    assert "unknown role(s) bogus" in result.stderr


def test_migrate_is_repeatable(tmp_path: Path) -> None:
    first = dicomcloud("migrate", "--data-dir", str(tmp_path / "d"))
    assert first.returncode == 0, first.stderr
    assert "0001_initial" in first.stderr
    second = dicomcloud("migrate", "--data-dir", str(tmp_path / "d"))
    assert "up to date" in second.stderr


def test_run_takes_its_roles_from_the_environment_unless_given(tmp_path: Path) -> None:
    """DICOMCLOUD_ROLES (or the ``roles`` setting) chooses the roles; --roles overrides."""
    import os
    import signal
    import time

    env = {**os.environ, "DICOMCLOUD_ROLES": "worker"}

    def started_roles(*extra: str) -> str:
        log = tmp_path / f"run{len(extra)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "dicomcloud", "run", "--data-dir",
                                     str(tmp_path / "d"), *extra], env=env, stdout=out,
                                    stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                for line in log.read_text(errors="replace").splitlines():
                    if "starting roles" in line:
                        return line.split("starting roles ")[1].split(" ")[0]
                time.sleep(0.1)
            raise AssertionError(log.read_text(errors="replace"))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)

    assert started_roles() == "worker"
    assert started_roles("--roles", "consumer,worker") == "consumer,worker"
