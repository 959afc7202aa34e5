"""Sparse-by-dense row kernels written as LLVM vector code, for the Numba backend.

Two operations carry a training step on sparse inputs (MNIST is ~81 % zeros):

- ``gather_rows``:  ``row += sum_k vals[k] * W[cols[k]]`` (a row of ``x @ W``),
- ``scatter_rows``: ``W[cols[k]] -= (lr * vals[k]) * d`` for each ``k`` (the
  ``W -= lr * x.T @ d`` update, one input at a time).

With ``cols=None`` they take ``W``'s rows in order: the same code then does
the small dense products of the step (``hidden @ W2``, ``dlogits @ W2.T``,
``dlogits.T @ hidden``).

Written as plain Numba loops (``for j in range(hidden)``), LLVM vectorises the
inner loop but pays for it on every non-zero: alias checks between the rows,
a vector remainder (50 = 32 + 16 + 2), index wrap-around, and the output
row loaded and stored again for each input. perf counted ~116 instructions
per non-zero at 50 hidden units. Here a row is cut into fixed blocks (32
and 16 wide) and each block is one LLVM vector that stays in registers for
the whole run over the non-zeros; the block widths are compile-time
constants, so there is no remainder loop and no alias check. LLVM splits a
vector wider than the machine's registers into several. The remainder under
16 is one masked block in ``gather_rows`` (a row of 10 logits in one pass)
and goes column by column in ``scatter_rows`` (one kernel fewer to compile),
which the training loop avoids by padding its rows to multiples of 16.

Arithmetic order is the same as the plain loops they replace, so results
are bitwise those of:

    for k in range(first, last, 4):      # groups of four, then one at a time
        row[j] += (v0 * W[c0, j] + v1 * W[c1, j]) + (v2 * W[c2, j] + v3 * W[c3, j])

    for k in range(first, last):
        W[cols[k], j] -= (lr * vals[k]) * d[j]     # lr first cast to W's dtype

and no multiply-add is fused (no ``contract`` flag), as with ``fastmath`` off.

No bounds checks: callers pass ``first <= last`` within ``cols``/``vals``,
row indices within ``W``, rows and ``d`` as long as ``W``'s rows, and
C-contiguous arrays (checked when typed). Under ``NUMBA_DISABLE_JIT=1`` (the
coverage run) the blocks are NumPy slice operations in the same order, since
intrinsics only exist in compiled code.
"""

from __future__ import annotations

import llvmlite.ir as llvm_ir
import numba
from numba import njit, types
from numba.core.errors import TypingError
from numba.extending import intrinsic

_JIT_DISABLED = bool(getattr(numba.config, "DISABLE_JIT", 0))


# -------------------------------------------------------------- IR helpers
def _check_layout(name: str, array, ndim: int) -> None:
    if not isinstance(array, types.Array) or array.ndim != ndim or array.layout != "C":
        raise TypingError(f"{name} must be a C-contiguous {ndim}-d array, got {array}")


def _check_operands(W, cols, vals, other, other_name: str) -> None:
    _check_layout("W", W, 2)
    _check_layout("vals", vals, 1)
    _check_layout(other_name, other, 1)
    if not isinstance(cols, types.NoneType):
        _check_layout("cols", cols, 1)
        if not isinstance(cols.dtype, types.Integer):
            raise TypingError(f"cols must hold integers or be None, got {cols.dtype}")
    if not isinstance(W.dtype, types.Float) or vals.dtype != W.dtype or other.dtype != W.dtype:
        raise TypingError(
            f"W, vals and {other_name} must share one float dtype, "
            f"got {W.dtype}, {vals.dtype}, {other.dtype}"
        )


