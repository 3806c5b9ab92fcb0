"""Small pieces every Mosaic GPU kernel here uses (jax.experimental.pallas.mosaic_gpu, Hopper).

Both kernels are warp-specialised: one producer warpgroup issues TMA copies into a ring of shared-memory
stages, consumer warpgroups run wgmma on them. The producer gives registers back (setmaxnreg) so the
consumers can hold their f32 accumulators: 2 x 128 x 232 + 128 x 40 registers <= 65,536.

Interpret mode (`interpret=True`): jax 0.11.2's Mosaic GPU interpreter runs these kernels on the CPU,
warpgroups as threads, shared memory, barriers and TMA simulated (FP8 wgmma included). It has no
`pl.run_state`, which the compiled kernels use to accumulate into a register accumulator in place; in
interpret mode `mma_into` computes the same sum through a fresh accumulator instead (and, having no wgmma
with its left operand in registers either, a dot of the same bf16 values in f32). Lowering for CUDA
without a GPU (model.kernels.lower_for_gpu) checks the compiled branch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

PRODUCER_REGS, CONSUMER_REGS = 40, 232


def tiled_smem(shape, dtype):
    """A shared-memory buffer in the 128-byte swizzled tiling that TMA writes and wgmma reads."""
    row = 128 // jnp.dtype(dtype).itemsize
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, row)), plgpu.SwizzleTransform(128)))


def interpret_params(interpret: bool):
    return plgpu.InterpretGPUParams() if interpret else False


def mma(a, b, shape):
    """a @ b into a fresh f32 accumulator [M, N] (wgmma); waits for it."""
    def body(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]
    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def mma_into(acc, a, b, interpret: bool):
    """acc + a @ b, acc f32 in registers (wgmma layout), a in shared memory or registers (wgmma layout), b in
    shared memory; accumulated in place when compiled; waits."""
    if interpret:  # no run_state in the interpreter: the same sum through a fresh accumulator
        if isinstance(a, jax.Array) and not isinstance(getattr(a, "aval", None), jax.ref.AbstractRef):
            # nor a register operand: the same exact products, f32 sums; b is read like a wgmma reads it
            # (the async proxy), which is what orders it before a later TMA write into b's buffer
            out = acc + jnp.dot(a.astype(jnp.float32), b[...].astype(jnp.float32), precision=lax.Precision.HIGHEST)
            plgpu.commit_smem()
            return out
        return acc + mma(a, b, acc.shape)

    def body(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
    return pl.run_state(body)(plgpu.ACC.init(acc))


def mma_chain(acc, issue, interpret: bool):
    """acc + every product `issue(mma)` asks for (mma(a, b) adds a @ b; operands as in mma_into). Compiled, the
    wgmmas are issued asynchronously into the register accumulator, so work that `issue` does between and
    after them overlaps them; all are waited for at the end."""
    if interpret:
        box = [acc]

        def add(a, b):
            box[0] = mma_into(box[0], a, b, True)
        issue(add)
        return box[0]

    def body(acc_ref):
        issue(lambda a, b: plgpu.wgmma(acc_ref, a, b))
    return pl.run_state(body)(plgpu.ACC.init(acc))

