"""fetch_assets, offline: a pre-populated Hugging Face cache stands in for the Hub.

The cache is laid out as huggingface_hub lays it out (refs/main -> commit, snapshots/<commit>/
links into blobs/), holding the debug tokenizer and Trinity Nano's published config.json. The
first test runs the tool as a user does, in a subprocess with HF_HUB_OFFLINE=1 and HF_HUB_CACHE;
the others call it in-process with huggingface_hub's offline switch set and --cache-dir.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import DEBUG_ASSETS, NANO_HF_CONFIG, REPO, job_config_from
from trinity_titan.job_config import ConfigError
from trinity_titan.model import trinity_flavors
from trinity_titan.model.flavors import FLAVOR_ASSETS
from trinity_titan.tools.fetch_assets import main
from trinity_titan.training.checks import check_job

NANO_TOML = REPO / "train_configs" / "trinity_nano.toml"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hf_cache(root: Path, repo: str, files: dict[str, bytes]) -> Path:
    """A huggingface_hub cache holding `files` as `repo`'s main revision."""
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (folder / "blobs").mkdir()
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return root


def run_fetch(cwd: Path, cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "trinity_titan.tools.fetch_assets", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def offline(monkeypatch):
    """huggingface_hub's HF_HUB_OFFLINE=1, for calls in this process (it reads it at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def nano_cache(tmp_path: Path) -> Path:
    files = {
        name: (DEBUG_ASSETS / name).read_bytes()
        for name in ("tokenizer.json", "tokenizer_config.json")
    }
    files["config.json"] = json.dumps(NANO_HF_CONFIG).encode()
    files["generation_config.json"] = b'{"bos_token_id": 0, "eos_token_id": 1}'
    files["model-00001-of-00002.safetensors"] = b"weights are never fetched"
    return hf_cache(tmp_path / "hf_cache", FLAVOR_ASSETS["nano"].repo, files)


def test_fetch_fills_the_folder_the_nano_toml_reads(tmp_path, nano_cache):
    proc = run_fetch(tmp_path, nano_cache, "nano")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dest = tmp_path / FLAVOR_ASSETS["nano"].folder
    assert sorted(p.name for p in dest.iterdir()) == [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert not any(p.is_symlink() for p in dest.iterdir())  # copies, not links into the cache
    out = proc.stdout
    assert f"from {FLAVOR_ASSETS['nano'].repo}@main" in out
    assert "config.json: the shape of flavor nano" in out  # the published config is Nano's
    # The Nano TOML's tokenizer check now passes on the fetched folder.
    cfg = job_config_from(NANO_TOML, "--model.hf_assets_path", str(dest))
    tokenizer = check_job(cfg, 512, trinity_trainer=True).tokenizer
    assert f"tokenizer: {tokenizer.get_vocab_size()} tokens (flavor nano: vocab_size 200192)" in out


def test_the_fetched_config_trains_as_the_flavor_shape(tmp_path, nano_cache, offline):
    here = tmp_path / "here"
    assert main(["nano", "--dest", str(here), "--cache-dir", str(nano_cache)]) == 0
    cfg = job_config_from(
        NANO_TOML,
        "--model.hf_assets_path",
        str(here),
        "--model.hf_config",
        str(here / "config.json"),
        "--model.flavor",
        "mini",  # the HF config's shape replaces the flavor's
    )
    args = check_job(cfg, 512, trinity_trainer=True, files=False).model_args
    nano = trinity_flavors["nano"]
    for name in ("dim", "n_layers", "n_heads", "num_experts", "moe_hidden_dim", "context_len"):
        assert getattr(args, name) == getattr(nano, name), name
    assert args.max_seq_len == 4096  # training.seq_len, not the context


def test_a_shape_other_than_the_flavor_is_reported(tmp_path, offline, capsys):
    other = dict(NANO_HF_CONFIG, num_hidden_layers=28)
    files = {"tokenizer.json": (DEBUG_ASSETS / "tokenizer.json").read_bytes()}
    files["config.json"] = json.dumps(other).encode()
    cache = hf_cache(tmp_path / "c", "someone/Trinity-Nano-28", files)
    dest = tmp_path / "dest"
    args = ["nano", "--repo", "someone/Trinity-Nano-28", "--dest", str(dest)]
    assert main([*args, "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "config.json differs from flavor nano in n_layers: 28 (56)" in out
    assert f"set [model] hf_config = '{dest / 'config.json'}'" in out


def test_a_config_the_model_cannot_honour_is_reported(tmp_path, offline, capsys):
    files = {"tokenizer.json": (DEBUG_ASSETS / "tokenizer.json").read_bytes()}
    files["config.json"] = json.dumps(dict(NANO_HF_CONFIG, score_func="softmax")).encode()
    cache = hf_cache(tmp_path / "c", "someone/Softmax", files)
    args = ["nano", "--repo", "someone/Softmax", "--dest", str(tmp_path / "d")]
    assert main([*args, "--cache-dir", str(cache)]) == 0  # the tokenizer is still of use
    out = capsys.readouterr().out
    assert "config.json: not usable as [model] hf_config: HF config score_func = 'softmax'" in out


def test_offline_without_a_cached_snapshot_fails_in_one_line(tmp_path, offline, capsys):
    assert main(["mini", "--cache-dir", str(tmp_path / "empty"), "--dest", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"could not download {FLAVOR_ASSETS['mini'].repo}@main: ")
    assert len(err.strip().splitlines()) == 1


def test_the_shipped_tomls_read_the_folders_fetch_assets_fills():
    for flavor, assets in FLAVOR_ASSETS.items():
        cfg = job_config_from(REPO / "train_configs" / f"trinity_{flavor}.toml")
        assert cfg.model.flavor == flavor
        assert Path(cfg.model.hf_assets_path) == Path(assets.folder)


def test_a_missing_tokenizer_names_the_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./assets here
    with pytest.raises(ConfigError, match=r"`python -m trinity_titan.tools.fetch_assets nano`"):
        check_job(job_config_from(NANO_TOML), 512, trinity_trainer=True)
    cfg = job_config_from(NANO_TOML, "--model.hf_assets_path", str(tmp_path))
    with pytest.raises(
        ConfigError, match=rf"holds no tokenizer.json. Fix: .*fetch_assets nano --dest {tmp_path}`"
    ):
        check_job(cfg, 512, trinity_trainer=True)
