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
        self._paged_out = False
        # The group keys of torch.optim.AdamW, with its defaults, so that checkpoints load either way.
        defaults = dict(lr=lr, betas=tuple(float(b) for b in betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=False, maximize=maximize, foreach=None, capturable=False, differentiable=False,
                        fused=None, decoupled_weight_decay=True)
        super().__init__(params, defaults)

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
            stride = q.stride() if q.is_non_overlapping_and_dense() else self._contiguous_strides(q.shape)
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
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("PagedAdamW does not support sparse gradients")
                if p.device != self._device:
                    raise ValueError(f"PagedAdamW needs all parameters on one device: a parameter is on "
                                     f"{p.device}, the others on {self._device}")
                state = self.state[p]
                if len(state) == 0:
                    exp_avg, exp_avg_sq = self._slot(p)
                    # torch.optim.AdamW's (non-fused) step count: a CPU float32 scalar
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"], state["exp_avg_sq"] = exp_avg, exp_avg_sq
                if not _same_layout(grad, p):  # the kernel walks param, grad and states in one memory order
                    grad = torch.empty_like(p).copy_(grad)
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

    def _prefetch_for_step(self) -> None:
        if self._arenas and (self.prefetch_every_step or self._paged_out):
            for arena in self._arenas:
                _C.managed_prefetch(arena, True)
        self._paged_out = False

    # ---- checkpoints -------------------------------------------------------------------------------
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
        stripped = dict(state_dict)
        stripped["state"] = {k: {n: v for n, v in s.items() if n not in ("exp_avg", "exp_avg_sq")}
                             for k, s in saved.items()}
        super().load_state_dict(stripped)
        ids = [i for g in groups for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        id_map = dict(zip(ids, params))
        for k, s in saved.items():
            if k not in id_map:
                continue
            p = id_map[k]
            for n in ("exp_avg", "exp_avg_sq"):
                if tuple(s[n].shape) != tuple(p.shape):
                    raise ValueError(f"the {n} of parameter {k} has shape {tuple(s[n].shape)}, but the parameter "
                                     f"has shape {tuple(p.shape)}")
            exp_avg, exp_avg_sq = self._slot(p)
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
