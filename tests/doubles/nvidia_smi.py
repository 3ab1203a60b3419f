"""TEST DOUBLE of ``nvidia-smi``: answers the two queries yitrt makes, from ``YITRT_DOUBLE_GPUS``.

``YITRT_DOUBLE_GPUS`` holds CSV lines as ``--query-gpu=index,name,compute_cap,memory.total,memory.free,
driver_version --format=csv,noheader,nounits`` prints them (the default is the line a real H100 SXM printed:
"0, NVIDIA H100 80GB HBM3, 9.0, 81559, 81079, 580.159.04").
"""

from __future__ import annotations

import os
import sys

REAL_H100 = "0, NVIDIA H100 80GB HBM3, 9.0, 81559, 81079, 580.159.04"


def main() -> None:
    lines = os.environ.get("YITRT_DOUBLE_GPUS", REAL_H100)
    if any(a.startswith("--query-gpu") for a in sys.argv[1:]):
        print(lines.replace(";", "\n"))
        return
    print("| NVIDIA-SMI 580.159.04             Driver Version: 580.159.04     CUDA Version: 13.0     |")


if __name__ == "__main__":
    main()
