"""Trinity model definition: args, flavors, model, MoE and the HF state dict adapter."""

from trinity_titan.model.args import TrinityModelArgs
from trinity_titan.model.flavors import trinity_flavors
from trinity_titan.model.model import TrinityModel

__all__ = ["TrinityModel", "TrinityModelArgs", "trinity_flavors"]
