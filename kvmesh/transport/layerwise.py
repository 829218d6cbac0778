"""Layer-wise transfer: a prompt's blocks leave layer by layer while its last chunk is being computed.

A block's layer l is final once layer l of the pass that computes the prompt's last chunk has run
(earlier chunks finished in earlier passes). `LayerProgress` hooks every decoder layer of the engine's
model (forward hooks, applied from outside the model file) and watches the engine loop's passes
(`EngineLoop.pass_observers`); a transfer awaits `LayerWatch.layer_ready(l)` before it reads layer l.
Every transport takes that awaitable (`KVSender.send(..., layer_ready=)`, `KVChunkEncoder.achunks`), and
the bytes that arrive are the same as a whole transfer's: only when they leave changes.

NOTE: a layer's hook runs in the engine loop's pass thread when the layer's work was issued; on CUDA the
work may still be queued, so the watch records an event there and `layer_ready` waits for it.
"""

from __future__ import annotations

import asyncio
import functools

import torch
from torch import nn

from kvmesh.engine.batch import Batch
from kvmesh.engine.engine import Engine
from kvmesh.engine.loop import EngineLoop
from kvmesh.engine.sequence import Sequence


class LayerWatch:
    """When each layer of one prefill-only sequence's blocks is final; created by `LayerProgress.watch`."""

    def __init__(self, seq: Sequence, num_layers: int, loop: asyncio.AbstractEventLoop) -> None:
        self.seq = seq
        self._loop = loop
        self._layers: list[asyncio.Future[torch.cuda.Event | None]] = [
            loop.create_future() for _ in range(num_layers)
        ]
        self._num_marked = 0  # written by the pass thread only
        self._final_pass: asyncio.Future[None] = loop.create_future()

    async def final_pass(self) -> None:
        """Until the pass that computes the prompt's last chunk starts: from then on the sequence's block
        table is complete (every block reserved) and stays as it is. Raises like `layer_ready`."""
        await asyncio.shield(self._final_pass)

    async def layer_ready(self, layer: int) -> None:
        """Until layer `layer` of every block of the sequence is computed. Raises the pass's error if it
        failed, or CancelledError if the watch was dropped before."""
        event = await asyncio.shield(self._layers[layer])
        if event is not None:
            await asyncio.to_thread(event.synchronize)

    def complete(self) -> None:
        """Every layer is final (the whole prompt is computed). Idempotent."""
        _settle(self._final_pass, None)
        for future in self._layers:
            if not future.done():
                future.set_result(None)

    def fail(self, error: BaseException) -> None:
        """Layers not final yet never will be: their waiters get `error`."""
        for future in [self._final_pass, *self._layers]:
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: a transfer that never asks must not log it

    def _mark(self, layer: int, event: torch.cuda.Event | None) -> None:
        # In the pass thread: hand layer `layer` (and any skipped before it) to the event loop.
        for index in range(self._num_marked, layer + 1):
            self._loop.call_soon_threadsafe(_settle, self._layers[index], event)
        self._num_marked = max(self._num_marked, layer + 1)


def _settle(future: asyncio.Future, event: torch.cuda.Event | None) -> None:  # type: ignore[type-arg]
    if not future.done():
        future.set_result(event)


class LayerProgress:
    """Hooks an engine's decoder layers once; `watch(seq)` then reports seq's last pass layer by layer.

    Create it in the event loop that awaits the watches, before the engine loop starts passes.
    """

    def __init__(self, engine: Engine, loop: EngineLoop) -> None:
        self._layers = decoder_layers(engine.model)
        self._watches: dict[int, LayerWatch] = {}
        self._active: list[LayerWatch] = []
        self._loop = asyncio.get_running_loop()
        for index, layer in enumerate(self._layers):
            layer.register_forward_hook(functools.partial(self._on_layer, index))
        loop.pass_observers.append(self)

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def watch(self, seq: Sequence) -> LayerWatch:
        """Start watching seq (before its last chunk is scheduled); `unwatch` it when the transfer ends."""
        watch = LayerWatch(seq, self.num_layers, self._loop)
        self._watches[seq.seq_id] = watch
        return watch

    def unwatch(self, watch: LayerWatch) -> None:
        if self._watches.get(watch.seq.seq_id) is watch:
            del self._watches[watch.seq.seq_id]

    def before_pass(self, batch: Batch) -> None:
        self._active = [
            watch
            for item in batch.items
            if (watch := self._watches.get(item.seq.seq_id)) is not None
            and item.seq.num_computed_tokens + item.num_tokens == len(item.seq)
        ]
        for watch in self._active:
            _settle(watch._final_pass, None)

    def after_pass(self, batch: Batch, error: BaseException | None) -> None:
        for watch in self._active:
            if error is None:
                watch.complete()
            else:
                watch.fail(error)
        self._active = []

    def _on_layer(self, index: int, module: nn.Module, inputs: object, output: object) -> None:
        if not self._active:
            return
        event = None
        if isinstance(output, torch.Tensor) and output.is_cuda:
            event = torch.cuda.Event()
            event.record()
        for watch in self._active:
            watch._mark(index, event)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers in order (`model.model.layers`, the Hugging Face naming we follow)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no model.layers: cannot watch its layers")
    return list(layers)
