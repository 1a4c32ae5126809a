"""Stand-in for NVlabs/edm training/augment.py: the pickled AugmentPipe (float settings only)."""
from torch_utils import persistence


@persistence.persistent_class
class AugmentPipe:
    def __init__(self, p=1, xflip=0, yflip=0, scale=0):
        self.p, self.xflip, self.yflip, self.scale = float(p), float(xflip), float(yflip), float(scale)
