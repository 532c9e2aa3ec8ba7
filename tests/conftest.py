import torch

# Tiny models run fastest on one thread, and a shared 2-core machine makes OpenMP's spinning
# threads slow everything down; results do not depend on it (references run the same way).
torch.set_num_threads(1)
