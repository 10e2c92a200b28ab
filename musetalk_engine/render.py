"""The streamed render: source decode → UNet + VAE decode → blend → encode, as overlapping stages.

Each stage runs on its own thread (torch, cv2 and pipe writes release the GIL) and hands work on through
bounded queues, so the GPU never waits for blending or encoding and memory stays flat. Any stage's failure
stops all of them and is re-raised in the caller."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import numpy as np
import torch

from .avatar import Avatar
from .blend import paste_face
from .cycle import cycle_indices
from .errors import ProcessingError
from .face_generator import FaceGenerator
from .metrics import StageTimer
from .video import VideoWriter

_END = object()


class _Stopped(Exception):
    """Another stage failed; this one leaves quietly."""


# Largest pinned host buffer of the device path: a batch's finished frames cross to the host in slices of
# at most this size (a batch of 256 at 1080p would otherwise pin 3 × 2.4 GiB of host memory).
HOST_BUFFER_BYTES = 256 << 20


def _oom_exhausted(exc: BaseException, batch_size: int, halved: bool, device: torch.device,
                   what: str) -> ProcessingError | None:
    """The clear error to raise when the one retry at half the batch was already spent (or the batch cannot
    shrink), else None: the caller retries at half."""
    if halved or batch_size == 1:
        err = ProcessingError(f"ran out of {device.type.upper()} memory while {what} at batch size "
                              f"{batch_size}" + (" (already halved once)" if halved else ""),
                              stage="inference", retryable=True, details={"batch_size": batch_size})
        err.__cause__ = exc
        return err
    return None


def _free_after_oom(device: torch.device) -> None:
    """Give the failed batch's memory back. Called only once the OutOfMemoryError has been left behind:
    its traceback holds the frames of the failed call and so the tensors it had allocated, which
    ``empty_cache`` could not free while the exception is alive."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _ModelBatches:
    """The model's faces batch by batch in output order, with one retry at half the batch after an
    out-of-memory error (then a clear 500: a bigger GPU may do). ``batch_size`` ends as the one used."""

    def __init__(self, generator: FaceGenerator, latents: torch.Tensor, windows: torch.Tensor,
                 order: np.ndarray, batch_size: int, timer: StageTimer):
        self.generator, self.latents, self.windows = generator, latents, windows
        self.order, self.batch_size, self.timer = order, batch_size, timer
        self.halved = False
        # the frame order where the latents are, copied once: a copy per batch would make the host wait
        # for the GPU each time (a pageable host→device copy synchronises)
        self.order_on_latents = torch.as_tensor(order, device=latents.device)

    def halve(self) -> None:
        """Retry at half the batch from now on (the blend's OOM asks for it too)."""
        self.generator.release_fast_paths()  # their memory is what the retry at half needs
        _free_after_oom(self.generator.device)
        self.batch_size = max(1, self.batch_size // 2)
        self.halved = True

    def __iter__(self) -> Iterator[tuple[int, np.ndarray, torch.Tensor]]:
        start = 0
        while start < len(self.order):
            idx = self.order[start:start + self.batch_size]
            faces = None
            try:
                faces = self.generator.generate(self.latents[self.order_on_latents[start:start + len(idx)]],
                                                self.windows[start:start + self.batch_size], self.timer,
                                                batch_size=self.batch_size)
            except torch.OutOfMemoryError as exc:
                err = _oom_exhausted(exc, self.batch_size, self.halved, self.generator.device, "rendering")
                if err is not None:
                    raise err from exc
            if faces is None:  # out of the except block: the failed batch's tensors are unreachable now
                self.halve()
                continue
            yield start, idx, faces
            del faces
            start += len(idx)


class _Channel:
    """A bounded queue whose put/get give up as soon as the pipeline is stopping."""

    def __init__(self, stop: threading.Event, maxsize: int):
        self._q: queue.Queue = queue.Queue(maxsize=maxsize)
        self._stop = stop

    def put(self, item) -> None:
        while True:
            if self._stop.is_set():
                raise _Stopped
            try:
                self._q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(self):
        while True:
            if self._stop.is_set():
                raise _Stopped
            try:
                return self._q.get(timeout=0.1)
            except queue.Empty:
                continue


def _guarded(fn: Callable[[], None], errors: list[BaseException], stop: threading.Event) -> Callable[[], None]:
    """``fn`` as a pipeline stage: a stop raised by another stage's failure ends it quietly; its own
    failure is recorded (re-raised by the caller) and stops every other stage."""
    def run() -> None:
        try:
            fn()
        except _Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 — re-raised in the caller
            errors.append(exc)
            stop.set()
    return run


def source_frames(frames: Iterator[np.ndarray], order: np.ndarray, n_source: int,
                  timer: StageTimer) -> Iterator[np.ndarray]:
    """Source frames in output order; kept in memory only when the output runs past one forward pass."""
    keep = len(order) > n_source
    kept: list[np.ndarray] = []
    last = None
    for t, i in enumerate(order):
        if t < n_source:  # the first pass is plain forward: stream it
            with timer.stage("decode"):
                frame = next(frames, None)
            frame = last if frame is None else frame  # a stream one frame short repeats its last
            last = frame
            if keep:
                kept.append(frame)
            yield frame
        else:
            yield kept[min(int(i), len(kept) - 1)]


def render_stream(*, avatar: Avatar, frames: Iterator[np.ndarray], windows: torch.Tensor,
                  generator: FaceGenerator, writer: VideoWriter, batch_size: int, timer: StageTimer,
                  on_progress: Callable[[int, int], None] | None = None) -> int:
    """Render ``len(windows)`` frames into ``writer``; returns the batch size finally used (halved once on OOM)."""
    total = int(windows.shape[0])
    order = cycle_indices(avatar.n_frames, total)
    stop = threading.Event()
    errors: list[BaseException] = []
    sources = _Channel(stop, maxsize=4 * batch_size)
    faces_q = _Channel(stop, maxsize=3)
    out_q = _Channel(stop, maxsize=2 * batch_size)
    latents = torch.from_numpy(avatar.latents)
    if generator.device.type == "cuda":
        latents = latents.pin_memory()

    def decode_stage():
        for frame in source_frames(frames, order, avatar.n_frames, timer):
            sources.put(frame)

    def blend_stage():
        while (item := faces_q.get()) is not _END:
            start, faces = item
            for j, face in enumerate(faces):
                i = int(order[start + j])
                frame = np.array(sources.get())  # decoded buffers are read-only; the copy is the output
                if avatar.face_found[i]:  # frames without a face pass through untouched
                    with timer.stage("blend"):
                        paste_face(frame, face, tuple(avatar.boxes[i]), avatar.masks[i],
                                   tuple(avatar.crop_boxes[i]))
                out_q.put(frame)
        out_q.put(_END)

    def encode_stage():
        done = 0
        while (frame := out_q.get()) is not _END:
            with timer.stage("encode"):
                writer.write(frame)
            done += 1
            if on_progress and (done % 10 == 0 or done == total):
                on_progress(done, total)

    threads = [threading.Thread(target=_guarded(f, errors, stop), name=f"render-{f.__name__}", daemon=True)
               for f in (decode_stage, blend_stage, encode_stage)]
    for th in threads:
        th.start()

    batches = _ModelBatches(generator, latents, windows, order, batch_size, timer)

    def gpu_stage():
        for start, _, faces in batches:
            faces_q.put((start, faces.cpu().numpy()))
        faces_q.put(_END)

    _guarded(gpu_stage, errors, stop)()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return batches.batch_size


def render_stream_device(*, avatar: Avatar, frames: torch.Tensor, material, windows: torch.Tensor,
                         generator: FaceGenerator, writer: VideoWriter, batch_size: int, timer: StageTimer,
                         on_progress: Callable[[int, int], None] | None = None) -> int:
    """The device path: source frames already on the model's device, blending (and, for a ``yuv420p``
    writer, the colour conversion) as tensor ops right after the decode, finished frames copied once into
    reused (pinned, on CUDA) host buffers that the encoder thread writes, a batch per pipe write. The host
    only waits for the GPU when every buffer is taken, so it queues batch n+1 while batch n runs. Returns
    the batch size used."""
    from .device_blend import paste_faces
    from .yuv import rgb_to_i420

    total = int(windows.shape[0])
    order = cycle_indices(avatar.n_frames, total)
    stop = threading.Event()
    errors: list[BaseException] = []
    cuda = generator.device.type == "cuda"
    yuv = writer.pix_fmt == "yuv420p"
    out_q = _Channel(stop, maxsize=3)
    free = _Channel(stop, maxsize=3)  # stop-aware: an encoder that died keeps its buffer; don't wait for it
    frame_bytes = int(np.prod(writer.frame_shape))
    rows = max(1, min(batch_size, HOST_BUFFER_BYTES // frame_bytes))
    for _ in range(3):  # three buffers: one filling, one being encoded, one spare
        free.put(torch.empty((rows, *writer.frame_shape), dtype=torch.uint8, pin_memory=cuda))
    latents = torch.from_numpy(avatar.latents).to(generator.device)

    def encode_stage():
        done = 0
        while (item := out_q.get()) is not _END:
            host, n, event = item
            if event is not None:
                event.synchronize()
            with timer.stage("encode"):
                writer.write_frames(host[:n].numpy())
            free.put(host)
            done += n
            if on_progress:
                on_progress(done, total)

    batches = _ModelBatches(generator, latents, windows, order, batch_size, timer)

    def finish(start: int, idx_np: np.ndarray, faces: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """Frames ``a:b`` of a batch blended (and converted to I420 for a yuv420p writer) on the device."""
        # frames[...] gathers a fresh copy, which the faces are pasted into
        done = paste_faces(frames[batches.order_on_latents[start + a:start + b]], faces[a:b], idx_np[a:b],
                           avatar, material)
        return rgb_to_i420(done) if yuv else done

    def to_host(finished: torch.Tensor) -> None:
        """Hand finished frames to the encoder through the pinned buffers, ``rows`` at a time."""
        for a in range(0, finished.shape[0], rows):
            part = finished[a:a + rows]
            host = free.get()
            host[:len(part)].copy_(part, non_blocking=cuda)
            event = None
            if cuda:  # on the stream the copy was queued on: the engine's device, not the current one
                # blocking: the encoder thread sleeps in the driver instead of spinning a core x264 needs
                event = torch.cuda.Event(blocking=True)
                event.record(torch.cuda.current_stream(generator.device))
            out_q.put((host, len(part), event))

    def model_stage():
        chunk = None  # frames blended at once; set to half a batch after the blend ran out of memory
        for start, idx_np, faces in batches:
            n = len(idx_np)
            step = n if chunk is None else chunk
            for a in range(0, n, step):
                b = min(n, a + step)
                finished = None
                try:
                    with timer.stage("blend", generator.device):
                        finished = finish(start, idx_np, faces, a, b)
                except torch.OutOfMemoryError as exc:
                    err = _oom_exhausted(exc, b - a, chunk is not None, generator.device, "blending")
                    if err is not None:
                        raise err from exc
                if finished is None:  # out of the except block: the failed step's tensors are gone
                    _free_after_oom(generator.device)
                    chunk = max(1, (b - a) // 2)
                    for c in range(a, b, chunk):
                        try:
                            with timer.stage("blend", generator.device):
                                part = finish(start, idx_np, faces, c, min(b, c + chunk))
                        except torch.OutOfMemoryError as exc:
                            raise _oom_exhausted(exc, chunk, True, generator.device, "blending") from exc
                        to_host(part)
                        del part
                    continue
                to_host(finished)
                del finished
            del faces
        out_q.put(_END)

    encoder = threading.Thread(target=_guarded(encode_stage, errors, stop), name="render-encode", daemon=True)
    encoder.start()
    _guarded(model_stage, errors, stop)()
    encoder.join()
    if errors:
        raise errors[0]
    return batches.batch_size
