"""The one check of a job config, run before any mesh, model, tokenizer or data is built.

`check_job` runs once per job: Trinity's trainer calls it before it builds the device mesh, the
TrainSpec's tokenizer builder calls it under TorchTitan's trainer (its first call into Trinity with
the config; TorchTitan has checked its own degrees by then), and the planner calls it without the
file checks. Every failure is one `ConfigError` whose message names the option or file and the fix.
What needs the process group or the output folders (the run lock, the resume choice, the data
scan) follows in training/run_start.py.
"""

from __future__ import annotations

import copy
import glob
import os
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path

from torchtitan.components.tokenizer import BaseTokenizer, build_hf_tokenizer
from torchtitan.config import JobConfig
from torchtitan.hf_datasets.text_datasets import DATASETS

from trinity_titan import job_config as trinity_config
from trinity_titan.data.loader import schedule_from_config
from trinity_titan.data.ramp import BatchRamp
from trinity_titan.data.sources import SourceSpec
from trinity_titan.data.validate import FORMATS, local_files
from trinity_titan.job_config import CONFIG_MODULE, ConfigError
from trinity_titan.kernels.backend import resolve_backend
from trinity_titan.model.args import TrinityModelArgs
from trinity_titan.model.flavors import FLAVOR_ASSETS, trinity_flavors
from trinity_titan.parallel.degrees import Degrees, check_layout, replica_groups
from trinity_titan.training.option_ranges import check_model_limits, check_option_ranges

TRINITY_TRAINER = "python -m trinity_titan.train"
TRINITY_FT_TRAINER = "python -m trinity_titan.train_ft"


@dataclass(frozen=True)
class CheckedJob:
    """What the check resolved: the model args, the degrees and (with file checks) the tokenizer."""

    model_args: TrinityModelArgs
    degrees: Degrees
    tokenizer: BaseTokenizer | None


def check_job(
    job_config: JobConfig,
    world_size: int,
    *,
    trinity_trainer: bool,
    files: bool = True,
    fault_tolerant: bool = False,
) -> CheckedJob:
    """Check `job_config` for `world_size` ranks; raise ConfigError on the first problem.

    `trinity_trainer`: the job runs under `-m trinity_titan.train` (False: TorchTitan's trainer,
    which lacks some of Trinity's features). `files`: also check paths and the tokenizer, which
    is then built once and returned. `fault_tolerant`: the trainer runs `[fault_tolerance]`
    (`-m trinity_titan.train_ft`, or the planner, which plans one replica group); under
    fault tolerance `world_size` is one replica group's.
    """
    check_sections(job_config)
    args = model_args(job_config)
    check_option_ranges(job_config)
    check_model_limits(job_config, args)
    degrees = check_layout(args, job_config.parallelism, job_config.training.seq_len, world_size)
    check_trainer_features(job_config, args, trinity_trainer)
    check_fault_tolerance(job_config, fault_tolerant)
    dp_degree = degrees.dp_replicate * degrees.dp_shard * replica_groups(job_config)
    ramp = BatchRamp.from_job_config(job_config, dp_degree)
    ramp.validate(job_config.training.local_batch_size, dp_degree)
    tokenizer = None
    check_data_config(job_config)
    check_checkpoint_options(job_config)
    if files:
        check_paths(job_config)
        check_initial_load_path(job_config)
        check_data_sources(job_config)
        tokenizer = build_hf_tokenizer(job_config)
        check_vocab(tokenizer, args, job_config)
        check_document_masking(job_config, args, tokenizer)
    return CheckedJob(args, degrees, tokenizer)


def check_sections(job_config: JobConfig) -> None:
    """Trinity's TOML sections and options must be merged into the config."""
    for section in fields(trinity_config.JobConfig):
        ours, theirs = section.type, getattr(job_config, section.name, None)
        if not is_dataclass(ours):
            continue
        have = {f.name for f in fields(theirs)} if is_dataclass(theirs) else set()
        if not {f.name for f in fields(ours)} <= have:
            raise ConfigError(
                f"the job config lacks Trinity's [{section.name}] options: [job] "
                f"custom_config_module is not {CONFIG_MODULE!r}. Fix: add "
                f'custom_config_module = "{CONFIG_MODULE}" under [job] in the TOML (or pass '
                f"--job.custom_config_module {CONFIG_MODULE})."
            )


def model_args(job_config: JobConfig) -> TrinityModelArgs:
    """The flavor's args with the job's overrides applied (a private copy of the flavor)."""
    flavor = job_config.model.flavor
    if flavor not in trinity_flavors:
        raise ConfigError(
            f"[model] flavor = {flavor!r} is not a Trinity flavor. "
            f"Fix: set --model.flavor to one of {', '.join(sorted(trinity_flavors))}."
        )
    try:
        resolve_backend(job_config.kernels.backend)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    args = copy.deepcopy(trinity_flavors[flavor])
    args.update_from_config(job_config)
    return args


