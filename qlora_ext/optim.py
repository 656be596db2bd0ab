"""Paged AdamW: torch.optim.AdamW's update (decoupled weight decay, bias correction) with float32 states
for every parameter dtype, one fused multi-tensor step per parameter group, and on CUDA the states in
managed (paged) memory that can be moved to the CPU and back.

    opt = PagedAdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    loss.backward(); opt.step(); opt.zero_grad()
    opt.page_out()   # states to CPU RAM: the GPU memory is free for a memory-hungry phase
    opt.page_in()    # and back (step() also prefetches them)

Parameters: float32, float16 or bfloat16, all on one device (CPU or one GPU). States: `exp_avg` and
`exp_avg_sq` float32 with the parameter's shape and strides, `step` a CPU float32 scalar tensor, as in
torch.optim.AdamW, so state_dict() / load_state_dict() move checkpoints both ways between the two
(torch casts our float32 states to a bf16 parameter's dtype when it loads them; we upcast its bf16 ones).
The update is computed in float32 and a 16-bit parameter is rounded once per step.

On CUDA (paged=True) the states of all parameters live in one cudaMallocManaged arena per optimizer,
exposed as CUDA tensors: paging it is one prefetch on the current stream. Nothing synchronizes the host
during step() (except page_out(), which by default waits for the move so the GPU memory is free).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from . import _C
from ._ops import ops

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_STATE_ALIGN = 64  # floats (256 bytes): every state in an arena starts aligned for vector access


def _dense(t: torch.Tensor) -> bool:
    """Whether t is non-overlapping and dense (a permutation of a contiguous tensor: its elements fill
    numel consecutive slots). torch.Tensor has no public method for this."""
    expected = 1
    for stride, size in sorted((s, n) for n, s in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return all(n <= 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()))


class PagedAdamW(torch.optim.Optimizer):
    """AdamW with float32 states in paged (CUDA managed) memory and a fused C++/CUDA step.

    Args:
        params: parameters (float32, float16 or bfloat16 tensors on one device) or parameter groups.
        lr, betas, eps, weight_decay: as torch.optim.AdamW (same defaults).
        amsgrad: must be False (not implemented).
        maximize: maximize the objective instead of minimizing it.
        paged: on CUDA, keep the states in one managed arena (True) or in ordinary device memory (False).
        prefetch_every_step: prefetch the arena to the GPU before every step (True), or only after page_out().
            Prefetching resident memory costs little and brings back pages the driver evicted under
            memory pressure.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False, paged: bool = True,
                 prefetch_every_step: bool = True):
        if isinstance(lr, torch.Tensor):
            lr = float(lr)
        if not 0.0 <= lr:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if amsgrad:
            raise ValueError("amsgrad=True is not supported by PagedAdamW")
        self.paged = paged
        self.prefetch_every_step = prefetch_every_step
        self._device: Optional[torch.device] = None
        self._arenas: list = []   # managed uint8 CUDA tensors, one per allocation (normally one)
        self._slots: dict = {}    # param -> (exp_avg, exp_avg_sq), allocated for every trainable param at once
        self._used_slots: set = set()   # params whose slot a state has held (a state started again zeroes it)
        self._paged_out = False
        # The group keys of torch.optim.AdamW, with its defaults, so that checkpoints load either way.
        defaults = dict(lr=lr, betas=tuple(float(b) for b in betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=False, maximize=maximize, foreach=None, capturable=False, differentiable=False,
                        fused=None, decoupled_weight_decay=True)
        super().__init__(params, defaults)

    # ---- copy.deepcopy and pickle ------------------------------------------------------------------------
    def _settings(self) -> dict:
        """The constructor's keyword arguments beyond the groups' hyperparameters."""
        return {"paged": self.paged, "prefetch_every_step": self.prefetch_every_step}

    def __getstate__(self) -> dict:
        # torch.optim.Optimizer's keeps defaults, state and param_groups only, which misses this optimizer's own
        # storage (slots, arenas): keep the groups, the settings and the state_dict, and build it again from them
        return {"param_groups": self.param_groups, "settings": self._settings(), "state_dict": self.state_dict(),
                "defaults": self.defaults}

    def __setstate__(self, saved: dict) -> None:
        if "settings" not in saved:   # torch's load_state_dict sets state and param_groups through here
            super().__setstate__(saved)
            return
        type(self).__init__(self, [dict(g) for g in saved["param_groups"]], **saved["settings"])
        self.defaults = dict(saved["defaults"])   # (what a group added later takes; not the class's defaults)
        self.load_state_dict(saved["state_dict"])

    # ---- parameters -------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            self._check_param(p)

    def _check_param(self, p: torch.Tensor) -> None:
        if p.is_complex():
            raise TypeError(f"PagedAdamW does not support complex parameters, got one of dtype {p.dtype}")
        if p.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"PagedAdamW parameters must be float32, float16 or bfloat16, got {p.dtype}")
        if p.layout != torch.strided:
            raise TypeError(f"PagedAdamW parameters must be dense (strided) tensors, got layout {p.layout}")
        if self._device is None:
            self._device = p.device
        elif p.device != self._device:
            raise ValueError(f"PagedAdamW needs all parameters on one device: got {p.device} after {self._device}")

    # ---- state storage ----------------------------------------------------------------------------
    def _uses_arena(self, device: torch.device) -> bool:
        return self.paged and device.type == "cuda"

    def _slot(self, p: torch.Tensor):
        """The float32 (exp_avg, exp_avg_sq) of p, zero when first allocated. The first call allocates them
        for every trainable parameter not yet placed, in one arena on CUDA."""
        if p not in self._slots:
            todo = [q for g in self.param_groups for q in g["params"]
                    if q not in self._slots and (q.requires_grad or q is p)]
            if not self._uses_arena(p.device):
                for q in todo:
                    self._slots[q] = tuple(torch.zeros_like(q, dtype=torch.float32, memory_format=torch.preserve_format)
                                           for _ in range(2))
            else:
                self._allocate_arena(todo)
        return self._slots[p]

    def _allocate_arena(self, params: list) -> None:
        offsets, total = [], 0
        for q in params:
            span = self._span(q)
            offsets.append(total)
            total += 2 * (-(-span // _STATE_ALIGN) * _STATE_ALIGN)
        device = params[0].device
        arena = _C.managed_empty(4 * max(total, 1), device.index if device.index is not None
                                 else torch.cuda.current_device())
        floats = arena.view(torch.float32)
        floats.zero_()  # on the current stream: the pages are first touched, and placed, on the GPU
        for q, off in zip(params, offsets):
            span = -(-self._span(q) // _STATE_ALIGN) * _STATE_ALIGN
            stride = q.stride() if _dense(q) else self._contiguous_strides(q.shape)
            self._slots[q] = (floats.as_strided(q.shape, stride, off), floats.as_strided(q.shape, stride, off + span))
        self._arenas.append(arena)

    @staticmethod
    def _contiguous_strides(shape) -> tuple:
        strides, s = [], 1
        for n in reversed(shape):
            strides.append(s)
            s *= max(n, 1)
        return tuple(reversed(strides))

    @staticmethod
    def _span(q: torch.Tensor) -> int:
        # Elements a state with q's strides covers (q's numel for dense q; at least 1 so views stay apart).
        return max(q.numel(), 1)

    def state_bytes(self) -> int:
        """Bytes of optimizer state held (managed arenas, or the state tensors on CPU / unpaged CUDA)."""
        if self._arenas:
            return sum(a.numel() for a in self._arenas)
        return sum(8 * m.numel() for m, _ in self._slots.values())

    # ---- paging ------------------------------------------------------------------------------------
    def page_out(self, non_blocking: bool = False) -> bool:
        """Moves every paged state to CPU memory (a prefetch on the current stream). Unless non_blocking,
        waits for the move, so the GPU memory is free on return. Returns whether anything was moved (False on
        CPU, unpaged, before the first step, or on a GPU that pages only on demand)."""
        moved = False
        for arena in self._arenas:
            moved = _C.managed_prefetch(arena, False) or moved
        self._paged_out = True
        if moved and not non_blocking:
            torch.cuda.current_stream(self._arenas[0].device).synchronize()
        return moved

    def page_in(self) -> bool:
        """Moves every paged state back to the GPU (a prefetch on the current stream; does not wait)."""
        moved = False
        for arena in self._arenas:
            moved = _C.managed_prefetch(arena, True) or moved
        self._paged_out = False
        return moved

    def state_location(self) -> list:
        """Where each arena was last prefetched: a device index, -1 for the CPU, -2 for nowhere."""
        return [_C.managed_location(a) for a in self._arenas]

    # ---- the step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step for every parameter with a gradient (parameters whose grad is None are skipped)."""
        self._refuse_capture()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        prefetched = False
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad, state = self._step_inputs(p)
                params.append(p)
                grads.append(grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if not params:
                continue
            if not prefetched:
                self._prefetch_for_step()
                prefetched = True
            beta1, beta2 = group["betas"]
            ops.adamw_step_(params, grads, exp_avgs, exp_avg_sqs, steps, float(group["lr"]), float(beta1),
                            float(beta2), float(group["eps"]), float(group["weight_decay"]), bool(group["maximize"]))
        return loss

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)  # torch.optim.AdamW's (non-fused) step count
        state["exp_avg"], state["exp_avg_sq"] = self._fresh_slot(p)

    def _fresh_slot(self, p: torch.Tensor):
        """p's slot for a state starting at step 0: zero. The slot outlives the state it held (the storage is
        allocated once), so where that state was dropped (a load_state_dict without it, opt.state.clear(), del
        opt.state[p]) its moments are cleared, as torch.optim.AdamW starts from zeros."""
        slot = self._slot(p)
        if p in self._used_slots:
            self._zero_slot(slot)
        self._used_slots.add(p)
        return slot

    @staticmethod
    def _zero_slot(slot) -> None:
        for t in slot:
            t.zero_()

    def _step_inputs(self, p: torch.Tensor):
        """(grad, state) of p for this step: the gradient checked and in p's memory layout (the kernels walk
        param, grad and states in one memory order), p's state initialised on its first step."""
        name, grad = type(self).__name__, p.grad
        if grad.is_sparse:
            raise RuntimeError(f"{name} does not support sparse gradients")
        if p.device != self._device:
            raise ValueError(f"{name} needs all parameters on one device: a parameter is on {p.device}, the "
                             f"others on {self._device}")
        state = self.state[p]
        if len(state) == 0:
            self._init_state(p, state)
        if not _same_layout(grad, p):
            grad = torch.empty_like(p).copy_(grad)
        return grad, state

    def _refuse_capture(self) -> None:
        """At the start of step(), before any state is made: the step counts and step sizes are computed on the
        host and passed by value, so a replayed CUDA graph would repeat one step's sizes forever."""
        if self._device is not None and self._device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{type(self).__name__}.step() cannot be captured in a CUDA graph: its step sizes "
                               "are computed on the host at each step")

    def _prefetch_for_step(self) -> None:
        if self._arenas and (self.prefetch_every_step or self._paged_out):
            for arena in self._arenas:
                _C.managed_prefetch(arena, True)
        self._paged_out = False

    # ---- checkpoints -------------------------------------------------------------------------------
    def _load_step_counts(self, state_dict: dict, moment_keys: tuple) -> list:
        """Loads state_dict without the moments (torch.optim.Optimizer's loader restores groups and step counts)
        and returns (saved id, param, saved state) for each saved state, for the caller to copy the moments
        itself."""
        saved = state_dict["state"]
        stripped = dict(state_dict)
        stripped["state"] = {k: {n: v for n, v in s.items() if n not in moment_keys} for k, s in saved.items()}
        torch.optim.Optimizer.load_state_dict(self, stripped)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        id_map = dict(zip(ids, (p for g in self.param_groups for p in g["params"])))
        return [(k, id_map[k], s) for k, s in saved.items() if k in id_map]

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state dict of PagedAdamW or torch.optim.AdamW. The moments go into this optimizer's float32
        states (upcast from bf16/fp16 if torch saved them so; into the managed arena on CUDA)."""
        groups = state_dict["param_groups"]
        if any(g.get("amsgrad", False) for g in groups):
            raise ValueError("the state dict comes from an amsgrad optimizer, which PagedAdamW does not support")
        saved = state_dict["state"]
        for k, s in saved.items():
            missing = [n for n in ("step", "exp_avg", "exp_avg_sq") if n not in s]
            if missing:
                raise ValueError(f"the state of parameter {k} has no {', '.join(missing)}: not an AdamW state dict")
        # torch's loader casts each state to its parameter's dtype (bf16 moments for a bf16 parameter): give
        # it the step counts only and copy the moments into our float32 states ourselves.
        for k, p, s in self._load_step_counts(state_dict, ("exp_avg", "exp_avg_sq")):
            for n in ("exp_avg", "exp_avg_sq"):
                if tuple(s[n].shape) != tuple(p.shape):
                    raise ValueError(f"the {n} of parameter {k} has shape {tuple(s[n].shape)}, but the parameter "
                                     f"has shape {tuple(p.shape)}")
            exp_avg, exp_avg_sq = self._slot(p)
            self._used_slots.add(p)
            exp_avg.copy_(s["exp_avg"])
            exp_avg_sq.copy_(s["exp_avg_sq"])
            step = s["step"]
            step = float(step.item()) if isinstance(step, torch.Tensor) else float(step)
            self.state[p] = {"step": torch.tensor(step, dtype=torch.float32), "exp_avg": exp_avg,
                             "exp_avg_sq": exp_avg_sq}
        self._paged_out = True  # prefetch at the next step whatever the setting

    def __repr__(self) -> str:
        return super().__repr__().replace(self.__class__.__name__ + " (",
                                          f"{self.__class__.__name__} (paged={self.paged}, ", 1)


# ---- 8-bit states ----------------------------------------------------------------------------------------
_BLOCK = _C.ADAMW8BIT_BLOCK            # elements per absmax (csrc/kernels/adamw8bit_core.h)
_SIGNED_ZERO_CODE = _C.dynamic_map(True).index(0.0)   # the code of 0.0 in exp_avg's map (127)
_STATE_8BIT_KEYS = ("state1", "absmax1", "state2", "absmax2")
_STATE_32BIT_KEYS = ("exp_avg", "exp_avg_sq")
_ARENA_ALIGN = 256  # bytes: every state in an arena starts aligned for vector access


def _num_blocks(numel: int) -> int:
    return -(-numel // _BLOCK)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """The 1-D view of a non-overlapping and dense tensor in its memory order."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def quantize_state(x: torch.Tensor, like: torch.Tensor, signed: bool):
    """(codes, absmax) of a float state x (any float dtype, `like`'s shape) in the 8-bit format: codes uint8
    with `like`'s shape and strides, absmax float32 [ceil(numel / 256)] for blocks in `like`'s memory order,
    both on x's device."""
    tmp = torch.empty_like(like, dtype=torch.float32, device=x.device)
    tmp.copy_(x)
    codes, absmax = ops.quantize_8bit_dynamic(_flat(tmp), signed)
    out = torch.empty_like(like, dtype=torch.uint8, device=x.device)
    _flat(out).copy_(codes)
    return out, absmax


def dequantize_state(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """The float32 state (codes' shape and strides) of 8-bit codes (uint8, non-overlapping and dense) and their
    block absmax (float32 [ceil(numel / 256)], blocks in codes' memory order)."""
    flat = ops.dequantize_8bit_dynamic(_flat(codes).contiguous(), absmax.reshape(-1).float(), signed)
    out = torch.empty_like(codes, dtype=torch.float32)
    _flat(out).copy_(flat)
    return out


class PagedAdamW8bit(PagedAdamW):
    """PagedAdamW with blockwise 8-bit states (like bitsandbytes' PagedAdamW8bit): 2 bytes per parameter plus
    8 bytes per 256 instead of 8 bytes per parameter.

    exp_avg and exp_avg_sq are stored as uint8 codes of the signed and unsigned "dynamic" maps of Dettmers'
    8-bit optimizers (qlora_ext._C.dynamic_map) times one float32 absmax per block of 256 elements (in the
    parameter's memory order). Each step dequantizes a block, applies torch.optim.AdamW's update in float32
    (the same arithmetic as PagedAdamW), updates the parameter (a 16-bit one rounded once) and requantizes
    the block with its new absmax (nearest code; a value exactly between two codes takes the lower one).
    Parameters with fewer than min_8bit_size elements (biases, norms, small LoRA tensors) keep PagedAdamW's
    float32 states, where quantization would save little and cost accuracy, and so do those in
    float_state_params.

    Args: as PagedAdamW, and
        min_8bit_size: parameters with at least this many elements get 8-bit states (bitsandbytes' default,
            4096).
        float_state_params: parameters that keep float32 states whatever their size: token embeddings, whose
            rows of rare tokens get rare, large updates that a block's shared absmax quantizes coarsely (Hugging
            Face's Trainer keeps nn.Embedding weights at 32-bit states with bitsandbytes' 8-bit optimizers; the
            trainer here does the same). Not part of the state dict: a state loaded for such a parameter is
            dequantized.

    State (state_dict()): an 8-bit parameter has "step" (CPU float32 scalar), "state1" (uint8 codes of
    exp_avg, the parameter's shape), "absmax1" (float32 [ceil(numel / 256)]), "state2" / "absmax2" (the same
    for exp_avg_sq); a small one has torch.optim.AdamW's "step", "exp_avg", "exp_avg_sq" (float32).
    load_state_dict() takes this format (resuming bit for bit) or torch.optim.AdamW's / PagedAdamW's (float
    moments are quantized on load), so a run can switch to this optimizer mid-way; dense_state_dict() gives the
    dequantized moments in torch.optim.AdamW's format for the way back.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False, paged: bool = True,
                 prefetch_every_step: bool = True, min_8bit_size: int = 4096, float_state_params: Iterable = ()):
        if int(min_8bit_size) < 1:
            raise ValueError(f"min_8bit_size must be >= 1, got {min_8bit_size}")
        self.min_8bit_size = int(min_8bit_size)
        float_state_params = list(float_state_params)
        bad = sorted({type(p).__name__ for p in float_state_params if not isinstance(p, torch.Tensor)})
        if bad:
            raise TypeError(f"float_state_params must be tensors (parameters), got {', '.join(bad)}")
        # by identity, holding the tensors (so that an id is never another tensor's)
        self._float_state = {id(p): p for p in float_state_params}
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize, paged=paged, prefetch_every_step=prefetch_every_step)
        members = {id(p) for g in self.param_groups for p in g["params"]}
        if any(i not in members for i in self._float_state):
            raise ValueError("float_state_params must be parameters this optimizer steps (the tensors themselves, "
                             "not p.data or p.detach())")

    def _settings(self) -> dict:
        return dict(super()._settings(), min_8bit_size=self.min_8bit_size,
                    float_state_params=list(self._float_state.values()))

    def is_8bit(self, p: torch.Tensor) -> bool:
        """Whether p gets (or has) 8-bit states."""
        return p.numel() >= self.min_8bit_size and self._float_state.get(id(p)) is not p

    # ---- state storage ----------------------------------------------------------------------------
    def _slot(self, p: torch.Tensor):
        """p's states, initialised to zero: (codes1, absmax1, codes2, absmax2) for an 8-bit parameter,
        (exp_avg, exp_avg_sq) otherwise. The first call allocates them for every trainable parameter not yet
        placed, in one arena on CUDA."""
        if p not in self._slots:
            todo = [q for g in self.param_groups for q in g["params"]
                    if q not in self._slots and (q.requires_grad or q is p)]
            if self._uses_arena(p.device):
                self._allocate_arena(todo)
            else:
                for q in todo:
                    if self.is_8bit(q):
                        self._slots[q] = (torch.full_like(q, _SIGNED_ZERO_CODE, dtype=torch.uint8),
                                          torch.zeros(_num_blocks(q.numel()), dtype=torch.float32, device=q.device),
                                          torch.zeros_like(q, dtype=torch.uint8),
                                          torch.zeros(_num_blocks(q.numel()), dtype=torch.float32, device=q.device))
                    else:
                        self._slots[q] = tuple(torch.zeros_like(q, dtype=torch.float32) for _ in range(2))
        return self._slots[p]

    def _allocate_arena(self, params: list) -> None:
        total = 0

        def take(nbytes):
            nonlocal total
            offset = total
            total += -(-max(nbytes, 1) // _ARENA_ALIGN) * _ARENA_ALIGN
            return offset

        layout = []
        for q in params:
            span = self._span(q)
            if self.is_8bit(q):
                nb = _num_blocks(q.numel())
                layout.append((q, (take(span), take(4 * nb), take(span), take(4 * nb))))
            else:
                layout.append((q, (take(4 * span), take(4 * span))))
        device = params[0].device
        arena = _C.managed_empty(max(total, 1), device.index if device.index is not None
                                 else torch.cuda.current_device())
        arena.zero_()  # on the current stream: the pages are first touched, and placed, on the GPU
        floats = arena.view(torch.float32)
        for q, offsets in layout:
            stride = q.stride() if _dense(q) else self._contiguous_strides(q.shape)
            if len(offsets) == 4:
                nb = _num_blocks(q.numel())
                codes1 = arena.as_strided(q.shape, stride, offsets[0])
                codes1.fill_(_SIGNED_ZERO_CODE)
                self._slots[q] = (codes1, floats.as_strided((nb,), (1,), offsets[1] // 4),
                                  arena.as_strided(q.shape, stride, offsets[2]),
                                  floats.as_strided((nb,), (1,), offsets[3] // 4))
            else:
                self._slots[q] = tuple(floats.as_strided(q.shape, stride, off // 4) for off in offsets)
        self._arenas.append(arena)

    @staticmethod
    def _zero_slot(slot) -> None:
        if len(slot) == 4:   # 8-bit: the codes of 0.0, zero absmax
            slot[0].fill_(_SIGNED_ZERO_CODE)
            for t in slot[1:]:
                t.zero_()
        else:
            PagedAdamW._zero_slot(slot)

    def state_bytes(self) -> int:
        """Bytes of optimizer state held (managed arenas, or the state tensors on CPU / unpaged CUDA)."""
        if self._arenas:
            return sum(a.numel() for a in self._arenas)
        return sum(sum(t.numel() * t.element_size() for t in slot) for slot in self._slots.values())

    # ---- the step ----------------------------------------------------------------------------------
    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        slot = self._fresh_slot(p)
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state.update(zip(_STATE_8BIT_KEYS if len(slot) == 4 else _STATE_32BIT_KEYS, slot))

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step for every parameter with a gradient (parameters whose grad is None are skipped):
        per parameter group, one call of adamw8bit_step_ for the 8-bit parameters and one of adamw_step_ for
        the small ones."""
        self._refuse_capture()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        prefetched = False
        for group in self.param_groups:
            big = ([], [], [], [], [], [], [])    # params, grads, codes1, absmax1, codes2, absmax2, steps
            small = ([], [], [], [], [])          # params, grads, exp_avg, exp_avg_sq, steps
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad, state = self._step_inputs(p)
                if "state1" in state:
                    for lst, t in zip(big, (p, grad, *(state[k] for k in _STATE_8BIT_KEYS), state["step"])):
                        lst.append(t)
                else:
                    for lst, t in zip(small, (p, grad, state["exp_avg"], state["exp_avg_sq"], state["step"])):
                        lst.append(t)
            if not big[0] and not small[0]:
                continue
            if not prefetched:
                self._prefetch_for_step()
                prefetched = True
            beta1, beta2 = group["betas"]
            hyper = (float(group["lr"]), float(beta1), float(beta2), float(group["eps"]),
                     float(group["weight_decay"]), bool(group["maximize"]))
            if big[0]:
                ops.adamw8bit_step_(*big, *hyper)
            if small[0]:
                ops.adamw_step_(*small, *hyper)
        return loss

    # ---- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """torch.optim.Optimizer.state_dict(), except that states living in a managed arena are returned as
        copies (same device, shape and strides): the arena holds uint8 codes and float32 absmax side by side,
        and torch.save refuses tensors of different dtypes that view one storage."""
        sd = super().state_dict()
        if self._arenas:
            sd["state"] = {k: {n: (v.clone() if n != "step" and torch.is_tensor(v) else v) for n, v in s.items()}
                           for k, s in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state dict of PagedAdamW8bit (8-bit states copied as they are: a resumed run continues bit
        for bit), or of torch.optim.AdamW / PagedAdamW (float moments, quantized here for 8-bit parameters).
        Small parameters take float moments as they are (or dequantized 8-bit ones)."""
        groups = state_dict["param_groups"]
        if any(g.get("amsgrad", False) for g in groups):
            raise ValueError("the state dict comes from an amsgrad optimizer, which PagedAdamW8bit does not support")
        saved = state_dict["state"]
        for k, s in saved.items():
            if "step" in s and all(n in s for n in _STATE_8BIT_KEYS):
                continue
            missing = [n for n in ("step",) + _STATE_32BIT_KEYS if n not in s]
            if missing:
                raise ValueError(f"the state of parameter {k} has no {', '.join(missing)}: not an AdamW state dict "
                                 f"(nor an 8-bit one with {', '.join(_STATE_8BIT_KEYS)})")
        # torch's loader would cast the states to their parameter's dtype: give it the step counts only.
        for k, p, s in self._load_step_counts(state_dict, _STATE_8BIT_KEYS + _STATE_32BIT_KEYS):
            eight = "state1" in s and "exp_avg" not in s
            if eight:
                for n in ("state1", "state2"):
                    if tuple(s[n].shape) != tuple(p.shape):
                        raise ValueError(f"the {n} of parameter {k} has shape {tuple(s[n].shape)}, but the parameter "
                                         f"has shape {tuple(p.shape)}")
                for n in ("absmax1", "absmax2"):
                    if s[n].numel() != _num_blocks(p.numel()):
                        raise ValueError(f"the {n} of parameter {k} has {s[n].numel()} elements, but a parameter "
                                         f"of {p.numel()} elements has {_num_blocks(p.numel())} blocks")
            else:
                for n in _STATE_32BIT_KEYS:
                    if tuple(s[n].shape) != tuple(p.shape):
                        raise ValueError(f"the {n} of parameter {k} has shape {tuple(s[n].shape)}, but the parameter "
                                         f"has shape {tuple(p.shape)}")
            slot = self._slot(p)
            self._used_slots.add(p)
            step = s["step"]
            step = float(step.item()) if isinstance(step, torch.Tensor) else float(step)
            state = {"step": torch.tensor(step, dtype=torch.float32)}
            if len(slot) == 4:
                if eight and all(_same_layout(s[n], p) and _dense(s[n])
                                 for n in ("state1", "state2")):
                    for dst, n in zip(slot, _STATE_8BIT_KEYS):  # codes: one layout, so one memory order
                        dst.copy_(s[n].reshape(dst.shape))
                else:
                    if eight:  # codes in another memory order: through float32
                        m = dequantize_state(s["state1"], s["absmax1"], True)
                        v = dequantize_state(s["state2"], s["absmax2"], False)
                    else:
                        m, v = s["exp_avg"], s["exp_avg_sq"]
                    for (codes, absmax), x, signed in (((slot[0], slot[1]), m, True), ((slot[2], slot[3]), v, False)):
                        c, a = quantize_state(x.to(p.device), codes, signed)
                        _flat(codes).copy_(_flat(c))
                        absmax.copy_(a)
                state.update(zip(_STATE_8BIT_KEYS, slot))
            else:
                if eight:
                    m = dequantize_state(s["state1"], s["absmax1"], True)
                    v = dequantize_state(s["state2"], s["absmax2"], False)
                else:
                    m, v = s["exp_avg"], s["exp_avg_sq"]
                slot[0].copy_(m)
                slot[1].copy_(v)
                state.update(zip(_STATE_32BIT_KEYS, slot))
            self.state[p] = state
        self._paged_out = True  # prefetch at the next step whatever the setting

    def dense_state_dict(self) -> dict:
        """state_dict() with every 8-bit state dequantized to float32 "exp_avg" / "exp_avg_sq" (the parameter's
        shape, on its device): torch.optim.AdamW's and PagedAdamW's format."""
        sd = self.state_dict()
        dense = {}
        for k, s in sd["state"].items():
            if "state1" in s:
                dense[k] = {"step": s["step"], "exp_avg": dequantize_state(s["state1"], s["absmax1"], True),
                            "exp_avg_sq": dequantize_state(s["state2"], s["absmax2"], False)}
            else:
                dense[k] = dict(s)
        sd["state"] = dense
        return sd
