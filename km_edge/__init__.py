"""km-edge host side: bases, Kernel Modulation training, export and signed task packs.

Importing this package does not import torch: the CLI must start on a device install.
"""

__version__ = "0.1.0"