def _splat(builder, scalar, vector_type):
    """A vector with ``scalar`` in every lane."""
    lanes = vector_type.count
    undefined = llvm_ir.Constant(vector_type, llvm_ir.Undefined)
    first_lane = builder.insert_element(undefined, scalar, llvm_ir.Constant(llvm_ir.IntType(32), 0))
    zeros = llvm_ir.Constant(llvm_ir.VectorType(llvm_ir.IntType(32), lanes), [0] * lanes)
    return builder.shuffle_vector(first_lane, undefined, zeros)


class _Operands:
    """Element access to the arrays of one call, and the block's vector type."""

    def __init__(self, context, builder, signature, args, width, cols_at, vals_at):
        self.builder = builder
        self.cols_at, self.vals_at = cols_at, vals_at
        self.intp = context.get_value_type(types.intp)
        self.arrays = {}
        self.values = {}
        for position, (kind, value) in enumerate(zip(signature.args, args, strict=True)):
            if isinstance(kind, types.Array):
                self.arrays[position] = (kind, context.make_array(kind)(context, builder, value))
            else:
                self.values[position] = (kind, value)
        # W is every block's first argument and fixes the dtype
        self.dtype = signature.args[0].dtype
        element = context.get_value_type(self.dtype)
        self.align = context.get_abi_sizeof(element)
        self.vector = llvm_ir.VectorType(element, width)
        self.context = context

    def index(self, position):
        """An integer argument as ``intp``."""
        kind, value = self.values[position]
        return self.context.cast(self.builder, value, kind, types.intp)

    def scalar(self, position):
        """A scalar argument cast to the arrays' dtype."""
        kind, value = self.values[position]
        return self.context.cast(self.builder, value, kind, self.dtype)

    def row_of(self, k):
        """The row of ``W`` that listed input ``k`` multiplies: ``cols[k]``, or ``k`` if no cols."""
        return self.element(self.cols_at, k) if self.cols_at in self.arrays else k

    def value_at(self, k):
        """``vals[k]``."""
        return self.element(self.vals_at, k)

    def element(self, position, offset):
        """Load ``array[offset]`` of a 1-d argument; integers come back as ``intp``."""
        kind, view = self.arrays[position]
        value = self.builder.load(self.builder.gep(view.data, [offset]))
        if isinstance(kind.dtype, types.Integer) and kind.dtype.bitwidth < self.intp.width:
            extend = self.builder.sext if kind.dtype.signed else self.builder.zext
            value = extend(value, self.intp)
        return value

    def block_pointer(self, position, row, column):
        """Pointer to the vector ``array[row, column : column + width]`` (``row`` None: 1-d)."""
        pointer = self.element_pointer(position, row, column)
        return self.builder.bitcast(pointer, self.vector.as_pointer())

    def piece_pointer(self, start, offset):
        """Pointer to the vector ``offset`` elements after the element pointer ``start``.

        A constant ``offset`` from one start folds into the load's address,
        so all pieces of a block share one base register.
        """
        pointer = self.builder.gep(start, [self.intp(offset)], inbounds=True)
        return self.builder.bitcast(pointer, self.vector.as_pointer())

    def element_pointer(self, position, row, column):
        """Pointer to the element ``array[row, column]`` (``row`` None: ``array[column]``)."""
        _, view = self.arrays[position]
        offset = column
        if row is not None:
            row_length = self.builder.extract_value(view.shape, 1)
            offset = self.builder.add(self.builder.mul(row, row_length), column)
        return self.builder.gep(view.data, [offset], inbounds=True)

    def column_mask(self, column):
        """Lanes of the vector at ``column`` that lie inside ``W``'s rows, for masked access.

        A masked ``load`` reads the other lanes as 0 and a masked ``store``
        leaves them alone, so a vector may hang over the end of a row (or of
        the whole array).
        """
        _, view = self.arrays[0]
        lanes_in_row = self.builder.sub(self.builder.extract_value(view.shape, 1), column)
        count = self.vector.count
        lane = llvm_ir.Constant(llvm_ir.VectorType(self.intp, count), list(range(count)))
        return self.builder.icmp_signed("<", lane, _splat(self.builder, lanes_in_row, lane.type))

    def _masked(self, operation, mask):
        # LLVM's masked load/store (AVX vmaskmov), named with the typed-pointer
        # mangling of older LLVMs; newer ones re-mangle it when reading the IR
        element = "f32" if self.align == 4 else "f64"
        vector_name = f"v{self.vector.count}{element}"
        name = f"llvm.masked.{operation}.{vector_name}.p0{vector_name}"
        function = self.builder.module.globals.get(name)
        if function is None:
            pointer, align = self.vector.as_pointer(), llvm_ir.IntType(32)
            if operation == "load":
                signature = llvm_ir.FunctionType(
                    self.vector, [pointer, align, mask.type, self.vector]
                )
            else:
                signature = llvm_ir.FunctionType(
                    llvm_ir.VoidType(), [self.vector, pointer, align, mask.type]
                )
            function = llvm_ir.Function(self.builder.module, signature, name)
        return function

    def load(self, pointer, mask=None):
        # element alignment only: rows of W start anywhere
        if mask is None:
            return self.builder.load(pointer, align=self.align)
        align = llvm_ir.Constant(llvm_ir.IntType(32), self.align)
        zeros = llvm_ir.Constant(self.vector, None)
        return self.builder.call(self._masked("load", mask), [pointer, align, mask, zeros])

    def store(self, value, pointer, mask=None):
        if mask is None:
            self.builder.store(value, pointer, align=self.align)
            return
        align = llvm_ir.Constant(llvm_ir.IntType(32), self.align)
        self.builder.call(self._masked("store", mask), [value, pointer, align, mask])