def check_trainer_features(
    job_config: JobConfig, args: TrinityModelArgs, trinity_trainer: bool
) -> None:
    """Features that need the hooks of Trinity's trainer are refused under TorchTitan's."""
    if trinity_trainer:
        return
    needs = []
    if job_config.data.batch_ramp:
        needs.append("[[data.batch_ramp]] (TorchTitan's trainer ignores it)")
    if args.attn_mask_type == "block_causal" and args.attn_type == "sdpa":
        needs.append("document masking with model.attn_type 'sdpa' (or set --model.attn_type flex)")
    if needs:
        raise ConfigError(
            f"{'; '.join(needs)} needs Trinity's trainer. Fix: launch with `{TRINITY_TRAINER}` "
            "(torchrun ... -m trinity_titan.train) instead of `-m torchtitan.train`."
        )


def check_fault_tolerance(job_config: JobConfig, fault_tolerant: bool) -> None:
    """`[fault_tolerance]` needs Trinity's torchft trainer, and a layout it can keep consistent
    across replica groups."""
    ft = job_config.fault_tolerance
    if not ft.enable:
        return
    fix = f"launch each replica group with `{TRINITY_FT_TRAINER}` (see the README)"
    if not fault_tolerant:
        raise ConfigError(
            "[fault_tolerance] enable = true needs Trinity's torchft trainer: other trainers "
            "would not sum the expert-bias counts, NaN checks and metrics across replica groups. "
            f"Fix: {fix}, or drop --fault_tolerance.enable."
        )
    if ft.group_size < 1 or not 0 <= ft.replica_id < ft.group_size:
        raise ConfigError(
            f"[fault_tolerance] replica_id = {ft.replica_id} and group_size = {ft.group_size}: "
            "group_size must be the number of replica groups (>= 1) and replica_id one of "
            f"0 .. group_size - 1. Fix: set --fault_tolerance.group_size G and give each group's "
            "job its own --fault_tolerance.replica_id."
        )
    if job_config.parallelism.data_parallel_replicate_degree != 1:
        raise ConfigError(
            "[parallelism] data_parallel_replicate_degree = "
            f"{job_config.parallelism.data_parallel_replicate_degree} under fault tolerance: the "
            "replica groups are the replicate dimension of HSDP. Fix: set "
            "--parallelism.data_parallel_replicate_degree 1 and run one job per replica group "
            "(--fault_tolerance.group_size of them)."
        )
    if ft.semi_sync_method is not None:
        raise ConfigError(
            f"[fault_tolerance] semi_sync_method = {ft.semi_sync_method!r} is not supported: "
            "LocalSGD and DiLoCo average the groups only every few steps, and the expert-bias "
            "update, NaN guard and metrics of Trinity run every step. Fix: leave "
            "semi_sync_method unset (each step's gradients are averaged across the groups)."
        )
    if not job_config.checkpoint.enable_ft_dataloader_checkpoints:
        raise ConfigError(
            "[checkpoint] enable_ft_dataloader_checkpoints = false under fault tolerance: a "
            "restarted replica group would not resume its data position, and the checkpoint "
            "another group saved does not hold this group's. Fix: drop "
            "--checkpoint.no-enable-ft-dataloader-checkpoints."
        )


def _looks_local(path: str) -> bool:
    """Hub dataset names ('org/name') are not local paths; './x', '/x', '~/x' are."""
    return path.startswith(("/", "./", "../", "~")) or path.startswith(os.sep)


def fetch_command(flavor: str, dest: str) -> str:
    """The command that fills `dest` with `flavor`'s tokenizer (any other flavor: Nano's, the
    same tokenizer)."""
    assets = FLAVOR_ASSETS.get(flavor)
    name = flavor if assets is not None else "nano"
    to = "" if assets is not None and Path(dest) == Path(assets.folder) else f" --dest {dest}"
    return f"`python -m trinity_titan.tools.fetch_assets {name}{to}`"


def check_paths(job_config: JobConfig) -> None:
    assets = job_config.model.hf_assets_path
    fix = f"Fix: {fetch_command(job_config.model.flavor, assets)} downloads the Trinity tokenizer"
    if not assets or not Path(assets).expanduser().is_dir():
        raise ConfigError(
            f"[model] hf_assets_path = {assets!r} is not a directory. {fix} and config.json "
            "there; or point --model.hf_assets_path at a folder holding tokenizer.json."
        )
    if not any((Path(assets) / f).is_file() for f in ("tokenizer.json", "vocab.json", "vocab.txt")):
        raise ConfigError(
            f"[model] hf_assets_path = {assets!r} holds no tokenizer.json. {fix} and config.json "
            "into it; or point --model.hf_assets_path at the folder that has it."
        )
    training = job_config.training
    if training.dataset not in DATASETS:
        raise ConfigError(
            f"[training] dataset = {training.dataset!r} is not registered. Fix: set "
            f"--training.dataset to one of {', '.join(sorted(DATASETS))}."
        )
    path = training.dataset_path
    if path and _looks_local(path) and not Path(path).expanduser().exists():
        raise ConfigError(
            f"[training] dataset_path = {path!r} does not exist. Fix: correct "
            "--training.dataset_path, or leave it empty to use the dataset's default location."
        )


