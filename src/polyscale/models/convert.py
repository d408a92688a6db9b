"""Conversion of the original authors' checkpoints into our models.

PyConv (Duta et al.): same layout as ours except that a pyramid conv's levels are `conv2.conv2_{i}`
(ours: `conv2.levels.{i-1}`) and a single-level stage stores a plain `conv2.weight`.

PSConv (Li et al., ECCV 2020, detection backbones): each PSConv is three tensors,
`conv2.gwconv` (grouped, groups = G*P, dilation d), `conv2.gwconv_shift` (same, dilation 2d, applied to
the input with the two halves of each group's channels swapped) and `conv2.conv` (dense within each of
the G groups, dilation 1, with the blocks (out part o, in part o) and (out part (o+P/2) mod P, in part o)
meant to be masked to zero), P = 4 parts of contiguous channels and d = 2 in the released backbones. The
layer is one poly-scale conv whose dilation matrix D is that block layout; ours is the interleaved form
of the paper's Eq. 3. The two are equal up to a relabelling of channels, so conversion finds output /
input channel permutations mapping their D onto `PSConv2d.dilation_matrix()`, permutes the dense kernel
and the neighbouring layers (conv1 rows + bn1 on the input side, bn2 + conv3 columns on the output side)
and loads the kernel with `load_dense_weight`. Non-zero weights left in the masked blocks (the original
re-initialises after masking, and its grouped version masks only some groups) add a second dilation to
one kernel, which our layer cannot represent: they are dropped and reported with their magnitude.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "PSConvConversion",
    "UnrepresentableWeights",
    "convert_psconv_original",
    "match_dilation_layout",
    "original_psconv_dense",
    "rename_pyconv_original",
]

_PYCONV_LEVEL = re.compile(r"\.conv2\.conv2_(\d+)\.")
_PS_SUFFIX = "conv2.gwconv.weight"
_BN_KEYS = ("weight", "bias", "running_mean", "running_var")


def rename_pyconv_original(state_dict: Mapping[str, Tensor], model_keys: set[str]) -> dict[str, Tensor]:
    """Map the PyConv authors' keys onto ours: `conv2.conv2_{i}` -> `conv2.levels.{i-1}`, and a plain
    `conv2.weight` (single-level stage) -> `conv2.levels.0.weight` where the model has no `conv2.weight`."""
    out = {}
    for key, value in state_dict.items():
        new = _PYCONV_LEVEL.sub(lambda m: f".conv2.levels.{int(m.group(1)) - 1}.", key)
        if new not in model_keys and new.endswith(".conv2.weight"):
            alt = new[: -len("weight")] + "levels.0.weight"
            new = alt if alt in model_keys else new
        elif new not in model_keys and ".conv2.levels.0." in new:  # our single-level op may be a plain conv
            alt = new.replace(".conv2.levels.0.", ".conv2.")
            new = alt if alt in model_keys else new
        out[new] = value
    return out


def match_dilation_layout(src: Tensor, dst: Tensor, max_classes: int = 8) -> tuple[Tensor, Tensor]:
    """Row / column permutations with `src[rows][:, cols] == dst` for two dilation matrices.

    Rows (columns) with identical entries form classes; any valid permutation maps classes onto classes
    of equal size, so it is enough to search the bijections of row classes (at most `max_classes`!) and
    read the column-class bijection off the class matrix. Channels inside a class keep their order.
    Raises ValueError when no relabelling exists.
    """
    if src.shape != dst.shape:
        raise ValueError(f"dilation matrices differ in shape: {tuple(src.shape)} vs {tuple(dst.shape)}")
    s_rows, s_rlab = torch.unique(src, dim=0, return_inverse=True)
    d_rows, d_rlab = torch.unique(dst, dim=0, return_inverse=True)
    s_cols, s_clab = torch.unique(src, dim=1, return_inverse=True)
    d_cols, d_clab = torch.unique(dst, dim=1, return_inverse=True)
    kr, kc = len(s_rows), s_cols.shape[1]
    if kr != len(d_rows) or kc != d_cols.shape[1]:
        raise ValueError(
            f"no channel relabelling maps one dilation layout onto the other: {kr}x{kc} vs "
            f"{len(d_rows)}x{d_cols.shape[1]} distinct rows x columns"
        )
    if kr > max_classes:
        raise ValueError(f"{kr} distinct dilation rows; matching supports at most {max_classes}")
    s_rn, d_rn = torch.bincount(s_rlab, minlength=kr), torch.bincount(d_rlab, minlength=kr)
    s_cn, d_cn = torch.bincount(s_clab, minlength=kc), torch.bincount(d_clab, minlength=kc)
    # class matrices: entry (row class, column class)
    s_cls = s_rows[:, torch.stack([(s_clab == b).nonzero()[0, 0] for b in range(kc)])]
    d_cls = d_rows[:, torch.stack([(d_clab == b).nonzero()[0, 0] for b in range(kc)])]
    for pi in itertools.permutations(range(kr)):
        pi_t = torch.tensor(pi)
        if not torch.equal(s_rn[pi_t], d_rn):
            continue
        rows = s_cls[pi_t]  # src class matrix with row classes in dst order
        sigma = []
        for j in range(kc):
            hits = (rows == d_cls[:, j : j + 1]).all(dim=0).nonzero().flatten()
            if len(hits) != 1 or s_cn[hits[0]] != d_cn[j]:
                break
            sigma.append(int(hits[0]))
        if len(sigma) != kc or len(set(sigma)) != kc:
            continue
        row_perm = torch.empty(len(dst), dtype=torch.long)
        for i in range(kr):
            row_perm[(d_rlab == i).nonzero().flatten()] = (s_rlab == pi[i]).nonzero().flatten()
        col_perm = torch.empty(dst.shape[1], dtype=torch.long)
        for j in range(kc):
            col_perm[(d_clab == j).nonzero().flatten()] = (s_clab == sigma[j]).nonzero().flatten()
        return row_perm, col_perm
    raise ValueError("no channel relabelling maps one dilation layout onto the other")


def original_psconv_dense(
    gwconv: Tensor, gwconv_shift: Tensor, conv: Tensor, groups: int, dilation: int = 2
) -> tuple[Tensor, Tensor, Tensor]:
    """Dense kernel, dilation matrix and masked-block leftovers of one original PSConv layer.

    Args:
        gwconv, gwconv_shift: (C_out, C_in / (G*P), k, k); conv: (C_out, C_in / G, k, k).
        groups: G, the groups of the dense conv (1 for ResNet, 32 for ResNeXt 32x4d).
        dilation: d of the original layer (2 in the released backbones).
    Returns:
        weight (C_out, C_in/G, k, k), D (C_out, C_in/G) and the boolean mask (C_out, C_in/G) of the blocks
        covered by gwconv / gwconv_shift, where the dense conv should hold zeros.
    """
    c_out, ig = conv.shape[:2]
    parts = ig // gwconv.shape[1]
    og, ip = c_out // groups, gwconv.shape[1]
    op = og // parts
    if parts * ip != ig or op * parts != og or parts % 2:
        raise ValueError(
            f"inconsistent PSConv shapes: gwconv {tuple(gwconv.shape)}, conv {tuple(conv.shape)}"
        )
    out_part = (torch.arange(c_out) % og) // op  # (C_out,) part of each output channel within its group
    in_part = torch.arange(ig) // ip  # (C_in/G,)
    diag = in_part[None, :] == out_part[:, None]  # (C_out, C_in/G): gwconv blocks
    # the shift conv's part o reads the group's channels rolled by half: original part (o + P/2) mod P
    shift = in_part[None, :] == ((out_part + parts // 2) % parts)[:, None]
    mask = diag | shift
    weight = conv.clone()
    weight[mask] = 0
    dmat = torch.ones(c_out, ig, dtype=torch.long)
    dmat[diag], dmat[shift] = dilation, 2 * dilation
    for o in range(parts):
        rows = out_part == o
        weight[rows, o * ip : (o + 1) * ip] = gwconv[rows]
        s = (o + parts // 2) % parts
        weight[rows, s * ip : (s + 1) * ip] = gwconv_shift[rows]
    return weight, dmat, mask


@dataclass
class UnrepresentableWeights:
    """Non-zero weights in an original PSConv's masked blocks, dropped by the conversion."""

    layer: str
    max_abs: float
    rel_norm: float  # ||dropped|| / ||converted kernel||
    fraction_nonzero: float  # of the masked entries


