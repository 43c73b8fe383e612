"""DiT tests run on CPU with tiny configs; keep them to the 2 cores CI has."""

import torch

torch.set_num_threads(2)
