"""The compiled engine step: one pure function of (weights, pool, expert loads, penalty table,
input-batch arrays, batch arrays). Forward over the paged cache, logits at each row's sampled
position and sampling on device, each rank on its own rows (penalties and logit_bias from the
table's rows, logprobs, MTP drafts verified and the next ones proposed). It returns the sampled
tokens with their logprob data plus the overflow flag as one array (the only device-to-host read
per step), the new pool, table and device token slots (donated) and the accumulated expert loads.
The model runner (serving/runner.py) packs the batches and dispatches it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from model.transformer import project_logits
from serving.kv_cache import POOL_AXES, PagedCache
from serving.penalties import BY_RANK, PenaltyTable
from serving.sampling import verify
from serving.transfer import unpack_rows
from sharding.mesh import logical_sharding


def write_last(last, slot, newest, bad):
    """The device token slots int32[N + 2] with each row's newest token at its slot (N: the dump slot,
    where an overflowed step writes) and the overflow flag in the last."""
    last = last.at[jnp.where(bad, last.shape[0] - 2, slot)].set(newest)
    return last.at[-1].set(bad.astype(jnp.int32))


def build_step(net, mesh, cache_mesh, slots: int, drafts: int = 0):
    """The step for this model as it stands (EP capacity level included) and its jax.jit options:
    -> (weights, step, options). The weights go in as
    a flat list of arrays: flattening nnx.State or hashing a graphdef on every call would cost
    milliseconds of host time per step (docs/DESIGN_NOTES.md). drafts: k, the MTP draft tokens per
    request and step (0: no speculative decoding)."""
    graphdef, state = nnx.split(net)
    leaves, treedef = jax.tree.flatten(state)
    k, mtp_layer = drafts, net.config.num_hidden_layers  # the MTP module's KV rows: the pool's last layer
    everywhere = None if mesh is None else logical_sharding(mesh)

    def replicate(a):
        return a if everywhere is None else jax.lax.with_sharding_constraint(a, everywhere)

    def on_every_device(fn, *args):  # fn on replicated values, computed whole on each device
        if mesh is None:
            return fn(*args)
        return jax.shard_map(fn, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)(*args)

    def step(leaves, pool, expert_load, table, last, pages, host_rows, host_kept, fresh, absorbed: bool, blocks: int,
             layout):
        # the batch's host arrays arrive as one buffer (serving/transfer.py), whole on every device (a
        # few KB): each rank takes its rows where it reads them, and a value every device needs (the
        # slots written) is there, not gathered
        page_rows, tokens, positions, sample_at, n_drafts, next_tokens, slots, sampling = unpack_rows(
            replicate(host_rows), host_kept, layout, place=replicate)
        net = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
        page_table = pages[page_rows, :blocks]  # [B, blocks]: the rows' page tables, kept on the device
        # async scheduling: a row whose last token the previous step sampled reads it from the device
        # (slots[:, 0] >= 0), so the host never waits for it (serving/input_batch.py)
        read = slots[:, 0]
        tokens = replicate(tokens.at[:, 0].set(jnp.where(read >= 0, last[jnp.maximum(read, 0)], tokens[:, 0])))
        hidden, cache, stats = net.forward_step(tokens, positions, PagedCache(pool, page_table, cache_mesh), absorbed)
        B, W = tokens.shape
        j = jnp.arange(k + 1)
        base = sample_at - n_drafts  # [B]: the window's first position (the row's last sampled token)

        def sample_rows(hidden, tokens, base, n_drafts, sampling, counts, bias, head):  # one rank's rows
            at = jnp.minimum(base[:, None] + j, W - 1)  # [b, k + 1]
            drafts = jnp.take_along_axis(tokens, at[:, 1:], axis=1)  # [b, k]: the drafts being verified
            logits = project_logits(jnp.take_along_axis(hidden, at[..., None], axis=1), head)
            return verify(logits, drafts, n_drafts, sampling, PenaltyTable.Device(counts, bias, table.slots))
        # each rank samples its own rows in one shard_map: its logits, cuts and draws, with no collective
        # (left to XLA's partitioner, the logits' rows were gathered and the sampler's branch
        # predicates reduced across the ranks)
        out, accepted, data = table.per_rank(sample_rows, (BY_RANK,) * 3, hidden, tokens, base, n_drafts, sampling,
                                             table.counts, table.bias, net.head_weight(), replicated=1)
        overflow = stats["overflow"] if stats else jnp.bool_(False)
        # a step dispatched after one that overflowed ran on its stale tokens: it keeps nothing and
        # says so (flag 2), and runs again once the one before has (fresh: a re-run ignores the flag)
        poisoned = (last[-1] > 0) & ~fresh
        head = [accepted[:, None]]
        if k:  # the MTP module sees the token after each position: the prompt's, or this step's accepted run
            after = jnp.take_along_axis(out, jnp.clip(jnp.arange(W)[None] - base[:, None], 0, k), axis=1)
            new, cache, over = net.draft(hidden, jnp.where(next_tokens >= 0, next_tokens, after), positions, cache,
                                         jnp.int32(mtp_layer), base + accepted, k, absorbed)
            head, overflow = head + [new], overflow | over
        bad = overflow | poisoned
        keep = (j[None] <= accepted[:, None]) & ~bad  # an overflowed step runs again
        table = table.count(sampling.slot, out, keep)
        if stats:  # ... so its expert loads count once: in the run that did not overflow
            expert_load = expert_load + jnp.where(bad, 0, stats["expert_load"])
        # one array to read back per step: per row the tokens accepted, the next drafts, the tokens and
        # logprobs (serving/sampling.py unpack); then the flag: 1 overflowed, 2 ran after one that did.
        # With each row's last token beside it, it is made whole on every device by one all-gather (the
        # slots' write and the output each gathered the rows' values before: three collectives a step)
        newest = jnp.take_along_axis(out, accepted[:, None], axis=1)  # [B, 1]
        rows_out = replicate(jnp.concatenate(head + [data.reshape(B, -1), newest], axis=1))
        rows_out, newest = rows_out[:, :-1], rows_out[:, -1]
        # each sampling row's last token into its request's slot (the rest into the dump slot), the
        # same writes on every device: left to the partitioner, it split the writes over the ranks and
        # gathered them back (two more collectives)
        last = on_every_device(write_last, last, slots[:, 1], newest, bad)
        flag = overflow.astype(jnp.int32) | (poisoned.astype(jnp.int32) << 1)
        return jnp.concatenate([rows_out.reshape(-1), flag[None]]), cache.pool, expert_load, table, last

    shardings = None
    if mesh is not None:  # what the host reads is replicated, so every process (multi-host) can read it
        replicated, by_rank = logical_sharding(mesh), logical_sharding(mesh, "batch")
        shardings = (replicated, logical_sharding(mesh, *POOL_AXES), replicated,
                     PenaltyTable.Device(by_rank, by_rank, slots, cache_mesh), replicated)
    return leaves, step, dict(static_argnames=("absorbed", "blocks", "layout"),
                              donate_argnames=("pool", "expert_load", "table", "last"),
                              out_shardings=shardings)
