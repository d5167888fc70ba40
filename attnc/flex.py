"""FlexAttention's API over attnc: flex_attention, create_block_mask, and the cache of compiled variants.

Every call traces score_mod and mask_mod again, so the tensors they close over are read at that call (a
closure variable rebound between calls is seen) and a fresh closure per step costs no new kernel: kernels
are looked up by the traced IR (Variant.key()) in a bounded LRU. A BlockMask's tables become params:

    mask = full[b, h, q_idx // BQ, kv_idx // BK] or (partial[b, h, q_idx // BQ, kv_idx // BK] and mask_mod)

which is what FlexAttention computes: a (query block, key block) pair the tables do not list is never
computed, a full block skips mask_mod, a partial one applies it. Where the tables say no more than
mask_mod does (create_block_mask's output) they are left out, so block sparsity reads the mask itself;
that is decided exactly, once per BlockMask and captured tensors."""
from __future__ import annotations

import dataclasses
import weakref
from collections import OrderedDict

import torch
from torch.nn.attention import flex_attention as torch_flex

from attnc.errors import CallError
from attnc.frontend.callbacks import trace
from attnc.frontend.variant import Param, Variant
from attnc.ir import expr as E
from attnc.ir.expr import BOOL, Node, Op
from attnc.passes.block_sparsity import EMPTY, FULL, PARTIAL
from attnc.passes.intervals import Box, Interp
from attnc.runtime.compiled import Compiled
from attnc.runtime.reference import evaluate

CACHE_SIZE = 64         # compiled variants kept (least recently used evicted), and analysed BlockMasks
NO_BLOCKS = 1 << 30     # FlexAttention's BLOCK_SIZE of its one-block BlockMask, exempt from length checks
POINTS = 1 << 22        # mask points evaluated at once when blocks are settled point by point
AGREE_POINTS = 1 << 24  # most points evaluated to prove tables redundant; past it they are simply kept

# kernel_options that only choose how FlexAttention's kernel runs: attnc picks its own tiles, warps and
# stages. ROWS_GUARANTEED_SAFE and BLOCKS_ARE_CONTIGUOUS are promises that let a kernel skip checks;
# attnc does not need them, and ignoring a promise never changes a result. PRESCALE_QK trades accuracy
# for speed; attnc keeps the accurate order. Each may carry FlexAttention's fwd_ / bwd_ prefix.
SPEED_OPTIONS = frozenset({
    "num_warps", "num_stages", "BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2",
    "PRESCALE_QK", "ROWS_GUARANTEED_SAFE", "BLOCKS_ARE_CONTIGUOUS", "WRITE_DQ", "FORCE_USE_FLEX_ATTENTION",
    "USE_TMA", "kpack", "matrix_instr_nonkdim", "waves_per_eu", "SPARSE_Q_BLOCK_SIZE", "SPARSE_KV_BLOCK_SIZE",
})


