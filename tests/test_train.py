"""`python -m trinity_titan.train` adds Trinity's config module to the command line it parses."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.fixtures import DEBUG_TOML, REPO
from trinity_titan.train import with_trinity_config

MODULE = ["--job.custom_config_module", "trinity_titan.job_config"]


def test_the_module_is_added_unless_named(tmp_path):
    plain = tmp_path / "plain.toml"
    plain.write_text('[model]\nname = "trinity"\n')
    assert with_trinity_config(["--job.config_file", str(plain)])[-2:] == MODULE
    assert with_trinity_config(["--help"]) == ["--help", *MODULE]
    # named on the command line or in the TOML: left alone
    named = ["--job.custom_config_module=my.module"]
    assert with_trinity_config(named) == named
    assert with_trinity_config(["--job.config_file", str(DEBUG_TOML)]) == [
        "--job.config_file",
        str(DEBUG_TOML),
    ]


def test_help_lists_trinitys_sections():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "trinity_titan.train", "--help"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for option in ("--moe.balance-method", "--loss.z-loss-coeff", "--nan-guard.action"):
        assert option in proc.stdout, option
