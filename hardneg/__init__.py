"""hardneg: online, confusion-targeted GeNIe hard negatives for image classifiers."""

from hardneg.config import ConfigError, HardNegConfig

__version__ = "0.1.0"
__all__ = ["ConfigError", "HardNegConfig", "__version__"]
