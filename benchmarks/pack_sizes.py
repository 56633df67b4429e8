#!/usr/bin/env python
"""Pack bytes of the default KM configuration on full-size torchvision bases (224 px).

Exports each base (random weights: sizes do not depend on the values), builds real signed packs
with non-zero modulators and a 200-class head, fp32 and fp16, with and without BatchNorm trained,
and writes benchmarks/results/pack_sizes.json.  `python benchmarks/pack_sizes.py`
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
N_CLASSES = 200


def main() -> int:
    import torch
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from device_runtime.pack import build_pack
    from km_edge.export import export_base
    from km_edge.methods import MethodConfig, build_task_model
    from km_edge.models import build_base
    from km_edge.pack import task_tensors

    rows = []
    key = Ed25519PrivateKey.generate()
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("mobilenet_v2", "resnet18"):
            manifest = export_base(build_base(arch), Path(tmp) / arch)
            base_bytes = manifest["graph_bytes"] + manifest["weights_bytes"]
            for train_bn in (True, False):
                config = MethodConfig("km", train_bn=train_bn)
                model = build_task_model(build_base(arch), N_CLASSES, config, 0)
                for module in model.modules():
                    if hasattr(module, "w2"):
                        torch.nn.init.normal_(module.w2, std=0.01)
                body = {"task": "sizes", "pack_version": 1, "base_id": manifest["base_id"],
                        "labels": [f"class{i}" for i in range(N_CLASSES)], "preprocess": manifest["preprocess"],
                        "method": "km", "modulator": config.modulator.to_dict(), **task_tensors(model, config),
                        "metrics": {}, "trainer": {}}
                head_bytes = N_CLASSES * (manifest["feature_size"] + 1) * 4
                for dtype in ("float32", "float16"):
                    size = len(build_pack(body, key, storage_dtype=dtype))
                    head = head_bytes // (1 if dtype == "float32" else 2)
                    rows.append({"base": arch, "train_bn": train_bn, "storage_dtype": dtype, "base_bytes": base_bytes,
                                 "pack_bytes": size, "percent_of_base_bytes": round(100 * size / base_bytes, 3),
                                 "percent_of_base_bytes_without_head": round(100 * (size - head) / base_bytes, 3)})
                    print(rows[-1])
    out = ROOT / "benchmarks" / "results" / "pack_sizes.json"
    out.write_text(json.dumps({"n_classes": N_CLASSES, "modulator": MethodConfig().modulator.to_dict(), "rows": rows},
                              indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
