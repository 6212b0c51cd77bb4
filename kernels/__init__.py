"""Triton kernels of fastvl (installed as ``fastvl.kernels``): device code only, no model knowledge.

Each module defines its ``@triton.jit`` kernels and an ``AOT_SPECS`` list describing every launch
configuration it can be compiled with, which ``python -m fastvl.aot`` builds for sm_80 and sm_90.
"""