def check_data_config(job_config: JobConfig) -> None:
    """`[[data.sources]]` entries and `[[data.phases]]` form a valid mixture (no file is read)."""
    data = job_config.data
    if data.sources:
        specs = [SourceSpec.from_dict(d) for d in data.sources]
        schedule_from_config(specs, data.phases).check_sources(len(specs))


def check_checkpoint_options(job_config: JobConfig) -> None:
    """Checkpoint options that TorchTitan would silently ignore."""
    checkpoint = job_config.checkpoint
    if checkpoint.initial_load_path and not checkpoint.enable:
        raise ConfigError(
            f"[checkpoint] initial_load_path = {checkpoint.initial_load_path!r} is set, but "
            "checkpointing is off (checkpoint.enable = false), so TorchTitan would ignore it and "
            "train from random weights. Fix: add --checkpoint.enable (the run then also saves "
            "every checkpoint.interval steps), or drop --checkpoint.initial_load_path."
        )


def check_initial_load_path(job_config: JobConfig) -> None:
    """The initial checkpoint must be a checkpoint folder (DCP, or HF with initial_load_in_hf)."""
    checkpoint = job_config.checkpoint
    path = checkpoint.initial_load_path
    if not path or not checkpoint.enable:
        return
    folder = Path(path).expanduser()
    marker = "model.safetensors.index.json" if checkpoint.initial_load_in_hf else ".metadata"
    if not folder.is_dir():
        raise ConfigError(
            f"[checkpoint] initial_load_path = {path!r} is not a directory. Fix: point it at a "
            "checkpoint step folder (e.g. outputs/run/checkpoint/step-1000)."
        )
    if not (folder / marker).is_file() and not (
        checkpoint.initial_load_in_hf and any(folder.glob("*.safetensors"))
    ):
        kind = (
            "an HF checkpoint (safetensors)"
            if checkpoint.initial_load_in_hf
            else "a DCP checkpoint"
        )
        raise ConfigError(
            f"[checkpoint] initial_load_path = {path!r} is not {kind}: it has no {marker}. Fix: "
            "point it at a step folder"
            + (
                ""
                if checkpoint.initial_load_in_hf
                else ", or add --checkpoint.initial_load_in_hf for HF weights"
            )
            + "."
        )


def check_data_sources(job_config: JobConfig) -> None:
    """Every local `[[data.sources]]` path (file, folder or glob) must match something."""
    for i, source in enumerate(job_config.data.sources):
        path = str(source.get("path", ""))
        if not path:
            raise ConfigError(
                f"[[data.sources]] entry {i} has no path. Fix: add path = a local file, folder or "
                "glob, or a hub dataset name."
            )
        if _looks_local(path) and not glob.glob(os.path.expanduser(path)):
            raise ConfigError(
                f"[[data.sources]] entry {i}: path = {path!r} matches no file. Fix: correct the "
                "path (a jsonl/parquet/arrow file, a folder of them, or a glob)."
            )
        if os.path.isdir(os.path.expanduser(path)) and not local_files(path):
            raise ConfigError(
                f"[[data.sources]] entry {i}: folder {path!r} holds no "
                f"{'/'.join(sorted(FORMATS))} file. Fix: point path at the data files."
            )


def check_vocab(
    tokenizer: BaseTokenizer, model_args: TrinityModelArgs, job_config: JobConfig
) -> None:
    """Token ids at or above the model's vocab would index past the embedding table."""
    n = tokenizer.get_vocab_size()
    if n > model_args.vocab_size:
        raise ConfigError(
            f"the tokenizer in [model] hf_assets_path = {job_config.model.hf_assets_path!r} has "
            f"{n} tokens, more than the {model_args.vocab_size} of flavor "
            f"{job_config.model.flavor!r}. Fix: use the flavor's tokenizer, or a flavor whose "
            "vocab_size covers it."
        )


def check_document_masking(
    job_config: JobConfig, model_args: TrinityModelArgs, tokenizer: BaseTokenizer
) -> None:
    """Document masks cut at the tokenizer's EOS."""
    if model_args.attn_mask_type == "block_causal" and tokenizer.eos_id is None:
        raise ConfigError(
            f"[model] attn_mask_type = 'block_causal' cuts documents at EOS, but the tokenizer "
            f"in hf_assets_path = {job_config.model.hf_assets_path!r} has no EOS token. Fix: use "
            "a tokenizer with an eos_token, or set --model.attn_mask_type causal."
        )
