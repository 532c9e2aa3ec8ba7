"""harmony: train PyTorch models larger than device memory on one server.

>>> import harmony
>>> harmony.Trainer  # doctest: +ELLIPSIS
<class 'harmony.trainer.Trainer'>
"""

from harmony import optim
from harmony.checkpoint import CheckpointError
from harmony.hf_weights import load_meta
from harmony.materialize import empty_weights
from harmony.ownership import ModelHeldError
from harmony.planning import InfeasiblePlan, Plan
from harmony.precision import Precision
from harmony.rng import layer_rng, layer_seed
from harmony.runtime import NonFiniteLoss
from harmony.sizes import parse_bytes
from harmony.trainer import Trainer
from harmony.weights import WeightsError
from swap.stats import Stats

__all__ = ["CheckpointError", "InfeasiblePlan", "ModelHeldError", "NonFiniteLoss", "Plan",
           "Precision", "Stats", "Trainer", "WeightsError",
           "empty_weights", "layer_rng", "layer_seed", "load_meta", "optim", "parse_bytes"]
__version__ = "0.1.0"
