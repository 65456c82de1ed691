"""One 4-bit expert read the two ways, side by side: bitsandbytes' ``dequantize_4bit`` (a fresh
tensor on every call) against moe_tune's read into a buffer it reuses (``QuantizedExperts.expert``
with ``out``), and a matmul of the expert's tokens for scale.

    python benchmarks/dequantize.py [--shape 28672 4096] [--tokens 512] [--repeats 5]

The default shape is one Mixtral-8x7B gate-up expert (2 x 14336 rows of 4096), NF4 with double
quantization, read in bf16. Each figure is the fastest of ``--repeats`` calls after one untimed
call. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import cpu_model  # noqa: E402


def fastest_ms(call, repeats: int) -> float:
    call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=2, default=[28672, 4096], metavar=("OUT", "IN"))
    parser.add_argument("--tokens", type=int, default=512, help="rows of the matmul shown for scale")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch  # noqa: PLC0415

    from moe_tune.model.quantized_experts import ExpertsQuantization, QuantizedExperts  # noqa: PLC0415

    weight = torch.randn(1, *args.shape, generator=torch.Generator().manual_seed(0)) * 0.02
    packed, quantization = QuantizedExperts.quantize(weight, ExpertsQuantization(4))
    del weight
    dtype = torch.bfloat16
    buffer = torch.empty(args.shape, dtype=dtype)
    fresh = quantization.expert(packed, 0, dtype)  # bitsandbytes' dequantize_4bit
    assert torch.equal(quantization.expert(packed, 0, dtype, out=buffer), fresh)
    x = torch.randn(args.tokens, args.shape[1], dtype=dtype)
    result = {
        "cpu": cpu_model(), "threads": torch.get_num_threads(), "shape": args.shape, "tokens": args.tokens,
        "native_kernel": quantization._native_cpu_kernel(packed, dtype) is not None,
        "fresh_tensor_ms": fastest_ms(lambda: quantization.expert(packed, 0, dtype), args.repeats),
        "into_buffer_ms": fastest_ms(lambda: quantization.expert(packed, 0, dtype, out=buffer), args.repeats),
        "matmul_ms": fastest_ms(lambda: x @ buffer.t(), args.repeats),
    }
    result["fresh_over_buffer"] = round(result["fresh_tensor_ms"] / result["into_buffer_ms"], 2)
    for key in ("fresh_tensor_ms", "into_buffer_ms", "matmul_ms"):
        result[key] = round(result[key], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