def _counted_loop(builder, start, stop, step, carried, body):
    """Emit ``for k in range(start, stop, step)`` carrying ``carried`` values through ``body``.

    ``body(k, values)`` emits one iteration and returns the new values.
    Needs ``(stop - start) % step == 0``. Returns the values after the loop.
    """
    entry = builder.block
    loop_block = builder.append_basic_block("block.loop")
    done_block = builder.append_basic_block("block.done")
    builder.cbranch(builder.icmp_signed("<", start, stop), loop_block, done_block)
    builder.position_at_end(loop_block)
    k = builder.phi(start.type)
    phis = [builder.phi(value.type) for value in carried]
    updated = body(k, phis)
    k_next = builder.add(k, llvm_ir.Constant(start.type, step))
    tail = builder.block
    k.add_incoming(start, entry)
    k.add_incoming(k_next, tail)
    for phi, before, after in zip(phis, carried, updated, strict=True):
        phi.add_incoming(before, entry)
        phi.add_incoming(after, tail)
    builder.cbranch(builder.icmp_signed("<", k_next, stop), loop_block, done_block)
    builder.position_at_end(done_block)
    finals = []
    for before, after in zip(carried, updated, strict=True):
        final = builder.phi(before.type)
        final.add_incoming(before, entry)
        final.add_incoming(after, tail)
        finals.append(final)
    return finals


# ------------------------------------------------------------ the blocks
# A block kernel takes ``W, out, *offsets, cols, vals, first, last[, lr]``:
# one offset ``j0`` (the block ``j0:j0+width``), or two, ``j0`` and ``j1``,
# handled in one pass over the inputs. Two blocks may overlap (``j1`` <
# ``j0 + width``): that is how a row of 50 is covered by 32-wide blocks at
# 0 and 18 with no narrow remainder pass. The overlap gets each update once.
def _positions(blocks: int) -> dict[str, object]:
    offsets = list(range(2, 2 + blocks))
    after = 2 + blocks
    return {
        "offsets": offsets,
        "cols": after,
        "vals": after + 1,
        "first": after + 2,
        "last": after + 3,
        "lr": after + 4,
    }


def _python_rows(W, cols):
    return range(W.shape[0]) if cols is None else cols


