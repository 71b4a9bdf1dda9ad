"""Test setup. Triton kernels run on CPU through the interpreter, which must be switched on before any
kernel module is imported; on a GPU machine set LOWRANK_OPS_TEST_GPU=1 to test the compiled kernels."""

import os

import torch

if os.environ.get("LOWRANK_OPS_TEST_GPU") != "1" or not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