@dataclass
class PSConvConversion:
    state_dict: dict[str, Tensor]  # everything except the PSConv kernels, neighbours permuted
    dense: dict[str, Tensor]  # module name -> dense kernel in the module's channel order
    converted: list[str]
    unrepresentable: list[UnrepresentableWeights]


def _block_perms(d_orig: Tensor, d_ours: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """Per-group relabelling (groups map onto themselves), as global output / input permutations."""
    og, ig = d_ours.shape[0] // groups, d_ours.shape[1]
    rows, cols, cache = [], [], {}
    for g in range(groups):
        a, b = d_orig[g * og : (g + 1) * og], d_ours[g * og : (g + 1) * og]
        key = (a.numpy().tobytes(), b.numpy().tobytes())
        if key not in cache:
            cache[key] = match_dilation_layout(a, b)
        r, c = cache[key]
        rows.append(r + g * og)
        cols.append(c + g * ig)
    return torch.cat(rows), torch.cat(cols)


def convert_psconv_original(
    state_dict: Mapping[str, Tensor], model: nn.Module, dilation: int = 2
) -> PSConvConversion:
    """Convert every `PREFIX.conv2.{gwconv,gwconv_shift,conv}` of an original PSConv backbone file.

    Raises ValueError (wrapped into CheckpointError by the loader) when the model has no PSConv at a
    converted position, its groups differ, or its dilation pattern is not a relabelling of the file's.
    """
    sd = dict(state_dict)
    out = PSConvConversion(sd, {}, [], [])
    for key in [k for k in state_dict if k.endswith(_PS_SUFFIX)]:
        prefix = key[: -len(_PS_SUFFIX)]
        name = prefix + "conv2"
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the file has a PSConv at {name} but the model has no such module") from None
        if not hasattr(module, "dilation_matrix"):
            raise ValueError(
                f"the file has a PSConv at {name} but the model has a {type(module).__name__} there"
            )
        gw, sh, conv = (sd.pop(f"{name}.{t}.weight") for t in ("gwconv", "gwconv_shift", "conv"))
        in_channels = sd[prefix + "conv1.weight"].shape[0]
        groups = in_channels // conv.shape[1]
        weight, d_orig, mask = original_psconv_dense(gw, sh, conv, groups, dilation)
        d_ours = module.dilation_matrix().cpu()
        if d_ours.shape != d_orig.shape:
            raise ValueError(
                f"{name}: model kernel layout {tuple(d_ours.shape)} vs file {tuple(d_orig.shape)} "
                f"(file groups={groups}); build the matching cardinality"
            )
        try:
            rows, cols = _block_perms(d_orig, d_ours, groups)
        except ValueError as err:
            found = sorted(set(d_orig.flatten().tolist()))
            raise ValueError(
                f"{name}: the file's dilation layout (rates {found}, base dilation {dilation}) is not a "
                f"channel relabelling of the model's PSConv ({err}); build with model.conv.dilation_pattern="
                "[1,2,1,4] and axes=both for the released backbones"
            ) from None
        sd[prefix + "conv1.weight"] = sd[prefix + "conv1.weight"][cols]
        for t in _BN_KEYS:
            sd[f"{prefix}bn1.{t}"] = sd[f"{prefix}bn1.{t}"][cols]
            sd[f"{prefix}bn2.{t}"] = sd[f"{prefix}bn2.{t}"][rows]
        sd[prefix + "conv3.weight"] = sd[prefix + "conv3.weight"][:, rows]
        # our row r lies in group g = r // og and reads that group's inputs in the order cols[g]
        og, ig = weight.shape[0] // groups, weight.shape[1]
        local = (cols.view(groups, ig) % ig).repeat_interleave(og, dim=0)  # (C_out, C_in/G)
        out.dense[name] = weight[rows[:, None], local]
        out.converted.append(name)
        leftover = conv[mask]  # (n_masked, k, k)
        if leftover.any():
            out.unrepresentable.append(
                UnrepresentableWeights(
                    layer=name,
                    max_abs=float(leftover.abs().max()),
                    rel_norm=float(leftover.norm() / weight.norm().clamp_min(1e-12)),
                    fraction_nonzero=float((leftover != 0).sum() / leftover.numel()),
                )
            )
    return out
