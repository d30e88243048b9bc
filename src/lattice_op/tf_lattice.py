"""The permutohedral lattice built and applied with TensorFlow's own ops only (the "tf" backend).

The compiled lattice op (csrc/permutohedral.cc behind tf_op/) has CPU kernels only. This module
computes the same lattice with ops that TensorFlow runs on every device (elementwise arithmetic,
scan, gather, Unique, unsorted_segment_sum/min, while loops), so the lattice and the filter run
where the rest of the model runs, GPUs included. No Python loop runs over voxels, and every size
may be unknown when a ``tf.function`` is traced (the feature count too: the build's loops over
channels and lattice directions are TensorFlow loops; the filter's are Python loops when the
feature count is known, TensorFlow loops otherwise).

GPU placement (``make check-gpu-ops``, docs/benchmarks.md): every per-voxel or per-point integer
is int64, because TensorFlow's GPU build computes int32 arithmetic, reshapes and slices in host
memory; int32 appears only in shapes and loop counters. Ops without a GPU kernel are avoided:
no int64 Min (a Max of the negation instead), no ArgMax or UnravelIndex (int64 arithmetic,
:func:`crf_rnn_3d.lattice_op._common.first_true`), no StringFormat (run-time messages are
constant templates, :func:`crf_rnn_3d.lattice_op._common.require`).

Build (:func:`build`), mirroring permutohedral.cc's arithmetic step for step in float32 (the
same constants, the same order of every rounding), so that on the same features it gives the
same lattice points and barycentric weights:
  - per batch item, each feature channel minus its minimum (the compiled build's shift);
  - elevation onto the hyperplane sum(x) = 0 of R^{F+1} with the compiled op's scale factors
    (computed in double, rounded to float); its running sum is a sequential scan;
  - the nearest remainder-0 point (the same ceil/floor rounding), the rank of each coordinate
    (the compiled op's pairwise counts, ties to the lower coordinate: F+1 passes of
    comparisons, no sort), the wrap back onto the hyperplane, and the barycentric weights;
  - the F+1 vertex keys of each voxel's simplex, with the batch item as one more key column,
    so batch items never share lattice points; no key table is stored: each key column is
    computed from rem0 and rank when it is packed or folded in (:func:`_points`);
  - the lattice points: distinct keys numbered in order of first occurrence, exactly (below),
    which is also the compiled op's numbering when it builds in one chunk;
  - blur neighbours: the keys one step away along each lattice direction, looked up one
    direction at a time with the same exact numbering over [points; neighbour keys].

Exact keys: the numbering never merges two different keys. When the key columns' value ranges
(measured at run time; for the build, rem0's ranges widened by 2F, room for every vertex and
neighbour key) fit ``key_bits`` (62) bits together, each key is packed into one int64 (disjoint
bit fields) and numbered by one Unique; otherwise the columns are folded in one at a time, each
time renumbering the pair (number so far, column) with Unique, whose values stay below
(rows)^2 < 2^62. Both paths give the same numbers; tests force the second one.
:func:`dense_ids` does the same for a stored table.

Memory: the largest tensors of the build are [N, F+1] (8 (F+1) bytes per voxel in int64), never
the [N (F+1), F+1] key table; eager intermediates are dropped as soon as they are used
(docs/lattice_op.md, "Memory of the build").

Filter (:class:`TfLattice` ``.filter``): splat (products weight x value summed per lattice point
with unsorted_segment_sum, one simplex vertex at a time), blur (F+1 directions, the
[1/2, 1, 1/2] stencil, reverse order for the adjoint), slice (times 1 / (1 + 2^-F)), with the
compiled op's normalisation and scale conventions (``Lattice.filter``). Traced, its memory is
one [N, C] product at a time beside the input and output (docs/lattice_op.md, "Memory of the
TF filter"). Gradients
(``tf.custom_gradient``): values get the adjoint filter, features get
:func:`crf_rnn_3d.lattice_op.lattice.feature_gradient` evaluated with this filter on this
lattice, exactly as the compiled op's registered gradient does; nothing is differentiated
through the barycentric weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import tensorflow as tf

from crf_rnn_3d.lattice_op._common import (
    as_float32,
    check_static_rank,
    checked_values,
    feature_gradient,
    first_true,
    require,
    require_finite_values,
)

# Bits available to one packed key in an int64 (the sign bit and one spare bit kept clear).
KEY_BITS = 62
# The compiled build keeps |elevated| below 2^20 so that float32 resolves 1/8 lattice unit.
_MAX_COORDINATE_BITS = 20


class TfLatticeTensors(NamedTuple):
    """The lattice of a batch of feature maps, as :func:`build` returns it.

    vertex_index:    int64 [B, *spatial, F+1]  lattice point of each simplex vertex of each voxel
    vertex_weight:   float32 [B, *spatial, F+1]  barycentric weight of that vertex
    blur_neighbours: int64 [F+1, M, 2]  the two neighbours of each lattice point per direction
                     (M, one past the last point, marks an absent neighbour)
    The first three tensors of the compiled op's LatticeTensors, with the same meaning (and the
    same numbers when the compiled build runs in one chunk); the splat needs no CSR lists here.
    Integers are int64 where the compiled op's are int32 (int32 tensors would sit in host
    memory on a GPU).
    """

    vertex_index: tf.Tensor
    vertex_weight: tf.Tensor
    blur_neighbours: tf.Tensor


def _after(checks: list, tensor: tf.Tensor) -> tf.Tensor:
    checks = [c for c in checks if c is not None]
    if not checks:
        return tensor
    with tf.control_dependencies(checks):
        return tf.identity(tensor)


def embedding_constants(d: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(scale [d] float32, alpha float32, max_span float64) for d feature channels, computed as
    the compiled Embedding does: scale_i = float(sqrt(2/3) (d+1) / sqrt((i+1)(i+2))) in double,
    alpha = float(1 / (1 + 2^-d)), max_span = 2^20 / (2 sum_i scale_i) (the widest channel span
    that single precision resolves)."""
    d64 = tf.cast(d, tf.float64)
    inv_std = math.sqrt(2.0 / 3.0) * (d64 + 1.0)
    i = tf.range(d64, dtype=tf.float64)
    scale = tf.cast(inv_std / tf.sqrt((i + 1.0) * (i + 2.0)), tf.float32)
    power = tf.cast(
        tf.bitwise.left_shift(tf.constant(1, tf.int64), tf.cast(d, tf.int64)), tf.float64
    )
    alpha = tf.cast(1.0 / (1.0 + 1.0 / power), tf.float32)
    max_span = 2.0**_MAX_COORDINATE_BITS / (2.0 * tf.reduce_sum(tf.cast(scale, tf.float64)))
    return scale, alpha, max_span


