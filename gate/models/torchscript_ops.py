"""The TorchScript op check: default deny, over every method reachable from ``forward``.

Kept apart from the loader (:mod:`gate.models.torchscript`) so that the allow-list reads
as one reviewable table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gate.errors import UnsafeModelError


def _words(text: str) -> list[str]:
    return text.split()


# Default deny: only these ops may appear anywhere in code reachable from ``forward``. Each
# is pure (no files, processes, sockets, printing or global state) and checks its indices
# and sizes, so no model can turn a scan into I/O or a heap write. Names carry no overload,
# so ``aten::add`` covers tensor, scalar and int arithmetic alike. Deliberately absent:
# sparse and nested constructors from raw indices or buffers (``_sparse_coo_tensor_*``,
# ``sparse_coo_tensor``, ``to_dense``: unchecked indices wrote to the heap), ``from_file``,
# storage, ``set_``, ``as_strided`` and other raw-memory views, uninitialised allocations
# (``empty*`` would leak old heap contents into activations), printing and saving.
_ALLOWED_ATEN = frozenset(
    _words(
        """
    _convolution conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d
    convolution linear bilinear matmul mm bmm addmm addmv addbmm baddbmm mv dot einsum
    relu relu6 gelu silu mish elu selu celu leaky_relu prelu rrelu hardswish hardsigmoid
    hardtanh hardshrink softshrink tanhshrink softplus softsign sigmoid tanh threshold glu
    logsigmoid log_sigmoid softmax log_softmax _softmax _log_softmax softmin
    max_pool1d max_pool2d max_pool3d max_pool1d_with_indices max_pool2d_with_indices
    max_pool3d_with_indices avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d
    adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d
    adaptive_max_pool3d lp_pool1d lp_pool2d pixel_shuffle pixel_unshuffle channel_shuffle
    batch_norm _batch_norm_impl_index native_batch_norm instance_norm layer_norm
    native_layer_norm group_norm native_group_norm rms_norm local_response_norm normalize
    dropout feature_dropout alpha_dropout feature_alpha_dropout dropout1d dropout2d dropout3d
    embedding embedding_bag one_hot
    upsample_nearest1d upsample_nearest2d upsample_nearest3d upsample_linear1d
    upsample_bilinear2d upsample_bicubic2d upsample_trilinear3d interpolate pad
    constant_pad_nd reflection_pad1d reflection_pad2d replication_pad1d replication_pad2d
    lstm gru rnn_tanh rnn_relu lstm_cell gru_cell rnn_tanh_cell rnn_relu_cell
    scaled_dot_product_attention _native_multi_head_attention _transformer_encoder_layer_fwd
    _nested_tensor_from_mask _nested_tensor_from_mask_left_aligned to_padded_tensor
    view view_as reshape reshape_as flatten unflatten squeeze unsqueeze permute transpose t
    contiguous expand expand_as repeat repeat_interleave tile flip roll narrow select slice
    chunk split split_with_sizes tensor_split unbind cat concat concatenate stack hstack
    vstack movedim moveaxis swapaxes swapdims diagonal tril triu index_select gather
    masked_fill masked_select where index take_along_dim clone detach type_as to
    zeros zeros_like ones ones_like full full_like arange linspace eye tensor scalar_tensor
    as_tensor new_zeros new_ones new_full
    add sub mul div true_divide floor_divide remainder fmod neg abs sign pow exp exp2 expm1
    log log2 log10 log1p sqrt rsqrt reciprocal square sin cos tan asin acos atan atan2 sinh
    cosh asinh acosh atanh erf erfc erfinv floor ceil round trunc frac clamp clamp_min
    clamp_max clip maximum minimum lerp addcmul addcdiv rsub hypot logit nan_to_num
    sum mean prod max min amax amin argmax argmin std var std_mean var_mean norm
    linalg_vector_norm frobenius_norm logsumexp cumsum cumprod all any topk sort argsort
    cdist cosine_similarity pairwise_distance
    eq ne lt le gt ge isnan isinf isfinite logical_and logical_or logical_not logical_xor
    bitwise_and bitwise_or bitwise_not bitwise_xor __and__ __or__ __xor__ __not__
    __is__ __isnot__ __contains__ __getitem__ __range_length __derive_index
    __round_to_zero_floordiv floordiv len dim size numel stride is_floating_point
    is_contiguous item append list
    Int Float Bool ScalarImplicit IntImplicit FloatImplicit format str join
    is_grad_enabled is_autocast_enabled is_autocast_cpu_enabled
    keys values items copy_ fill_ zero_ warn _assert_async
    """
    )
)
_ALLOWED_PRIM = frozenset(
    _words(
        """
    Constant GetAttr If Loop ListConstruct ListUnpack TupleConstruct TupleUnpack TupleIndex
    TupleSlice DictConstruct RaiseException Uninitialized unchecked_cast isinstance
    NumToTensor ImplicitTensorToNum device dtype layout is_nested is_cuda is_cpu
    requires_grad type shape min max abs data
    """
    )
)
# Calls are inlined before checking; calls that inlining leaves (interface-typed submodules)
# are resolved to the module object they reach and checked in turn, to this depth.
_MAX_CALL_DEPTH = 32
_MAX_CALLS = 10_000


def check_ops(path: Path, module: Any) -> None:
    """Refuse any op outside the allow-list in code reachable from ``forward``.

    Inlining resolves calls on concretely typed submodules; a call on an interface-typed
    one stays a ``prim::CallMethod`` that dispatches at run time to whatever module the
    attribute holds. Such a callee is found by following its ``prim::GetAttr`` chain from
    ``self`` on the loaded module, and checked the same way. ``prim::SetAttr`` is not on
    the allow-list, so the attribute cannot be swapped for another module after the check.
    """
    _check_method(path, module._c, (), "forward", set())


def _check_method(
    path: Path, owner: Any, where: tuple[str, ...], method: str, seen: set[tuple[str, ...]]
) -> None:
    """Check ``method`` of ``owner`` (the submodule at attribute path ``where``)."""
    import torch

    key = (*where, f"#{method}")
    if key in seen:
        return
    seen.add(key)
    if len(seen) > _MAX_CALLS or len(where) > _MAX_CALL_DEPTH:
        raise UnsafeModelError(
            f"{path}: the model's method calls nest too deeply to check; refusing to run it"
        )
    try:
        graph = owner._get_method(method).graph.copy()
    except Exception:  # RuntimeError: no such method on the resolved module
        raise UnsafeModelError(
            f"{path}: the model calls method {method!r} that gate cannot resolve statically; "
            "refusing to run it"
        ) from None
    torch._C._jit_pass_inline(graph)
    self_value = next(iter(graph.inputs()), None)
    for node in _all_nodes(graph.block()):
        kind = node.kind()
        if kind == "prim::CallMethod":
            resolved = _resolve_module(owner, self_value, node.inputsAt(0))
            if resolved is None:
                raise UnsafeModelError(
                    f"{path}: the model calls {node.s('name')!r} on a module gate cannot "
                    "resolve statically (prim::CallMethod); refusing to run it"
                )
            callee, names = resolved
            _check_method(path, callee, (*where, *names), node.s("name"), seen)
        elif not _allowed_op(kind):
            if not kind.startswith(("aten::", "prim::")):
                raise UnsafeModelError(
                    f"{path}: the model calls custom operator {kind!r}; gate only runs standard "
                    "aten/prim operators"
                )
            raise UnsafeModelError(
                f"{path}: the model's code calls {kind!r}, which is not on gate's list of pure, "
                "memory-safe operators (files, printing, storage, sparse or raw-memory ops, "
                "calls it cannot resolve); refusing to run it"
            )


def _allowed_op(kind: str) -> bool:
    namespace, _, name = kind.partition("::")
    if namespace == "prim":
        return name in _ALLOWED_PRIM
    if namespace != "aten":
        return False
    if name in _ALLOWED_ATEN:
        return True
    # The in-place form of an allowed op (relu_, add_) is as pure as the op itself.
    return name.endswith("_") and not name.startswith("_") and name[:-1] in _ALLOWED_ATEN


def _resolve_module(owner: Any, self_value: Any, value: Any) -> tuple[Any, list[str]] | None:
    """The module ``value`` is, and its attribute path, when ``value`` is a chain of
    ``prim::GetAttr`` from ``self``; None for anything computed at run time."""
    names: list[str] = []
    while value.unique() != self_value.unique():
        node = value.node()
        if node.kind() != "prim::GetAttr":
            return None
        names.append(node.s("name"))
        value = node.inputsAt(0)
    names.reverse()
    target = owner
    try:
        for name in names:
            target = target.getattr(name)
    except Exception:  # RuntimeError: no such attribute
        return None
    return (target, names) if hasattr(target, "_get_method") else None


def _all_nodes(block: Any) -> list[Any]:
    nodes = []
    for node in block.nodes():
        nodes.append(node)
        for sub in node.blocks():
            nodes.extend(_all_nodes(sub))
    return nodes