# bytes of a vector register the gather's pieces fill (AVX2's 32; on wider
# machines LLVM still gets register-sized pieces it can place)
_REGISTER_BYTES = 32


def _gather_block(width: int, blocks: int, masked: bool = False):
    """``row[b:b+width] += sum_k vals[k] * W[cols[k], b:b+width]`` for each block start ``b``.

    ``masked``: one block that may run past the end of ``W``'s rows (it
    covers only ``b : W.shape[1]``): the remainder of a row narrower than a
    block, in one pass instead of column by column.
    """
    if _JIT_DISABLED:

        def gather_python(W, row, *args):
            offsets, (cols, vals, first, last) = args[:blocks], args[blocks:]
            cols = _python_rows(W, cols)
            # every block sums from the row as it was, so an overlap is not added twice
            start = row.copy()
            for j0 in offsets:
                block = slice(j0, j0 + width)
                total = start[block].copy()
                quads_end = first + ((last - first) // 4) * 4
                for k in range(first, quads_end, 4):
                    pair_01 = vals[k] * W[cols[k], block] + vals[k + 1] * W[cols[k + 1], block]
                    pair_23 = (
                        vals[k + 2] * W[cols[k + 2], block] + vals[k + 3] * W[cols[k + 3], block]
                    )
                    total += pair_01 + pair_23
                for k in range(quads_end, last):
                    total += vals[k] * W[cols[k], block]
                row[block] = total

        return gather_python

    where = _positions(blocks)

    def typer(W, row, cols, vals, arguments):
        _check_operands(W, cols, vals, row, "row")
        return types.void(*arguments)

    def codegen(context, builder, sig, args):
        # each block as register-sized pieces, every piece its own running sum:
        # emitted piece by piece, a group of four inputs needs the sums, four
        # broadcasts and a few products live at once, which fits the 16 AVX
        # registers (whole 32-wide blocks at a time spilled to the stack)
        lanes = min(width, _REGISTER_BYTES * 8 // sig.args[0].dtype.bitwidth)
        ops = _Operands(context, builder, sig, args, lanes, where["cols"], where["vals"])
        starts = [ops.index(position) for position in where["offsets"]]
        first, last = ops.index(where["first"]), ops.index(where["last"])
        # (block, offset within it) of every piece
        pieces = [(b, offset) for b in range(blocks) for offset in range(0, width, lanes)]
        masks = [None] * len(pieces)
        if masked:
            masks = [ops.column_mask(builder.add(starts[b], ops.intp(o))) for b, o in pieces]
        out_starts = [ops.element_pointer(1, None, j0) for j0 in starts]
        outs = [ops.piece_pointer(out_starts[b], offset) for b, offset in pieces]

        def inputs(k, count):
            """Per listed input ``k..k+count-1``: its row's block starts and its broadcast value."""
            listed = []
            for i in range(count):
                k_i = builder.add(k, ops.intp(i))
                row = ops.row_of(k_i)
                row_starts = [ops.element_pointer(0, row, j0) for j0 in starts]
                listed.append((row_starts, _splat(builder, ops.value_at(k_i), ops.vector)))
            return listed

        def term(listed_input, piece, mask):
            row_starts, scale = listed_input
            b, offset = piece
            return builder.fmul(scale, ops.load(ops.piece_pointer(row_starts[b], offset), mask))

        def four(k, sums):
            listed = inputs(k, 4)
            updated = []
            for sum_, piece, mask in zip(sums, pieces, masks, strict=True):
                t0, t1, t2, t3 = (term(listed_input, piece, mask) for listed_input in listed)
                pair_01 = builder.fadd(t0, t1)
                pair_23 = builder.fadd(t2, t3)
                updated.append(builder.fadd(sum_, builder.fadd(pair_01, pair_23)))
            return updated

        def one(k, sums):
            (listed_input,) = inputs(k, 1)
            return [
                builder.fadd(sum_, term(listed_input, piece, mask))
                for sum_, piece, mask in zip(sums, pieces, masks, strict=True)
            ]

        quads_end = builder.add(
            first, builder.and_(builder.sub(last, first), llvm_ir.Constant(ops.intp, -4))
        )
        initial = [ops.load(out, mask) for out, mask in zip(outs, masks, strict=True)]
        sums = _counted_loop(builder, first, quads_end, 4, initial, four)
        sums = _counted_loop(builder, quads_end, last, 1, sums, one)
        # overlapping pieces of two blocks hold the same value in both sums
        for sum_, out, mask in zip(sums, outs, masks, strict=True):
            ops.store(sum_, out, mask)
        return context.get_dummy_value()

    if blocks == 1:

        @intrinsic
        def gather(typingctx, W, row, j0, cols, vals, first, last):
            return typer(W, row, cols, vals, (W, row, j0, cols, vals, first, last)), codegen

    else:

        @intrinsic
        def gather(typingctx, W, row, j0, j1, cols, vals, first, last):
            return typer(W, row, cols, vals, (W, row, j0, j1, cols, vals, first, last)), codegen

    return gather


def _scatter_block(width: int, blocks: int):
    """``W[cols[k], b:b+width] -= (lr * vals[k]) * d[b:b+width]`` for each block start ``b``."""
    if _JIT_DISABLED:

        def scatter_python(W, d, *args):
            offsets, (cols, vals, first, last, lr) = args[:blocks], args[blocks:]
            rate = W.dtype.type(lr)
            cols = _python_rows(W, cols)
            for k in range(first, last):
                done = 0  # columns below this are already updated for input k
                for j0 in offsets:
                    block = slice(max(j0, done), j0 + width)
                    W[cols[k], block] -= (rate * vals[k]) * d[block]
                    done = j0 + width

        return scatter_python

    where = _positions(blocks)

    def typer(W, d, cols, vals, lr, arguments):
        _check_operands(W, cols, vals, d, "d")
        if not isinstance(lr, (types.Float, types.Integer)):
            raise TypingError(f"lr must be a real scalar, got {lr}")
        return types.void(*arguments)

    def codegen(context, builder, sig, args):
        ops = _Operands(context, builder, sig, args, width, where["cols"], where["vals"])
        starts = [ops.index(position) for position in where["offsets"]]
        first, last = ops.index(where["first"]), ops.index(where["last"])
        rate = ops.scalar(where["lr"])
        steps = [ops.load(ops.block_pointer(1, None, j0)) for j0 in starts]
        if blocks == 2:
            # lanes of the second block that the first one covers step by 0,
            # which leaves them as the first block wrote them
            overlap = builder.sub(builder.add(starts[0], ops.intp(width)), starts[1])
            lane = llvm_ir.Constant(llvm_ir.VectorType(ops.intp, width), list(range(width)))
            covered = builder.icmp_signed("<", lane, _splat(builder, overlap, lane.type))
            steps[1] = builder.select(covered, llvm_ir.Constant(ops.vector, None), steps[1])

        def one(k, values):
            rows = ops.row_of(k)
            scale = _splat(builder, builder.fmul(rate, ops.value_at(k)), ops.vector)
            places = [ops.block_pointer(0, rows, j0) for j0 in starts]
            # all loads before any store: the blocks may share lanes
            updated = [
                builder.fsub(ops.load(place), builder.fmul(scale, step))
                for place, step in zip(places, steps, strict=True)
            ]
            for place, value in reversed(list(zip(places, updated, strict=True))):
                ops.store(value, place)
            return []

        _counted_loop(builder, first, last, 1, [], one)
        return context.get_dummy_value()

    if blocks == 1:

        @intrinsic
        def scatter(typingctx, W, d, j0, cols, vals, first, last, lr):
            arguments = (W, d, j0, cols, vals, first, last, lr)
            return typer(W, d, cols, vals, lr, arguments), codegen

    else:

        @intrinsic
        def scatter(typingctx, W, d, j0, j1, cols, vals, first, last, lr):
            arguments = (W, d, j0, j1, cols, vals, first, last, lr)
            return typer(W, d, cols, vals, lr, arguments), codegen

    return scatter


_gather_32, _gather_16 = (_gather_block(width, 1) for width in (32, 16))
_gather_pair_32 = _gather_block(32, 2)
_gather_tail_16 = _gather_block(16, 1, masked=True)
_scatter_32, _scatter_16, _scatter_1 = (_scatter_block(width, 1) for width in (32, 16, 1))
_scatter_pair_32 = _scatter_block(32, 2)

_kernel = njit(cache=True, nogil=True, error_model="numpy")


@_kernel
def gather_rows(W, row, cols, vals, first, last):
    """``row += vals[first:last] @ W[cols[first:last]]``, summed in groups of four inputs.

    ``cols=None`` takes the rows in order, ``row += vals[first:last] @ W[first:last]``
    (a dense vector-matrix product).

    >>> import numpy as np
    >>> W = np.arange(12.0).reshape(4, 3)
    >>> row = np.zeros(3)
    >>> gather_rows(W, row, np.array([1, 3], np.int32), np.array([2.0, 1.0]), 0, 2)
    >>> row.tolist()
    [15.0, 18.0, 21.0]
    """
    width = W.shape[1]
    j0 = 0
    if W.itemsize == 4:
        # float32: two 32-wide blocks (eight AVX registers of sums) per pass,
        # the last pair overlapping so that a row of 50 takes one pass, not
        # three (32 + 16 + 2). For float64 the extra lanes cost more than
        # the passes they save.
        while width - j0 >= 64:
            _gather_pair_32(W, row, j0, j0 + 32, cols, vals, first, last)
            j0 += 64
        if width - j0 > 32:
            _gather_pair_32(W, row, j0, width - 32, cols, vals, first, last)
            return
    while width - j0 >= 32:
        _gather_32(W, row, j0, cols, vals, first, last)
        j0 += 32
    if width - j0 >= 16:
        _gather_16(W, row, j0, cols, vals, first, last)
        j0 += 16
    if j0 < width:
        # the remainder under 16 (all of a row of 10 logits) in one masked pass
        _gather_tail_16(W, row, j0, cols, vals, first, last)


@_kernel
def scatter_rows(W, d, cols, vals, first, last, lr):
    """``W[cols[k]] -= (lr * vals[k]) * d`` for ``k`` in ``first:last``, in that order.

    ``cols=None`` updates ``W[k]`` itself. With ``lr=-1`` this adds
    ``vals[k] * d`` exactly (negation is exact), an outer-product sum.

    >>> import numpy as np
    >>> W = np.ones((3, 2))
    >>> scatter_rows(W, np.array([1.0, 2.0]), np.array([2], np.int32), np.array([0.5]), 0, 1, 0.1)
    >>> W.tolist()
    [[1.0, 1.0], [1.0, 1.0], [0.95, 0.9]]
    """
    width = W.shape[1]
    j0 = 0
    if W.itemsize == 4:
        while width - j0 >= 64:
            _scatter_pair_32(W, d, j0, j0 + 32, cols, vals, first, last, lr)
            j0 += 64
        if width - j0 > 32:
            _scatter_pair_32(W, d, j0, width - 32, cols, vals, first, last, lr)
            return
    while width - j0 >= 32:
        _scatter_32(W, d, j0, cols, vals, first, last, lr)
        j0 += 32
    if width - j0 >= 16:
        _scatter_16(W, d, j0, cols, vals, first, last, lr)
        j0 += 16
    # a remainder under 16 column by column: fewer block kernels to compile
    for j in range(j0, width):
        _scatter_1(W, d, j, cols, vals, first, last, lr)
