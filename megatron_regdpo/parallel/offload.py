"""Activation offloading for full recompute: each layer's saved input goes to host memory during the forward
and comes back for the layer's recompute in the backward.

With full recompute a layer keeps only its inputs for the backward (megatron-core's CheckpointFunction saves
them with save_for_backward). The hidden states are the big one: 2 bytes x hidden per token per layer in
bf16, 40 layers at 14B. `ActivationOffload` hooks each layer's forward; while it runs, a
saved-tensor hook takes exactly that layer's hidden-states input (the context and the RoPE table are shared
by all layers and stay) and replaces it with a host copy:

- GPU: the copy goes to pinned host memory on a side stream after the compute stream's work so far, so it
  overlaps the next layers' forward (the tensor is marked used by that stream so the allocator waits for
  the copy before reusing its memory); in the backward, fetching layer i's input starts the copy of layer
  i-1's, so each comes back while the layer after it recomputes. The compute stream waits on an event only
  when it needs the tensor.
- CPU: plain copies (nothing is saved, but the mechanics and the numbers are the same; the tests use it).
- capacity simulation (capacity/simulate.py): the same code on fake tensors; `host_allocation` is set to a
  context that makes the planner's memory tracker count the copies as host memory, not device memory.

Bytes are copied exactly, so losses and gradients are bitwise those of the run without offloading.
Only forwards that save for a backward are hooked (training with grad enabled); the recompute itself runs
inside the backward, outside the hook, and keeps its tensors on the device as usual.
"""
from __future__ import annotations

import contextlib
import weakref

import torch


class _Offloaded:
    """One saved tensor in host memory, and its way back."""

    def __init__(self, owner: "ActivationOffload", t: torch.Tensor):
        self.owner, self.device, self.nbytes = owner, t.device, t.numel() * t.element_size()
        self.back: torch.Tensor | None = None   # the device copy, once fetched (or prefetched)
        self.ready = None                       # CUDA event: the side stream's copy is done
        with owner.host_allocation():
            self.host = torch.empty(t.shape, dtype=t.dtype, device=owner.host_device, pin_memory=owner.pin)
        stream = owner.stream
        if stream is None:
            self.host.copy_(t)
        else:
            stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(stream):
                self.host.copy_(t, non_blocking=True)
                self.ready = torch.cuda.Event()
                self.ready.record(stream)
            t.record_stream(stream)  # its memory is reused only after the copy
        self.held = [self.nbytes]    # host bytes still counted (shared with the finalizer)
        owner._added(self)

    def prefetch(self) -> None:
        if self.back is not None or self.host is None:
            return
        stream = self.owner.stream
        if stream is None:
            self.back = self.host.to(self.device)
            return
        with torch.cuda.stream(stream):
            stream.wait_event(self.ready)  # its copy out is done
            self.back = self.host.to(self.device, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(stream)

    def fetch(self) -> torch.Tensor:
        if self.host is None:
            raise RuntimeError("an offloaded activation was unpacked twice (retain_graph with activation "
                               "offloading is not supported)")
        self.prefetch()
        out, self.back = self.back, None
        if self.ready is not None:
            torch.cuda.current_stream(out.device).wait_event(self.ready)
            out.record_stream(torch.cuda.current_stream(out.device))
        self.owner._released(self)
        self.host = None
        return out


class ActivationOffload:
    """`offload.attach(layers)` once at build time; each layer then offloads its saved hidden-states input.

    host_device: "cpu" (pinned when CUDA is available). `host_allocation`: a context manager factory the host
    copies are allocated in (the planner's tracker sets it). `host_bytes` / `peak_host_bytes`: the host memory
    held now / at most (this rank).
    """

    def __init__(self, host_device: str = "cpu", pin: bool | None = None):
        self.host_device = torch.device(host_device)
        cuda = torch.cuda.is_available() and self.host_device.type == "cpu"
        self.pin = cuda if pin is None else pin
        self.stream = torch.cuda.Stream() if cuda else None
        self.host_bytes = self.peak_host_bytes = self.offloaded = 0
        self._order: list = []  # weak references, in forward order: the backward fetches them in reverse
        self._handles: list = []
        self.host_allocation = contextlib.nullcontext

    def attach(self, layers) -> "ActivationOffload":
        for layer in layers:
            self._handles.append(layer.register_forward_pre_hook(self._enter, with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._exit, always_call=True))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ hooks
    def _enter(self, layer, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if not (layer.training and torch.is_grad_enabled() and isinstance(hidden, torch.Tensor)):
            layer._offload_ctx = None
            return None
        target = hidden._cdata  # the TensorImpl: the very tensor the checkpoint saves

        def pack(t: torch.Tensor):
            return _Offloaded(self, t) if t._cdata == target else t

        ctx = torch.autograd.graph.saved_tensors_hooks(pack, self._unpack)
        ctx.__enter__()
        layer._offload_ctx = ctx
        return None

    def _exit(self, layer, args, output):
        ctx = getattr(layer, "_offload_ctx", None)
        if ctx is not None:
            layer._offload_ctx = None
            ctx.__exit__(None, None, None)
        return None

    def _unpack(self, saved):
        if not isinstance(saved, _Offloaded):
            return saved
        refs = [r() for r in self._order]
        i = refs.index(saved)
        if i > 0 and refs[i - 1] is not None:
            refs[i - 1].prefetch()  # the layer before: back while this one recomputes
        return saved.fetch()

    # ------------------------------------------------------------------ bookkeeping
    def _added(self, item: _Offloaded) -> None:
        ref = weakref.ref(item)
        self._order.append(ref)
        self.offloaded += 1
        self.host_bytes += item.nbytes
        self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)
        # a graph freed without a backward (an exception, a forward only) drops its items: forget them too
        weakref.finalize(item, self._forget, ref, item.held)

    def _released(self, item: _Offloaded) -> None:
        self._forget(weakref.ref(item), item.held)

    def _forget(self, ref, held: list) -> None:
        self.host_bytes -= held[0]
        held[0] = 0
        self._order = [r for r in self._order if r() is not None and r != ref]

    def reset_peak(self) -> None:
        self.peak_host_bytes = self.host_bytes
