import json
import os
import subprocess
import sys

import pytest

# compiles one kernel for sm_90, in a process of its own: under TRITON_INTERPRET=1 the kernels' modules and
# Triton's own library (`tl.cdiv`, `tl.sum`) hold interpreted functions, which the compiler cannot take
_COMPILE = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
module, name, signature, constants, aligned, options = json.loads(sys.argv[1])
kernel = getattr(importlib.import_module(module), name)
attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}  # by the kernel's argument order
compiled = triton.compile(ASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                          options=options)
print(json.dumps({k: v for k, v in compiled.asm.items() if isinstance(v, str)}))
"""


@pytest.fixture
def compile_for_hopper():
    """`compile(kernel, signature, constants, aligned=(), **options)`: the kernel compiled to sm_90 machine code
    here, without a GPU, so that what the interpreter accepts and the compiler does not (a plain global read in a
    kernel, an instruction Hopper lacks) fails on the CPU, not first on a GPU.  `aligned` names the arguments
    specialised as multiples of 16, as the launcher does at run time for aligned pointers and strides (without
    it no load is vectorised).  Returns the compiled kernel's assembly texts by stage (`"ptx"`, ...)."""
    pytest.importorskip("triton")

    def compile(kernel, signature: dict, constants: dict, aligned=(), **options) -> dict[str, str]:
        fn = getattr(kernel, "fn", kernel)
        args = json.dumps([fn.__module__, fn.__name__, signature, constants, list(aligned), options])
        env = dict(os.environ, TRITON_INTERPRET="0")
        done = subprocess.run([sys.executable, "-c", _COMPILE, args], env=env, capture_output=True, text=True)
        if done.returncode:
            pytest.fail(f"{fn.__name__} does not compile for sm_90:\n{done.stderr[-4000:]}", pytrace=False)
        return json.loads(done.stdout)

    return compile