class _LRU(OrderedDict):
    def get_or(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        return self.put(key, make())

    def put(self, key, value):
        self[key] = value
        while len(self) > CACHE_SIZE:
            self.popitem(last=False)
        return value


def _absent():
    """The weak reference of an absent table (full_kv_* may be None): it too answers None."""
    return None


_KERNELS = _LRU()       # Variant.key() -> Compiled
_TABLES = _LRU()        # identity of a BlockMask's and the mask's tensors -> (tables or None, weak references)


def compiled_for(variant: Variant, ir_key: str | None = None) -> Compiled:
    """The Compiled of this IR (ir_key: variant.key(), if known). It keeps no captured tensors: every call
    passes the current ones."""
    return _KERNELS.get_or(ir_key or variant.key(), lambda: Compiled(dataclasses.replace(variant, captured={})))


def flex_attention(query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False,
                   return_lse=False, kernel_options=None, *, return_aux=None):
    """torch.nn.attention.flex_attention's call. block_mask may also be a mask_mod callable."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise CallError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _check_options(kernel_options)
    if return_lse and return_aux is not None:
        raise CallError("Cannot specify both return_lse and return_aux; expected return_aux=AuxRequest(lse=True)")
    if return_aux is not None and getattr(return_aux, "max_scores", False):
        raise CallError("return_aux=AuxRequest(max_scores=True): attnc does not compute max_scores; "
                        "expected AuxRequest(lse=True)")
    want_lse = bool(return_lse or (return_aux is not None and return_aux.lse))
    if query.dim() == 4 and key.dim() == 4:
        if not enable_gqa and query.shape[1] != key.shape[1]:
            raise CallError(f"Expect query and key/value to have the same number of heads but got "
                            f"Hq={query.shape[1]} and Hkv={key.shape[1]}. Try setting enable_gqa=True for GQA.")
        if query.shape[0] != key.shape[0]:
            key, value = _broadcast_batch(query, key, value, block_mask)
    mask_mod, bm = _mask_mod_of(block_mask, query, key)
    variant = trace(score_mod, mask_mod, device=query.device)
    params = dict(variant.captured)
    ir_key = variant.key()
    if bm is not None:
        variant, params, ir_key = _honour_tables(bm, variant, ir_key, params, query, key)
    out = compiled_for(variant, ir_key)(query, key, value, scale=scale, return_lse=want_lse, **params)
    _check_gradients(out, query, key, value, params)
    if not want_lse:
        return out if return_aux is None else (out, torch_flex.AuxOutput())
    out, lse = out
    lse = lse.to(torch.float64 if query.dtype == torch.float64 else torch.float32)   # FlexAttention's lse dtype
    return (out, lse) if return_aux is None else (out, torch_flex.AuxOutput(lse=lse))


def _check_options(options) -> None:
    if options is None:
        return
    if not isinstance(options, dict):
        raise CallError(f"kernel_options must be a dict, got {type(options).__name__}")
    for name, value in options.items():
        base = name[4:] if isinstance(name, str) and name[:4] in ("fwd_", "bwd_") else name
        if name == "BACKEND":
            if value != "AUTO":
                raise CallError(f"kernel_options['BACKEND'] = {value!r}: attnc runs its own kernels; "
                                f"expected 'AUTO' or no BACKEND")
        elif base not in SPEED_OPTIONS:
            raise CallError(f"kernel_options[{name!r}] is not an option attnc can honour; expected one of "
                            f"BACKEND='AUTO' or the speed-only options {', '.join(sorted(SPEED_OPTIONS))}")


def _broadcast_batch(query, key, value, block_mask):
    """FlexAttention lets k and v have batch 1 under a q of batch B when the BlockMask has batch B."""
    if key.shape[0] == 1 and value.shape[0] == 1 and block_mask is not None:
        bm_batch = getattr(block_mask, "kv_num_blocks", None)
        if bm_batch is not None and bm_batch.dim() == 3 and bm_batch.shape[0] == query.shape[0]:
            return key.expand(query.shape[0], *key.shape[1:]), value.expand(query.shape[0], *value.shape[1:])
    raise CallError(f"Expect query and key/value to have the same batch size, or key/value batch 1 with a "
                    f"block_mask of the query's batch size, but got Bq={query.shape[0]}, Bkv={key.shape[0]}")


def _mask_mod_of(block_mask, query, key):
    """(mask_mod, BlockMask or None) of block_mask, with FlexAttention's checks of a BlockMask."""
    if block_mask is None:
        return None, None
    if not isinstance(block_mask, torch_flex.BlockMask):
        if callable(block_mask):
            return block_mask, None
        raise CallError(f"block_mask must be a BlockMask (or a mask_mod callable), got {type(block_mask).__name__}")
    if block_mask.mask_mod is torch_flex._sliced_mask_mod_error:
        raise CallError("Cannot use mask_mod from a sliced BlockMask; expected its mask_mod set from the "
                        "original BlockMask's mask_mod")
    if tuple(block_mask.BLOCK_SIZE) != (NO_BLOCKS, NO_BLOCKS):
        q_len, kv_len = block_mask.seq_lengths
        Q, KV = query.shape[-2], key.shape[-2]
        if Q > q_len or KV > kv_len:
            raise CallError(f"block_mask was created for block_mask.shape={block_mask.shape} but got q_len={Q} "
                            f"and kv_len={KV}. As the block mask was created for a smaller length than you're "
                            f"using it for, you likely need to create a new block mask.")
        if Q < q_len or KV < kv_len:
            raise CallError(f"block_mask was created for block_mask.shape={block_mask.shape} but got q_len={Q} "
                            f"and kv_len={KV}. As the block mask was created for a larger length than you're "
                            f"using it for, create a new block mask with the correct length, or adjust it "
                            f"with block_mask._adjust(q_len, kv_len).")
    if block_mask.kv_num_blocks.device != query.device:
        raise CallError(f"Expect q/k/v and block_mask to be on the same device but got {query.device} and "
                        f"{block_mask.kv_num_blocks.device}.")
    mask_mod = None if block_mask.mask_mod is torch_flex.noop_mask else block_mask.mask_mod
    return mask_mod, block_mask


def _check_gradients(out, query, key, value, params) -> None:
    """A result that should carry gradients and does not would be silently detached: refuse it."""
    out = out[0] if isinstance(out, tuple) else out
    needs = [t for t in (query, key, value, *params.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
    if torch.is_grad_enabled() and needs and not out.requires_grad:
        raise CallError("attnc.flex_attention computed no gradients for inputs that require them; expected "
                        "inputs without requires_grad, or the call under torch.no_grad()")


# -- BlockMask tables --
def _honour_tables(bm, variant: Variant, ir_key: str, params: dict, query, key) -> tuple[Variant, dict, str]:
    """The variant, params and IR key that compute what FlexAttention computes with this BlockMask."""
    B, H, Q, KV = query.shape[0], query.shape[1], query.shape[2], key.shape[2]
    bq, bk = (int(x) for x in bm.BLOCK_SIZE)
    tensors = [bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices, *params.values()]
    ident = _identity(tensors)
    key_ = (ir_key, B, H, Q, KV, bq, bk, ident)
    hit = _TABLES.get(key_) if ident is not None else None
    if hit is not None and all(ref() is t for ref, t in zip(hit[1], tensors)):
        _TABLES.move_to_end(key_)
        tables = hit[0]
    else:
        tables = _needed_tables(bm, variant, params, B, H, Q, KV, bq, bk)
        if ident is not None:           # weak references: an id is trusted only while its tensor lives
            _TABLES.put(key_, (tables, [weakref.ref(t) if t is not None else _absent for t in tensors]))
    if tables is None:
        return variant, params, ir_key
    full, partial = tables
    with_tables = _with_tables(variant, full, partial, bq, bk, B, H)
    return with_tables, {**params, **_table_params(variant, full, partial)}, with_tables.key()


def _identity(tensors) -> tuple | None:
    """What identifies these tensors' contents between calls: object and version counter; None where a
    tensor does not count versions (inference mode), so nothing is cached for it."""
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        if t.is_inference():
            return None
        out.append((id(t), t._version))
    return tuple(out)


def _needed_tables(bm, variant, params, B, H, Q, KV, bq, bk):
    """(full, partial) bool tables [B or 1, H or 1, query blocks, key blocks], or None where the tables
    select exactly what mask_mod does."""
    full, partial = dense_tables(bm, B, H, Q, KV, bq, bk)
    sizes = {"B": B, "H": H, "HKV": H, "Q": Q, "KV": KV, "D": 1}
    if blocks_agree(variant.mask, params, sizes, bq, bk, full, partial):
        return None
    return full, partial


def dense_tables(bm, B: int, H: int, Q: int, KV: int, bq: int, bk: int):
    """A BlockMask's ordered tables as dense bool [Bt, Ht, query blocks, key blocks] (full, partial), checked:
    a listed block must exist, be listed once, and not be both full and partial. Blocks past the call's
    lengths hold no position and are left out (FlexAttention's kernel masks them off too)."""
    nq, nk = -(-Q // bq), -(-KV // bk)
    partial = _dense(bm.kv_num_blocks, bm.kv_indices, "kv_num_blocks", "kv_indices", B, H, nq, nk)
    full = None
    if bm.full_kv_num_blocks is not None:
        full = _dense(bm.full_kv_num_blocks, bm.full_kv_indices, "full_kv_num_blocks", "full_kv_indices",
                      B, H, nq, nk)
        if full.shape != partial.shape:
            full, partial = (t.expand(torch.broadcast_shapes(full.shape, partial.shape)) for t in (full, partial))
        both = (full & partial).nonzero()
        if len(both):
            b, h, i, j = both[0].tolist()
            raise CallError(f"block_mask lists key block {j} for query block {i} (b={b}, h={h}) both as full "
                            f"and as partial; expected each block in at most one of the two")
    return full, partial


def _dense(num, idx, num_name, idx_name, B, H, nq, nk) -> torch.Tensor:
    num, idx = num.cpu(), idx.cpu()
    while idx.dim() < 4:
        num, idx = num.unsqueeze(0), idx.unsqueeze(0)
    if idx.dim() > 4 or num.shape != idx.shape[:-1]:
        raise CallError(f"block_mask.{num_name} has shape {tuple(num.shape)} and {idx_name} "
                        f"{tuple(idx.shape)}; expected [B, H, query blocks] and [B, H, query blocks, n]")
    Bt, Ht, rows = idx.shape[:3]
    if Bt not in (1, B) or Ht not in (1, H):
        raise CallError(f"block_mask has batch and heads ({Bt}, {Ht}); expected 1 or the query's ({B}, {H})")
    if rows < nq:
        raise CallError(f"block_mask.{idx_name} has {rows} query blocks; expected at least {nq} for q_len "
                        f"(ceil(q_len / BLOCK_SIZE[0]))")
    num, idx = num[:, :, :nq].long(), idx[:, :, :nq].long()
    width = idx.shape[-1]
    if (num < 0).any() or (num > width).any():
        raise CallError(f"block_mask.{num_name} holds counts outside [0, {width}] ({idx_name} lists {width} "
                        f"blocks per row)")
    listed = torch.arange(width) < num[..., None]
    if (listed & (idx < 0)).any():
        raise CallError(f"block_mask.{idx_name} lists a negative key block")
    kept = listed & (idx < nk)
    counts = torch.zeros(Bt, Ht, nq, nk + 1, dtype=torch.long)
    counts.scatter_add_(-1, torch.where(kept, idx, nk), kept.long())
    counts = counts[..., :nk]
    if (counts > 1).any():
        b, h, i, j = (counts > 1).nonzero()[0].tolist()
        raise CallError(f"block_mask.{idx_name} lists key block {j} twice for query block {i} (b={b}, h={h}); "
                        f"expected each block once")
    return counts > 0


_FULL, _PARTIAL = "block_full", "block_partial"


def _table_names(variant: Variant) -> tuple[str, str]:
    names = []
    for base in (_FULL, _PARTIAL):
        name = base
        while name in variant.params:
            name += "_"
        names.append(name)
    return names[0], names[1]


def _with_tables(variant: Variant, full, partial, bq: int, bk: int, B: int, H: int) -> Variant:
    """mask = full[...] or (partial[...] and mask): the tables as bool params read per block."""
    full_name, partial_name = _table_names(variant)
    Bt, Ht = partial.shape[:2]
    b = E.index("b") if Bt > 1 else E.const(0)
    h = E.index("h") if Ht > 1 else E.const(0)
    at = (b, h, E.make(Op.FLOORDIV, E.index("q_idx"), bq), E.make(Op.FLOORDIV, E.index("kv_idx"), bk))
    dims = ("B" if Bt > 1 else 1, "H" if Ht > 1 else 1, "block_rows", "block_cols")
    mask = Node(Op.LOAD, at, partial_name, BOOL)
    if variant.mask is not None:
        mask = E.make(Op.AND, mask, variant.mask)
    params = dict(variant.params)
    params[partial_name] = Param(partial_name, "bool", dims)
    if full is not None:
        mask = E.make(Op.OR, Node(Op.LOAD, at, full_name, BOOL), mask)
        params[full_name] = Param(full_name, "bool", dims)
    return dataclasses.replace(variant, mask=mask, params=params, name=f"{variant.name}_blocks", captured={})


def _table_params(variant: Variant, full, partial) -> dict:
    full_name, partial_name = _table_names(variant)
    out = {partial_name: partial}
    if full is not None:
        out[full_name] = full
    return out


# -- create_block_mask --
def create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device=None, BLOCK_SIZE=128, _compile=False,
                      separate_full_blocks=True, compute_dq_write_order=False, dq_kv_order=True):
    """torch's create_block_mask, its blocks classified by attnc: intervals over each block, the mask
    evaluated only on the points of blocks the intervals leave undecided. Returns a torch BlockMask."""
    B, H = B or 1, H or 1
    bq, bk = (BLOCK_SIZE, BLOCK_SIZE) if isinstance(BLOCK_SIZE, int) else tuple(BLOCK_SIZE)
    if device is None:
        device = torch.accelerator.current_accelerator() or "cpu"
    variant = trace(None, mask_mod, device=device)
    sizes = {"B": B, "H": H, "HKV": H, "Q": Q_LEN, "KV": KV_LEN, "D": 1}
    cls = block_classes(variant.mask, variant.captured, sizes, bq, bk).expand(B, H, -1, -1)
    # FlexAttention pads the mask to whole blocks with False: a block past an edge is never full
    ragged = torch.zeros(cls.shape[-2:], dtype=torch.bool)
    if Q_LEN % bq:
        ragged[-1, :] = True
    if KV_LEN % bk:
        ragged[:, -1] = True
    full = (cls == FULL) & ~ragged
    nonempty = cls != EMPTY
    partial, full = (nonempty & ~full, full) if separate_full_blocks else (nonempty, None)
    tables = [*ordered(partial), *(ordered(full) if full is not None else (None, None))]
    block_mask = torch_flex.BlockMask.from_kv_blocks(
        *(t.to(device) if t is not None else None for t in tables), BLOCK_SIZE=(bq, bk), mask_mod=mask_mod,
        seq_lengths=(Q_LEN, KV_LEN))
    if compute_dq_write_order:
        block_mask.dq_write_order, block_mask.dq_write_order_full = \
            torch_flex._compute_dq_write_order_from_block_mask(block_mask, dq_kv_order=dq_kv_order)
        block_mask.dq_kv_order_spt = dq_kv_order
    return block_mask



# -- block classification, exact: intervals decide most blocks in O(blocks), the mask's points the rest --
def block_classes(mask: Node | None, params: dict, sizes: dict, bq: int, bk: int) -> torch.Tensor:
    """int8 [Bm, Hm, query blocks, key blocks] of EMPTY / PARTIAL / FULL over each block's real points;
    Bm is B where the mask reads b, else 1 (Hm likewise)."""
    nq, nk = -(-sizes["Q"] // bq), -(-sizes["KV"] // bk)
    if mask is None:
        return torch.full((1, 1, nq, nk), FULL, dtype=torch.int8)
    Bm, Hm = _bh(mask, sizes)
    out = torch.empty((Bm, Hm, nq, nk), dtype=torch.int8)
    for b in range(Bm):
        for h in range(Hm):
            cls = _interval_classes(mask, params, sizes, bq, bk, b, h)
            tiles = (cls == PARTIAL).nonzero()
            if len(tiles):
                cls[tiles[:, 0], tiles[:, 1]] = _settle(mask, params, sizes, bq, bk, b, h, tiles)
            out[b, h] = cls
    return out


def blocks_agree(mask: Node | None, params: dict, sizes: dict, bq: int, bk: int, full, partial) -> bool:
    """Whether full | (partial & mask) == mask at every point: each block listed full is all-true under the
    mask, each block not listed all-false (a partial block computes the mask either way)."""
    listed_full = full if full is not None else torch.zeros_like(partial)
    unlisted = ~(partial | listed_full)
    if mask is None:                                # all-true: no block may be left out
        return not unlisted.any()
    Bm, Hm = _bh(mask, sizes)
    cls = torch.stack([torch.stack([_interval_classes(mask, params, sizes, bq, bk, b, h) for h in range(Hm)])
                       for b in range(Bm)])         # [Bm, Hm, query blocks, key blocks], sound
    if (listed_full & (cls == EMPTY)).any() or (unlisted & (cls == FULL)).any():
        return False
    need = (listed_full | unlisted) & (cls == PARTIAL)
    need = need.any(0, keepdim=True) if Bm == 1 else need      # settled once where the mask ignores b
    need = need.any(1, keepdim=True) if Hm == 1 else need
    if int(need.sum()) * bq * bk > AGREE_POINTS:
        return False                                # too costly to prove: the tables are kept, which is exact
    exact = cls.expand(*need.shape).clone()
    for b, h in {(b, h) for b, h in need.nonzero()[:, :2].tolist()}:
        tiles = need[b, h].nonzero()
        exact[b, h, tiles[:, 0], tiles[:, 1]] = _settle(mask, params, sizes, bq, bk, b, h, tiles)
    return not ((listed_full & (exact != FULL)).any() or (unlisted & (exact != EMPTY)).any())


def ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexAttention's ordered form of dense block tables: counts, and the listed blocks first, ascending."""
    dense = dense.to(torch.int32)
    idx = torch.argsort(dense, dim=-1, descending=True, stable=True)
    return dense.sum(-1).to(torch.int32), idx.to(torch.int32)


def _bh(mask: Node, sizes: dict) -> tuple[int, int]:
    uses = E.free_indices(mask)
    return (sizes["B"] if "b" in uses else 1), (sizes["H"] if "h" in uses else 1)


def _interval_classes(mask: Node, params: dict, sizes: dict, bq: int, bk: int, b: int, h: int) -> torch.Tensor:
    """int8 [query blocks, key blocks] from the mask's intervals over each block at this (b, h): sound."""
    mask, params = _specialize(mask, params, b, h)
    Q, KV = sizes["Q"], sizes["KV"]
    nq, nk = -(-Q // bq), -(-KV // bk)
    f64 = lambda v: torch.as_tensor(v, dtype=torch.float64)      # noqa: E731
    q0 = torch.arange(nq, dtype=torch.float64)[:, None] * bq
    k0 = torch.arange(nk, dtype=torch.float64)[None, :] * bk
    ranges = {"b": (f64(b), f64(b)), "h": (f64(h), f64(h)),
              "q_idx": (q0, torch.clamp(q0 + bq - 1, max=Q - 1)), "kv_idx": (k0, torch.clamp(k0 + bk - 1, max=KV - 1))}
    box = Box(ranges, {k: float(v) for k, v in sizes.items()}, params, {"q_idx": bq, "kv_idx": bk})
    lo, hi = (torch.broadcast_to(x, (nq, nk)) for x in Interp(box)(mask))
    out = torch.full((nq, nk), PARTIAL, dtype=torch.int8)
    out[lo >= 1] = FULL
    out[hi <= 0] = EMPTY
    return out


def _specialize(mask: Node, params: dict, b: int, h: int) -> tuple[Node, dict]:
    """The mask at one (b, h), each param axis read at a constant sliced away: intervals then see the row
    of a table (doc[b, q_idx]) this batch reads, not the hull over every batch."""
    mask = E.substitute(mask, {E.index("b"): E.const(b), E.index("h"): E.const(h)})
    sliced = dict(params)

    def fix(n: Node) -> Node | None:
        if n.op is not Op.LOAD or not any(s.op is Op.CONST for s in n.src):
            return None
        t = params[n.arg]
        sel = tuple(s.arg if s.op is Op.CONST else slice(None) for s in n.src)
        if any(isinstance(i, int) and not 0 <= i < t.shape[a] for a, i in enumerate(sel)):
            return None                            # out of bounds: the call-time bounds check reports it
        name = f"{n.arg}@{'_'.join(str(i) if isinstance(i, int) else 'x' for i in sel)}"
        sliced[name] = t[sel]
        return Node(Op.LOAD, tuple(s for s in n.src if s.op is not Op.CONST), name, n.dtype)
    return E.bottom_up(mask, fix), sliced


def _settle(mask: Node, params: dict, sizes: dict, bq: int, bk: int, b: int, h: int,
            tiles: torch.Tensor) -> torch.Tensor:
    """int8 class of each (query block, key block) in tiles [n, 2], from the mask on all its real points."""
    Q, KV = sizes["Q"], sizes["KV"]
    env = {k: torch.tensor(v) for k, v in sizes.items()}
    env.update(b=torch.tensor(b), h=torch.tensor(h))
    out = []
    for chunk in tiles.split(max(1, POINTS // (bq * bk))):
        rows = torch.clamp(chunk[:, 0, None] * bq + torch.arange(bq), max=Q - 1)     # an edge block repeats
        cols = torch.clamp(chunk[:, 1, None] * bk + torch.arange(bk), max=KV - 1)    # its last row: harmless
        env.update(q_idx=rows[:, :, None], kv_idx=cols[:, None, :])
        kept = evaluate(mask, env, params).expand(len(chunk), bq, bk)
        count = torch.count_nonzero(kept, dim=(1, 2))
        out.append(torch.where(count == bq * bk, FULL, torch.where(count > 0, PARTIAL, EMPTY)).to(torch.int8))
    return torch.cat(out)