Column = Callable[[tf.Tensor], tf.Tensor]


def _bit_length(span: tf.Tensor) -> tf.Tensor:
    """Bits needed for 0..span, per entry of an int64 vector span >= 0: the number of powers of
    two <= span (exact integer comparisons)."""
    powers = tf.bitwise.left_shift(tf.constant(1, tf.int64), tf.range(63, dtype=tf.int64))
    return tf.reduce_sum(tf.cast(span[:, None] >= powers[None, :], tf.int64), axis=1)


def _bounds(column: Column, num_columns: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(lo, hi), int64 [num_columns]: the minimum and maximum of column(c) for c = 0..count-1,
    one column at a time, so that only one column exists at a time (int64 Min has no GPU
    kernel: the minimum is the negated Max of the negation, of one column)."""
    slots = tf.range(num_columns)

    def body(c: tf.Tensor, lo: tf.Tensor, hi: tf.Tensor):
        values = column(c)
        at = slots == c
        low, high = -tf.reduce_max(-values), tf.reduce_max(values)
        return c + 1, tf.where(at, low, lo), tf.where(at, high, hi)

    zeros = tf.zeros([num_columns], tf.int64)
    _, lo, hi = tf.while_loop(
        lambda c, lo, hi: c < num_columns, body, (tf.constant(0, tf.int64), zeros, zeros)
    )
    return lo, hi


def _pack(
    column: Column, num_columns: tf.Tensor, lo: tf.Tensor, field: tf.Tensor, code: tf.Tensor
) -> tf.Tensor:
    """code + sum_c (column(c) - lo[c]) * field[c]: the columns' disjoint bit fields added into
    one int64 per row, one column at a time."""

    def body(c: tf.Tensor, code: tf.Tensor):
        return c + 1, code + (column(c) - tf.gather(lo, c)) * tf.gather(field, c)

    _, code = tf.while_loop(lambda c, code: c < num_columns, body, (tf.constant(0, tf.int64), code))
    return code


def _fold(
    column: Column, num_columns: tf.Tensor, ids: tf.Tensor, count: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """(ids, count) after folding column(c), c = 0..num_columns-1, into a first-occurrence
    numbering `ids` (int64, < the number of rows) of `count` distinct values, without packing:
    per column two Uniques, the column's own numbering, then the pair (number so far, column
    number), whose code ids * width + number stays below rows^2 < 2^62."""

    def body(c: tf.Tensor, ids: tf.Tensor, count: tf.Tensor):
        own = tf.unique(tf.reshape(column(c), [-1]), out_idx=tf.int64)
        width = tf.size(own.y, out_type=tf.int64)
        pair = tf.unique(tf.reshape(ids, [-1]) * width + own.idx, out_idx=tf.int64)
        return c + 1, tf.reshape(pair.idx, tf.shape(ids)), tf.size(pair.y, out_type=tf.int64)

    _, ids, count = tf.while_loop(
        lambda c, ids, count: c < num_columns, body, (tf.constant(0, tf.int64), ids, count)
    )
    return ids, count


def dense_ids(columns: tf.Tensor, key_bits: int = KEY_BITS) -> tuple[tf.Tensor, tf.Tensor]:
    """Numbers the distinct rows of an integer [R, c] key table exactly.

    Returns (ids int64 [R], count int64): equal rows get equal ids, different rows different
    ones, ids 0..count-1 in order of each row's first occurrence. Packs every row into one int64
    when the columns' ranges fit `key_bits` bits together (one Unique), else folds the columns
    in one by one (two Uniques per column); `key_bits` is a parameter so that tests can force
    the second path. The table is int32, or int64 with values in int32's range (the lattice's
    keys); everything is computed in int64, whose kernels run on a GPU (int32 arithmetic runs
    on the host in TensorFlow's GPU build). The lattice build uses the same steps on columns it
    computes one at a time (:func:`build`).
    """
    columns = tf.convert_to_tensor(columns)
    if columns.dtype not in (tf.int32, tf.int64):
        raise ValueError(f"dense_ids: the key table must be int32 or int64, got {columns.dtype}")
    columns = tf.cast(columns, tf.int64)
    rows = tf.shape(columns, out_type=tf.int64)[0]
    num_columns = tf.shape(columns, out_type=tf.int64)[1]

    def column(c: tf.Tensor) -> tf.Tensor:
        return tf.gather(columns, c, axis=1)

    lo, hi = _bounds(column, num_columns)
    bits = _bit_length(hi - lo)  # spans >= 0, < 2^32

    def packed() -> tuple[tf.Tensor, tf.Tensor]:
        field = tf.bitwise.left_shift(tf.ones_like(bits), tf.cumsum(bits, exclusive=True))
        code = _pack(column, num_columns, lo, field, tf.zeros([rows], tf.int64))
        unique = tf.unique(code, out_idx=tf.int64)
        return unique.idx, tf.size(unique.y, out_type=tf.int64)

    def folded() -> tuple[tf.Tensor, tf.Tensor]:
        return _fold(column, num_columns, tf.zeros([rows], tf.int64), tf.minimum(rows, 1))

    return tf.cond(tf.reduce_sum(bits) <= key_bits, packed, folded)


def _check_features(features: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Run-time checks of the compiled build (rank, sizes, NaN/Inf, spans), the same messages
    (in a graph: the template, then the values; see _common.require). Where a fault is located
    (voxel, channel), it is located only when the check fails. Returns (features [B, n, F]
    after the checks, the per-item channel minima [B, F], d)."""
    shape = tf.shape(features)
    checks = [
        require(
            tf.rank(features) >= 3,
            "features must have shape [batch, *spatial, channels] with at least one spatial "
            "dimension (rank >= 3); got shape {}",
            [shape],
        )
    ]
    features = _after(checks, features)
    d = tf.shape(features)[-1]
    checks = [
        require(
            d >= 1,
            "features has 0 channels (shape {}); at least one feature channel is needed",
            [shape],
        ),
        require(
            tf.size(features) > 0,
            "features has no voxels (shape {}); batch and spatial sizes must be >= 1",
            [shape],
        ),
    ]
    features = _after(checks, features)
    flat = tf.reshape(features, [shape[0], -1, d])
    bad = tf.logical_not(tf.math.is_finite(flat))
    d64 = tf.cast(d, tf.int64)

    def nan_at() -> list[tf.Tensor]:
        first = first_true(bad)
        per_item = tf.shape(bad, out_type=tf.int64)[1] * d64
        within = first % per_item
        return [within // d64, within % d64, first // per_item]

    checks = [
        require(
            tf.logical_not(tf.reduce_any(bad)),
            "features contains NaN or Inf (voxel {}, channel {} of the batch item {})",
            nan_at,
        )
    ]
    flat = _after(checks, flat)
    lo = tf.reduce_min(flat, axis=1)  # [B, F]
    hi = tf.reduce_max(flat, axis=1)
    _, _, max_span = embedding_constants(d)
    span = tf.cast(hi, tf.float64) - tf.cast(lo, tf.float64)
    too_wide = span > max_span

    def widest() -> list[tf.Tensor]:
        first = first_true(too_wide)
        return [first % d64, tf.reshape(span, [-1])[first], max_span, d]

    checks = [
        require(
            tf.logical_not(tf.reduce_any(too_wide)),
            "features channel {} spans {} (max - min), beyond the {} the lattice resolves in "
            "single precision for {} channels; features must be divided by the kernel widths "
            "(theta)",
            widest,
        )
    ]
    return _after(checks, flat), lo, d


def _loop(count: tf.Tensor, body, state: tf.Tensor) -> tf.Tensor:
    """state after body(i, state) for i = 0..count-1 (int64 i; a TensorFlow loop)."""
    _, state = tf.while_loop(
        lambda i, state: i < count,
        lambda i, state: (i + 1, body(i, state)),
        (tf.constant(0, tf.int64), state),
    )
    return state


def _embed(f: tf.Tensor, d: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Embedding::Embed for the rows of f [N, d] (already shifted): (rem0 int64 [N, d+1],
    rank int64 [N, d+1], barycentric weights float32 [N, d+1]), the same float32 operations in
    the same order as the compiled op. Integers are int64 throughout (int32 arithmetic runs on
    the host in TensorFlow's GPU build), and every step costs O(d^2) per voxel (no sort)."""
    d1 = d + 1
    scale, _, _ = embedding_constants(d)
    n = tf.shape(f)[0]
    # Eagerly every named tensor lives until its name is rebound or deleted, so the names
    # below are dropped as soon as they are used up (del): this bounds the eager peak to the
    # few [N, d+1] tensors that are alive together in a graph anyway.
    cf = f * scale  # [N, d]
    # running sums from the last channel down, one float addition at a time (like the loop
    # j = d..1 of the compiled op): top[t] = cf[d-1] + ... + cf[d-1-t]
    top = tf.scan(lambda acc, x: acc + x, tf.reverse(tf.transpose(cf), [0]), tf.zeros([n]))
    running = tf.transpose(tf.reverse(tf.concat([tf.zeros([1, n]), top], 0), [0]))
    del top  # running [N, d+1]: S[d - j]
    j = tf.range(1, d1, dtype=tf.float32)
    elevated = running - tf.concat([tf.zeros([n, 1]), j * cf], 1)  # [N, d+1]
    del cf, running

    # nearest remainder-0 point
    d1_f = tf.cast(d1, tf.float32)
    down = tf.constant(1.0, tf.float32) / d1_f
    v = elevated * down
    up = tf.math.ceil(v) * d1_f
    low = tf.math.floor(v) * d1_f
    del v
    rem0_f = tf.where(up - elevated < elevated - low, up, low)
    del up, low
    rem0 = tf.cast(rem0_f, tf.int64)
    d64 = tf.cast(d, tf.int64)
    d1_64 = d64 + 1
    # every rem0 is a multiple of d+1, so the division is exact (C's int division truncates)
    total = tf.truncatediv(tf.reduce_sum(rem0, axis=1), d1_64)

    # rank of coordinate x: the y with a larger differential, and the y < x with an equal one
    # (the compiled op's pairwise counts: ties go to the lower coordinate), y = 0..d in turn
    differential = elevated - rem0_f
    del rem0_f
    coordinate = tf.range(d1_64)[None, :]

    def count_above(y: tf.Tensor, rank: tf.Tensor, differential=differential) -> tf.Tensor:
        dy = tf.gather(differential, y, axis=1)[:, None]
        above = (dy > differential) | ((dy == differential) & (y < coordinate))
        return rank + tf.cast(above, tf.int64)

    rank = _loop(d1_64, count_above, total[:, None] + tf.zeros_like(rem0))
    del differential, total, count_above
    # the wrap back onto the hyperplane: rank < 0 gains d+1, rank > d loses it (rem0 alike)
    wrap = tf.where(rank < 0, d1_64, tf.where(rank > d64, -d1_64, tf.zeros_like(rank)))
    rank += wrap
    rem0 += wrap
    del wrap

    # barycentric weights: vertex k gets v(rank d-k) - v(rank d-k+1); vertex 0 gets
    # v(rank d) + (1 - v(rank 0)) (each a single rounding, whatever the order of the loop).
    # w[k] = v(rank d-k): rank is a permutation of 0..d, so each w[k] collects one v exactly
    # (the other terms are zeros)
    v = (elevated - tf.cast(rem0, tf.float32)) * down
    del elevated
    slot = d64 - coordinate  # [1, d+1]: w's slot k holds rank d - k

    def place(x: tf.Tensor, w: tf.Tensor, v=v) -> tf.Tensor:
        hit = tf.gather(rank, x, axis=1)[:, None] == slot
        return w + tf.where(hit, tf.gather(v, x, axis=1)[:, None], 0.0)

    w = _loop(d1_64, place, tf.zeros_like(v))
    del v, place
    bary = tf.concat([w[:, :1] + (1.0 - w[:, -1:]), w[:, 1:] - w[:, :-1]], axis=1)
    return rem0, rank, bary


def _points(
    rem0: tf.Tensor, rank: tf.Tensor, batch: tf.Tensor, d: tf.Tensor, key_bits: int
) -> tuple[tf.Tensor, tf.Tensor]:
    """The lattice points of the simplices (rem0, rank int64 [N, d+1]; N = batch x n voxels):
    (vertex ids int64 [N, d+1], blur neighbours int64 [d+1, M, 2]).

    The key of vertex k of voxel i is (batch item, coordinates 0..d-1 of rem0 + k, minus d+1
    where rank > d - k); the last coordinate is implied by the zero sum. No key table is
    stored: key column c is computed when it is packed or folded in, [N, d+1] at a time
    (``key_column``). Packed (rem0's per-column ranges, widened by 2d on each side, fit
    key_bits with the batch item's): one int64 code per entry, one Unique, whose distinct
    values are the points' codes in order of first occurrence; the neighbour along direction
    j is the code minus or plus that of u_j (within the widened ranges every field stays
    inside its bits, so code arithmetic is key arithmetic). Folded:
    the columns folded in one by one (:func:`_fold`), each point's key read back at its first
    entry, and the neighbours looked up with the same folding. Either way the neighbours of
    one direction are numbered with the points in one table [points; keys - u_j; keys + u_j]
    (3M rows): the points come first and are distinct, so their ids are 0..M-1, a query that
    is a point gets that point's id and any other query an id >= M."""
    d1 = d + 1
    rows = tf.shape(rem0, out_type=tf.int64)[0]
    per_item = rows // batch
    vertex = tf.range(d1)[None, :]  # k of each entry

    def key_column(c: tf.Tensor) -> tf.Tensor:
        r = tf.gather(rank, c, axis=1)[:, None]
        shift = tf.where(r <= d - vertex, vertex, vertex - d1)
        return tf.gather(rem0, c, axis=1)[:, None] + shift  # [N, d+1]

    def item() -> tf.Tensor:  # the batch item of every entry, [N, d+1]
        return tf.broadcast_to((tf.range(rows) // per_item)[:, None], [rows, d1])

    # bounds of every key and neighbour key: a vertex key is rem0 shifted by -d..d in each
    # coordinate and a neighbour one step of u_j further (-d..d again), so rem0's per-column
    # range widened by 2d on each side holds them all (from rem0's columns, [N] at a time)
    lo, hi = _bounds(lambda c: tf.gather(rem0, c, axis=1), d)
    lo, hi = lo - 2 * d, hi + 2 * d
    bits = _bit_length(hi - lo)
    item_bits = _bit_length(tf.reshape(batch - 1, [1]))[0]
    # u_j = (d+1) e_j - (1, ..., 1) on the d stored coordinates (u_d = -(1, ..., 1))

    def u(j: tf.Tensor) -> tf.Tensor:
        return tf.where(tf.range(d) == j, d, tf.constant(-1, tf.int64))  # [d]

    def neighbours_of(lookup, m: tf.Tensor) -> tf.Tensor:
        """[d+1, M, 2]: lookup(j) gives the ids of [points; - u_j; + u_j] for direction j."""

        def body(j: tf.Tensor, found: tf.Tensor):
            ids = lookup(j)
            pair = tf.transpose(tf.reshape(ids[m:], [2, m]))  # [M, 2]: minus, plus
            return j + 1, tf.concat([found, tf.where(pair < m, pair, m)[None]], 0)

        _, found = tf.while_loop(
            lambda j, found: j < d1,
            body,
            (tf.constant(0, tf.int64), tf.zeros(tf.stack([0, m, 2]), tf.int64)),
            shape_invariants=(tf.TensorShape([]), tf.TensorShape([None, None, 2])),
        )
        return found

    def packed() -> tuple[tf.Tensor, tf.Tensor]:
        field = tf.bitwise.left_shift(tf.ones_like(bits), tf.cumsum(bits, exclusive=True))
        code = tf.bitwise.left_shift(item(), tf.reduce_sum(bits))  # the batch item on top
        code = _pack(key_column, d, lo, field, code)
        unique = tf.unique(tf.reshape(code, [-1]), out_idx=tf.int64)
        points = unique.y  # [M] codes in order of first occurrence

        def lookup(j: tf.Tensor) -> tf.Tensor:
            step = tf.reduce_sum(u(j) * field)
            table = tf.concat([points, points - step, points + step], 0)
            return tf.unique(table, out_idx=tf.int64).idx

        m = tf.size(points, out_type=tf.int64)
        return tf.reshape(unique.idx, [rows, d1]), neighbours_of(lookup, m)

    def folded() -> tuple[tf.Tensor, tf.Tensor]:
        ids, m = _fold(key_column, d, item(), batch)
        # each point's first entry: a minimum over entry numbers, in float64 (exact below
        # 2^53; int64 UnsortedSegmentMin has no GPU kernel)
        flat_ids = tf.reshape(ids, [-1])
        entry = tf.cast(tf.range(tf.size(flat_ids, out_type=tf.int64)), tf.float64)
        first = tf.cast(tf.math.unsorted_segment_min(entry, flat_ids, m), tf.int64)
        point_item = first // (per_item * d1)

        def lookup(j: tf.Tensor) -> tf.Tensor:
            step = u(j)

            def query_column(c: tf.Tensor) -> tf.Tensor:
                key = tf.gather(tf.reshape(key_column(c), [-1]), first)
                s = tf.gather(step, c)
                return tf.concat([key, key - s, key + s], 0)

            items = tf.concat([point_item, point_item, point_item], 0)
            return _fold(query_column, d, items, batch)[0]

        return ids, neighbours_of(lookup, m)

    return tf.cond(tf.reduce_sum(bits) + item_bits <= key_bits, packed, folded)


def build(features: tf.Tensor, key_bits: int = KEY_BITS) -> TfLatticeTensors:
    """The lattice of features [B, *spatial, F] (float32), in TensorFlow ops; see the module
    docstring. Raises InvalidArgumentError for the compiled build's bad inputs (rank < 3, no
    channels or voxels, NaN or Inf, a channel spread too widely for single precision)."""
    features = as_float32(features, "features")
    check_static_rank(features, "features")
    shape = tf.shape(features)
    flat, lo, d = _check_features(features)
    d1 = d + 1
    d64 = tf.cast(d, tf.int64)
    batch = tf.shape(flat)[0]
    shifted = tf.reshape(flat - lo[:, None, :], [-1, d])  # [N, d], N = B * n
    del flat
    rem0, rank, bary = _embed(shifted, d)
    del shifted

    ids, neighbours = _points(rem0, rank, tf.cast(batch, tf.int64), d64, key_bits)
    vertex_shape = tf.concat([shape[:-1], [d1]], 0)
    vertex_index = tf.reshape(ids, vertex_shape)
    vertex_weight = tf.stop_gradient(tf.reshape(bary, vertex_shape))
    if features.shape[-1] is not None:  # a static F + 1 lets the filter unroll its loops
        static = features.shape[:-1].concatenate([features.shape[-1] + 1])
        vertex_index.set_shape(static)
        vertex_weight.set_shape(static)
        neighbours.set_shape([features.shape[-1] + 1, None, 2])
    return TfLatticeTensors(vertex_index, vertex_weight, neighbours)


def filter_values(
    lattice: TfLatticeTensors, values: tf.Tensor, reverse: bool = False, check_finite: bool = False
) -> tf.Tensor:
    """Splat, blur (directions 0..F, or F..0 with reverse), slice: the compiled Filter's
    arithmetic in TensorFlow ops. values float32 [B, *spatial, C] on the lattice's grid."""
    shape = tf.shape(values)
    lattice_shape = tf.shape(lattice.vertex_index)
    checks = [
        require(
            tf.reduce_all(tf.equal(shape[:-1], lattice_shape[:-1])),
            "values of shape {} do not match the lattice's batch and spatial shape "
            "(vertex_index has shape {})",
            [shape, lattice_shape],
        ),
        require(
            shape[-1] >= 1,
            "values has 0 channels (shape {}); at least one value channel is needed",
            [shape],
        ),
    ]
    if check_finite:
        checks.append(require_finite_values(values))
    values = _after(checks, values)
    channels = shape[-1]
    nbrs = lattice.blur_neighbours
    d1 = tf.shape(nbrs)[0]
    m = tf.shape(nbrs)[1]
    index = tf.reshape(lattice.vertex_index, [-1, d1])  # [N, d+1]
    weight = tf.reshape(lattice.vertex_weight, [-1, d1])
    flat = tf.reshape(values, [-1, channels])  # [N, C]

    zero_row = tf.zeros([1, channels])

    def blur(s: tf.Tensor | int, cur: tf.Tensor) -> tf.Tensor:
        j = d1 - 1 - s if reverse else s
        pair = nbrs[j]
        new = cur[:m] + 0.5 * (tf.gather(cur, pair[:, 0]) + tf.gather(cur, pair[:, 1]))
        return tf.concat([new, zero_row], 0)  # row M: the absent neighbour, always zero

    # slice: out = sum_k (alpha * weight_k) * lattice[index_k], k = 0..F in turn
    _, alpha, _ = embedding_constants(d1 - 1)
    scaled = alpha * weight

    def term(k: tf.Tensor | int, cur: tf.Tensor) -> tf.Tensor:
        return scaled[:, k][:, None] * tf.gather(cur, index[:, k])

    static_d1 = lattice.vertex_index.shape[-1]
    if static_d1 is not None:
        # F known when traced: Python loops, and each vertex's [N, C] products formed only
        # after the previous one is summed (control dependencies; otherwise the runtime forms
        # all F + 1 at once). Traced, while loops here kept about 100 bytes per voxel of each
        # call alive to the end of the step (docs/lattice_op.md, "Memory of the TF filter").
        # The splat sums vertex by vertex, not in entry order: equal to float rounding.
        splat = None
        for k in range(static_d1):
            with tf.control_dependencies([] if splat is None else [splat]):
                part = tf.math.unsorted_segment_sum(weight[:, k][:, None] * flat, index[:, k], m)
            splat = part if splat is None else splat + part
        cur = tf.concat([splat, zero_row], 0)
        for s in range(static_d1):
            cur = blur(s, cur)
        out = None
        for k in range(static_d1):
            with tf.control_dependencies([] if out is None else [out]):
                part = term(k, cur)
            out = part if out is None else out + part
        return tf.reshape(out, shape)

    # F unknown: the splat in entry order (entry (i, k) adds weight * value to its point),
    # blur and slice as while loops
    products = tf.reshape(weight[:, :, None] * flat[:, None, :], [-1, channels])
    splat = tf.math.unsorted_segment_sum(products, tf.reshape(index, [-1]), m)
    _, cur = tf.while_loop(
        lambda s, cur: s < d1,
        lambda s, cur: (s + 1, blur(s, cur)),
        (tf.constant(0), tf.concat([splat, zero_row], 0)),
        shape_invariants=(tf.TensorShape([]), tf.TensorShape([None, values.shape[-1]])),
    )
    _, out = tf.while_loop(
        lambda k, out: k < d1,
        lambda k, out: (k + 1, out + term(k, cur)),
        (tf.constant(0), tf.zeros_like(flat)),
    )
    return tf.reshape(out, shape)


class TfLattice:
    """A lattice built with TensorFlow ops (:func:`build`) and its filter; the "tf" backend of
    :class:`crf_rnn_3d.lattice_op.Lattice` (same arguments, errors and conventions).

    ``_key_bits`` (private, for tests): the bit budget of a packed key (:func:`dense_ids`).
    """

    def __init__(self, features: tf.Tensor, _key_bits: int = KEY_BITS) -> None:
        features = as_float32(features, "features")
        check_static_rank(features, "features")
        self.features = features
        self.features_shape = features.shape
        self.tensors = build(features, _key_bits)

    @property
    def num_points(self) -> tf.Tensor:
        """Number of lattice points M over all batch items (int32 scalar tensor)."""
        return tf.shape(self.tensors.blur_neighbours)[1]

    def filter(
        self, values: tf.Tensor, reverse: bool = False, check_finite: bool = True
    ) -> tf.Tensor:
        """As :meth:`crf_rnn_3d.lattice_op.Lattice.filter`."""
        values = checked_values(values, self.features_shape)
        lattice = self.tensors
        reverse, check_finite = bool(reverse), bool(check_finite)

        @tf.custom_gradient
        def run(values: tf.Tensor, features: tf.Tensor):
            # stop_gradient: eagerly, a tape would otherwise also record (and keep) the ops inside
            out = filter_values(lattice, tf.stop_gradient(values), reverse, check_finite)

            def gradient(upstream: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
                def filter_fn(x: tf.Tensor, adjoint: bool) -> tf.Tensor:
                    return filter_values(lattice, x, reverse != adjoint, False)

                adjoint_grad = filter_fn(upstream, True)
                d_features = feature_gradient(
                    filter_fn, values, features, upstream, out, adjoint_grad
                )
                return adjoint_grad, d_features

            return out, gradient

        return run(values, self.features)
