"""Device-specific fast paths of the model's math, each beside the reference it must equal.

`moefold.model` is the architecture; the ops here are how some of it runs fast on a device:
- gemm.py: bf16 GEMMs as fp32 math on CPUs without bf16 units (reference: the plain bf16 GEMM);
- cpu_attention.py: causal bf16 attention on CPU as batched GEMMs (reference: torch SDPA);
- expert_loop.py: the per-expert SwiGLU loop with a hand-written backward
  (reference: `loop_reference`, plain autograd);
- rotary.py: rotary embedding as one autograd function (reference: `rotary_reference`).
A GPU path goes next to the CPU one; each is pinned to its reference in tests/unit.
"""
