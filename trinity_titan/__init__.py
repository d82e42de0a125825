"""trinity-titan: train Arcee Trinity (HF afmoe) models with TorchTitan.

`import trinity_titan` (TorchTitan does it for `[experimental] custom_import = "trinity_titan"`)
registers the `trinity` TrainSpec and its datasets, and lets TorchTitan run on CPU-only machines.
In a worker started by torchrun it also starts the watchdog that ends the worker when torchrun
dies (compat/launcher.py): TorchTitan imports this module before it creates the process group.
"""

from torchtitan.protocols.train_spec import _extra_train_specs, register_train_spec

from trinity_titan.compat.cpu import enable_cpu_training
from trinity_titan.compat.launcher import exit_when_launcher_dies
from trinity_titan.data.datasets import register_datasets
from trinity_titan.train_spec import TRAIN_SPEC_NAME, get_train_spec

__version__ = "0.1.0"

enable_cpu_training()
exit_when_launcher_dies()
register_datasets()
if TRAIN_SPEC_NAME not in _extra_train_specs:
    register_train_spec(TRAIN_SPEC_NAME, get_train_spec())
