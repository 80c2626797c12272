"""Would one GEMM over interleaved gate+up weights beat two GEMMs on this device? (The fusion
the nested MLP would need: with gate and up rows interleaved in blocks of 8, every width
prefix of the stacked weight holds gate[:d] and up[:d].) Times x @ W_gate_up[:2d].T against
x @ W_gate[:d].T plus x @ W_up[:d].T in the same run; writes JSON.

    python -m benchmarks.probes.gate_up_fusion_probe --out benchmarks/results/<date>-<device>
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from flextron.benchmarks.common import CPU_SHAPES, GPU_SHAPES, device_name, time_all
from flextron.timing import stats_columns


def interleave(gate: torch.Tensor, up: torch.Tensor, block: int = 8) -> torch.Tensor:
    inner, hidden = gate.shape
    return torch.stack(
        [gate.view(inner // block, block, hidden), up.view(inner // block, block, hidden)], 1
    ).reshape(2 * inner, hidden)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    on_gpu = args.device == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    rows = []
    for name, (hidden, inner) in (GPU_SHAPES if on_gpu else CPU_SHAPES).items():
        for tokens in (4096, 16384) if on_gpu else (256, 1024):
            x = torch.randn(tokens, hidden, device=args.device, dtype=dtype)
            gate = torch.randn(inner, hidden, device=args.device, dtype=dtype)
            up = torch.randn(inner, hidden, device=args.device, dtype=dtype)
            stacked = interleave(gate, up)
            for width in (inner, inner // 2):
                fns = {
                    "two_gemms": lambda x=x, g=gate[:width], u=up[:width]: (x @ g.T, x @ u.T),
                    "one_gemm": lambda x=x, s=stacked[: 2 * width]: x @ s.T,
                }
                stats = time_all(fns, args.device, repeat=15)
                one_over_two = stats["one_gemm"].median / stats["two_gemms"].median
                rows.append(
                    {"shape": name, "tokens": tokens, "width": width, **stats_columns(stats), "one_over_two": one_over_two}
                )  # fmt: skip
                print(rows[-1])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gate_up_fusion_probe-{args.device}.json"
    path.write_text(
        json.dumps({"device_name": device_name(args.device), "dtype": str(dtype), "rows": rows}, indent=1)
        + "\n"
    )
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
