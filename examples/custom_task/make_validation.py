"""The gate's validation set: 200 labelled images the company keeps at the coordinator."""

import numpy as np
from acme_vision.tasks import make_images

x, y = make_images(200, seed=99)
np.savez("validation.npz", x=x, y=y)
print("validation.npz:", x.shape, "per class", np.bincount(y).tolist())
