"""harmony: train PyTorch models larger than device memory on one server.

>>> import harmony
>>> harmony.Trainer  # doctest: +ELLIPSIS
<class 'harmony.training.trainer.Trainer'>
"""

from harmony.io.checkpoint import CheckpointError
from harmony.io.weights import WeightsError
from harmony.model.hf_weights import load_meta
from harmony.model.materialize import empty_weights
from harmony.model.precision import Precision
from harmony.model.rng import layer_rng, layer_seed
from harmony.planning.planner import InfeasiblePlan, Plan
from harmony.planning.sizes import parse_bytes
from harmony.runtime.runtime import NonFiniteLoss
from harmony.training import optim
from harmony.training.config import TrainerConfig
from harmony.training.ownership import ModelHeldError
from harmony.training.trainer import Trainer
from swap.stats import Stats

__all__ = ["CheckpointError", "InfeasiblePlan", "ModelHeldError", "NonFiniteLoss", "Plan",
           "Precision", "Stats", "Trainer", "TrainerConfig", "WeightsError",
           "empty_weights", "layer_rng", "layer_seed", "load_meta", "optim", "parse_bytes"]
__version__ = "0.1.0"
