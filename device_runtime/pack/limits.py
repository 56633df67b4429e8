"""Every number and name that bounds a task pack, written once (packs/README.md section 5 lists them).

A pack is outside input even when signed: a stolen key or a buggy host must not be able to make a
device allocate without limit, divide by zero or print control characters. Each limit here is
checked by the record that owns the value (``records.py``, ``tensors.py``, ``envelope.py``), on the
writer's side and the reader's side alike.
"""

from __future__ import annotations

# Facts a pack shares with the rest of the device, owned there and listed here with the others: the
# task-name rule (text.py, also the host's rule for --task) and the preprocessing bounds
# (device_runtime/limits.py, also a base manifest's).
from ..limits import INTERPOLATIONS, MAX_SIDE, MEAN_RANGE, STD_RANGE  # noqa: F401 (re-exported)
from ..text import TASK_NAME_MAX, TASK_NAME_PATTERN  # noqa: F401 (re-exported)

MAGIC = "km-edge-pack"
FORMAT_VERSION = 2
SIGNATURE_BYTES = 64

# --- the file -------------------------------------------------------------------------------
MAX_PACK_BYTES = 512 * 2**20

# --- strings --------------------------------------------------------------------------------
# layer names are torch module paths, as in the base manifest
LAYER_NAME_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,255}"
MAX_LABEL_CHARS = 128
MAX_TEXT_CHARS = 1024  # any other string (metrics, trainer, preprocess interpolation)
MAX_STRING_BYTES = 4 * MAX_TEXT_CHARS  # msgpack str limit while decoding (UTF-8: <= 4 bytes/char)

# --- counts ---------------------------------------------------------------------------------
MAX_LABELS = 100_000
MAX_LAYERS = 4096  # conv layers (and BatchNorm layers) a pack may adapt
MAX_TENSORS = 4 * MAX_LAYERS + 2 + 4 * MAX_LAYERS
MAX_INFO_ENTRIES = 256  # keys of metrics / trainer, and elements of one of their lists
MAX_INFO_DEPTH = 4

# --- tensors --------------------------------------------------------------------------------
STORAGE_DTYPES = ("float32", "float16")
TENSOR_ALIGNMENT = 4  # every tensor starts at a multiple of this in the blob (float32 views)
MAX_DIM = 2**31 - 1  # one dimension of a tensor
MAX_ABS_VALUE = 1e6  # |element| of every stored tensor (trained values are far smaller)
MAX_FEATURES = 65_536  # head input width
MAX_VECTOR = 65_536  # length d of a modulator vector (kh*kw or in-channels per group)
MAX_HIDDEN = 1024  # modulator hidden size (the Runtime also bounds it against the base)
MAX_LORA_RANK = 1024

# --- scalars --------------------------------------------------------------------------------
# KM's s is the RMS of a frozen kernel; its reciprocal multiplies w1, so it must stay well inside
# float32 (5e-324 is 0.0 there: division by zero).
KM_SCALE_RANGE = (1e-12, 1e6)
LORA_SCALE_RANGE = (1e-6, 1e4)  # alpha / rank, > 0

# --- time -----------------------------------------------------------------------------------
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # created, expires, key windows: UTC, whole seconds
