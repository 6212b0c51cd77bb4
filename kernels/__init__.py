"""Triton kernels of fastvl (installed as ``fastvl.kernels``): device code only, no model knowledge.

Each module defines its ``@triton.jit`` kernels; ``python -m fastvl.aot`` compiles them for sm_80 and
sm_90 as the JIT would launch them (the attention and region KL launches are captured from the real
launchers; the other row kernels describe theirs in an ``AOT_SPECS`` list).
"""
