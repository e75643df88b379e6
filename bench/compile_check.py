"""Compile the featureviz Triton kernels for a GPU architecture without a GPU, and report their resources.

The Triton interpreter (TRITON_INTERPRET=1) runs kernels on CPU but skips the compiler, so it misses errors
that only the compiler raises and says nothing about registers or spills. This script runs the real
pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin) for the launch configurations the launchers use and
reads registers, spill stack and shared memory back with cuobjdump:

    env -u TRITON_INTERPRET .venv/bin/python bench/compile_check.py [--arch 90] [--json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_check: unset TRITON_INTERPRET (the interpreter replaces the compiler)")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import ASTSource  # noqa: E402

from featureviz.kernels import fft_image  # noqa: E402
from featureviz.kernels import resample  # noqa: E402

_LAUNCH_KEYS = ("num_warps", "num_stages")


def _variants(quick: bool = False):
    """(label, kernel, integer args, float args, constexprs + launch options), as the launchers use them (RGB).

    ``quick``: one variant per kernel, the one with the most code (64-row bands, scale gradient).
    """
    ints = {"H", "W", "WF", "HO", "WO"}
    for rows, config in fft_image.FORWARD_CONFIGS.items():
        if quick and rows != max(fft_image.FORWARD_CONFIGS):
            continue
        yield (f"spectrum_to_image forward, {rows}-row bands", fft_image._spectrum_to_image_forward_kernel, ints,
               set(), dict(C=3, CO=3, SIGMOID=True, PRECISION="tf32", **config))
    for scale_grad in (True,) if quick else (False, True):
        yield (f"spectrum_to_image backward, scale grad {scale_grad}", fft_image._spectrum_to_image_backward_kernel,
               ints, set(), dict(C=3, CO=3, SIGMOID=True, SCALE_GRAD=scale_grad, PRECISION="tf32",
                                 **fft_image.BACKWARD_CONFIG))
    yield ("affine_resample forward", resample._affine_resample_forward_kernel, ints, {"border"},
           dict(C=3, CO=3, C_PAD=4, BLOCK=256, num_warps=4))
    yield ("affine_resample backward", resample._affine_resample_backward_kernel, ints, set(),
           dict(C=3, CO=3, CO_PAD=4, BLOCK=128, MARGIN=resample._WINDOW_MARGIN, num_warps=4))


def compile_all(arch: int = 90, *, quick: bool = False) -> list[dict]:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    rows = []
    for label, kernel, ints, floats, meta in _variants(quick):
        consts = {k: v for k, v in meta.items() if k not in _LAUNCH_KEYS}
        options = {k: v for k, v in meta.items() if k in _LAUNCH_KEYS}
        signature = {name: "constexpr" if name in consts else "i32" if name in ints else "fp32" if name in floats
                     else "*fp32" for name in kernel.arg_names}
        start = time.perf_counter()
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                                  options=options)
        seconds = time.perf_counter() - start
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            usage = subprocess.run([cuobjdump, "-res-usage", cubin.name], capture_output=True, text=True,
                                   check=True).stdout
        found = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
        rows.append({"kernel": label, "arch": f"sm_{arch}", "registers": int(found["REG"]),
                     "spill_stack_bytes": int(found["STACK"]), "shared_bytes": compiled.metadata.shared,
                     "tensor_cores": "wgmma" if "wgmma" in compiled.asm["ptx"] else
                     "mma" if "mma.sync" in compiled.asm["ptx"] else "none",
                     "compile_seconds": round(seconds, 1), **options})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    parser.add_argument("--quick", action="store_true", help="one variant per kernel (what the CI test compiles)")
    args = parser.parse_args(argv)
    rows = compile_all(args.arch, quick=args.quick)
    if args.json:
        print(json.dumps(rows))
        return 0
    print("| kernel | arch | warps | stages | registers | spill stack (B) | shared (B) | tensor cores |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['kernel']} | {r['arch']} | {r.get('num_warps', 4)} | {r.get('num_stages', '-')} | "
              f"{r['registers']} | {r['spill_stack_bytes']} | {r['shared_bytes']} | {r['tensor_cores']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
