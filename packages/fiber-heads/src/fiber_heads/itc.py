"""Image-text contrastive head: dual-encoder projections, learnable temperature and feature queue.

Implements docs/reference/architecture.md §8.2 (the ``*_itc`` projections and poolers, L2 normalisation) and docs/reference/training.md §1.4
(ITC loss with a queue of past features, stop-gradient on the "other side", temperature clamped in place) and
the queue bookkeeping that §1.5's hard-negative mining reads.

Three loss modes:

* **queue mode** (reference behaviour, ``queue_size > 0``, or ``queue_size == 0`` without ``gather``): the
  local batch is scored against ``[stopgrad(local batch) ; queue]``; the queue is refreshed after the loss with
  the all-gathered detached features of every rank (``gather`` is the identity on one process).
* **gathered mode** (``queue_size == 0`` and a ``gather`` callable): open_clip's global loss over the features
  of all ranks, gathered with gradient; ``local_loss=True`` scores only this rank's rows.
* **compatibility mode** (``compat_queue_noise=True``): the queue starts as unnormalised standard-normal noise and
  all its columns enter the loss from the first step, as in the official code. The default starts empty and
  only scores filled entries.

Instead of the official pixel / token queues (``image_input_queue`` etc.), every queue entry records the
dataset index of its pair, so the trainer can re-fetch queued hard negatives from the dataset.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fiber_heads.init import init_head_weights
from fiber_heads.projections import TEXT_POOLING, Pooler, pool_text
from fiber_heads.types import ContrastiveOutput, GatherFn, ImageFeatures, TextFeatures

_QUEUE_KEYS = ("image_queue", "text_queue", "index_queue", "queue_ptr", "queue_total")


class ContrastiveHead(nn.Module):
    """ITC projections, temperature and (optional) queue.

    Args:
        image_dim: width ``C_img`` of the image tokens fed to :meth:`embed_image` (1024 for FIBER-B).
        text_dim: width ``C_txt`` of the text hidden states fed to :meth:`embed_text` (768 for FIBER-B).
        embed_dim: width ``D`` of the contrastive embedding (768 for FIBER-B).
        temperature_init: initial value of the learnable temperature ``temp`` (0.07).
        temperature_range: ``(min, max)`` the temperature is clamped to, in place, before every loss.
        queue_size: number of queued past features per modality (4096 in the reference; 0 disables the queue).
        gather: all-gather with gradient, ``[B, ...] -> [W * B, ...]``; injected by the trainer, ``None`` on a
            single process.
        compat_queue_noise: reproduce the official noise-initialised queue whose every column is scored from
            the first step.
        local_loss: in gathered mode, score only this rank's rows against all gathered columns (open_clip's
            ``local_loss``); otherwise every rank computes the full ``[W*B, W*B]`` loss.
        rank: this process's rank, used by ``local_loss`` to locate its positives; may be set later
            (``head.rank = fabric.global_rank``).
        text_pool: ``"first"`` (``<s>``, the reference) or ``"mean"`` over real tokens (see
            :func:`fiber_heads.projections.pool_text`).

    Buffers (not part of the state dict; see :meth:`queue_state` to checkpoint them):
        image_queue / text_queue: ``[queue_size, D]`` queued normalised embeddings (row-major; the official
            checkpoint stores the transpose).
        index_queue: ``LongTensor [queue_size]`` dataset index of each entry (``-1`` unknown).
        queue_ptr: ``LongTensor []`` next slot to write.
        queue_total: ``LongTensor []`` number of entries ever enqueued.
    """

    image_queue: Tensor
    text_queue: Tensor
    index_queue: Tensor
    queue_ptr: Tensor
    queue_total: Tensor

    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        embed_dim: int,
        temperature_init: float = 0.07,
        temperature_range: tuple[float, float] = (0.001, 1.0),
        queue_size: int = 0,
        gather: GatherFn | None = None,
        compat_queue_noise: bool = False,
        local_loss: bool = False,
        rank: int = 0,
        text_pool: str = "first",
    ) -> None:
        super().__init__()
        if text_pool not in TEXT_POOLING:
            raise ValueError(f"text_pool must be one of {TEXT_POOLING}, got {text_pool!r}")
        self.text_pool = text_pool
        lo, hi = temperature_range
        if not 0.0 < lo <= hi:
            raise ValueError(f"temperature_range must satisfy 0 < min <= max, got {temperature_range}")
        if not lo <= temperature_init <= hi:
            raise ValueError(f"temperature_init {temperature_init} is outside temperature_range {temperature_range}")
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        self.image_dim = image_dim
        self.text_dim = text_dim
        self.embed_dim = embed_dim
        self.temperature_init = temperature_init
        self.temperature_range = (float(lo), float(hi))
        self.queue_size = queue_size
        self.gather = gather
        self.compat_queue_noise = compat_queue_noise
        self.local_loss = local_loss
        self.rank = rank

        self.cross_modal_image_transform_itc = nn.Linear(image_dim, embed_dim)
        self.cross_modal_text_transform_itc = nn.Linear(text_dim, embed_dim)
        self.cross_modal_image_pooler_itc = Pooler(embed_dim)
        self.cross_modal_text_pooler_itc = Pooler(embed_dim)
        self.temp = nn.Parameter(torch.tensor(float(temperature_init)))

        self.register_buffer("image_queue", torch.zeros(queue_size, embed_dim), persistent=False)
        self.register_buffer("text_queue", torch.zeros(queue_size, embed_dim), persistent=False)
        self.register_buffer("index_queue", torch.full((queue_size,), -1, dtype=torch.long), persistent=False)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("queue_total", torch.zeros((), dtype=torch.long), persistent=False)
        self.reset_parameters()
        self.reset_queue()

    # ------------------------------------------------------------------ parameters and queue state

    def reset_parameters(self) -> None:
        """Reference initialisation: Linear ``N(0, 0.02)``, zero bias; ``temp`` back to ``temperature_init``."""
        init_head_weights(self)
        with torch.no_grad():
            self.temp.fill_(self.temperature_init)

    @torch.no_grad()
    def reset_queue(self, generator: torch.Generator | None = None) -> None:
        """Empty the queue (or, in compatibility mode, refill it with standard-normal noise).

        Args:
            generator: optional RNG for the compatibility-mode noise.
        """
        if self.compat_queue_noise:
            noise = torch.randn(2, self.queue_size, self.embed_dim, generator=generator, device=self.image_queue.device)
            self.image_queue.copy_(noise[0])
            self.text_queue.copy_(noise[1])
        else:
            self.image_queue.zero_()
            self.text_queue.zero_()
        self.index_queue.fill_(-1)
        self.queue_ptr.zero_()
        self.queue_total.zero_()

    def queue_state(self) -> dict[str, Tensor]:
        """Copies of the queue buffers, to checkpoint for an exact resume (see :meth:`load_queue_state`)."""
        return {k: getattr(self, k).detach().clone() for k in _QUEUE_KEYS}

    @torch.no_grad()
    def load_queue_state(self, state: dict[str, Tensor]) -> None:
        """Restore buffers saved by :meth:`queue_state`.

        Raises:
            KeyError: when a queue key is missing.
            ValueError: when a shape differs from this head's queue.
        """
        for k in _QUEUE_KEYS:
            if k not in state:
                raise KeyError(f"queue state is missing key {k!r} (expected {list(_QUEUE_KEYS)})")
            buf = getattr(self, k)
            if tuple(state[k].shape) != tuple(buf.shape):
                raise ValueError(f"queue state {k!r} has shape {tuple(state[k].shape)}, expected {tuple(buf.shape)}")
            buf.copy_(state[k])

    @property
    def num_filled(self) -> int:
        """Number of queue slots holding real features (``min(queue_total, queue_size)``; syncs the device)."""
        return min(int(self.queue_total.item()), self.queue_size)

    @torch.no_grad()
    def clamp_temperature_(self) -> Tensor:
        """Clamp ``temp`` in place to ``temperature_range`` and return it (the parameter itself)."""
        self.temp.clamp_(*self.temperature_range)
        return self.temp

    # ------------------------------------------------------------------ embeddings

    def embed_image(self, image: ImageFeatures) -> Tensor:
        """Image embedding of the dual-encoder path.

        Args:
            image: anything with ``tokens`` ``[B, N, C_img]`` (the un-fused tower output, final norm applied).

        Returns:
            ``[B, D]`` L2-normalised embeddings: transform per token -> mean over tokens -> pooler -> L2.
        """
        tokens = image.tokens
        if tokens.dim() != 3 or tokens.shape[-1] != self.image_dim:
            raise ValueError(
                f"ContrastiveHead.embed_image: expected image.tokens [B, N, {self.image_dim}], "
                f"got {tuple(tokens.shape)}"
            )
        x = self.cross_modal_image_transform_itc(tokens).mean(dim=1)
        return F.normalize(self.cross_modal_image_pooler_itc(x), dim=-1)

    def embed_text(self, text: TextFeatures) -> Tensor:
        """Text embedding of the dual-encoder path.

        Args:
            text: anything with ``hidden`` ``[B, L, C_txt]`` (the un-fused tower output).

        Returns:
            ``[B, D]`` L2-normalised embeddings: transform -> token 0 (``<s>``; or the mean over real tokens
            with ``text_pool="mean"``) -> pooler -> L2.
        """
        hidden = text.hidden
        if hidden.dim() != 3 or hidden.shape[-1] != self.text_dim:
            raise ValueError(
                f"ContrastiveHead.embed_text: expected text.hidden [B, L, {self.text_dim}], got {tuple(hidden.shape)}"
            )
        # The transform is per token and affine, so pooling first equals transforming then pooling.
        x = self.cross_modal_text_transform_itc(pool_text(hidden, getattr(text, "mask", None), self.text_pool))
        return F.normalize(self.cross_modal_text_pooler_itc(x), dim=-1)

    @staticmethod
    def similarity(image_emb: Tensor, text_emb: Tensor) -> Tensor:
        """Cosine similarity matrix for ITC retrieval (no temperature: it does not change rankings).

        Args:
            image_emb: ``[Ni, D]`` normalised image embeddings.
            text_emb: ``[Nt, D]`` normalised text embeddings.

        Returns:
            ``[Ni, Nt]`` similarities.
        """
        return image_emb @ text_emb.transpose(0, 1)

    # ------------------------------------------------------------------ loss

    def forward(
        self,
        image_emb: Tensor,
        text_emb: Tensor,
        *,
        index: Tensor | None = None,
        update_queue: bool = True,
    ) -> ContrastiveOutput:
        """ITC loss of docs/reference/training.md §1.4.

        Args:
            image_emb: ``[B, D]`` normalised image embeddings (:meth:`embed_image`).
            text_emb: ``[B, D]`` normalised text embeddings of the paired captions (:meth:`embed_text`).
            index: optional ``LongTensor [B]`` dataset indices of the pairs, recorded in the queue.
            update_queue: enqueue this step's (gathered, detached) features after the loss; only applies in
                training mode and when the head has a queue.

        Returns:
            :class:`ContrastiveOutput` with ``loss`` = ½ (CE_i2t + CE_t2i), ``logits`` ``{"i2t": [R, K],
            "t2i": [R, K]}`` (queue mode: ``R = B``, ``K = B + Q``, ``Q`` the number of scored queue entries),
            ``targets [R]``, ``num_valid``, ``column_index [K]`` and logs ``itc/loss``, ``itc/temperature``,
            ``itc/acc_i2t``, ``itc/acc_t2i``.
        """
        if image_emb.dim() != 2 or image_emb.shape != text_emb.shape or image_emb.shape[-1] != self.embed_dim:
            raise ValueError(
                f"ContrastiveHead: expected image_emb and text_emb of shape [B, {self.embed_dim}], got "
                f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
            )
        if index is not None and tuple(index.shape) != (image_emb.shape[0],):
            raise ValueError(f"ContrastiveHead: index must be [B]={image_emb.shape[0]}, got {tuple(index.shape)}")
        temp = self.clamp_temperature_()
        # Logits and losses in fp32 even under autocast: they are divided by a temperature as small as 1e-3.
        with torch.autocast(device_type=image_emb.device.type, enabled=False):
            return self._forward_fp32(image_emb.float(), text_emb.float(), temp, index, update_queue)

    def _forward_fp32(
        self, img: Tensor, txt: Tensor, temp: Tensor, index: Tensor | None, update_queue: bool
    ) -> ContrastiveOutput:
        """Body of :meth:`forward` (autocast disabled, fp32 inputs)."""
        if self.queue_size == 0 and self.gather is not None:
            return self._gathered_forward(img, txt, temp, index)

        batch = img.shape[0]
        n_queue = self.queue_size if self.compat_queue_noise else self.num_filled
        n_valid = batch + (self.num_filled if self.compat_queue_noise else n_queue)
        # Stop-gradient on the "other side": each direction only trains its query features (and temp).
        img_all = torch.cat([img.detach(), self.image_queue[:n_queue]], dim=0)
        txt_all = torch.cat([txt.detach(), self.text_queue[:n_queue]], dim=0)
        logits_i2t = img @ txt_all.t() / temp
        logits_t2i = txt @ img_all.t() / temp
        targets = torch.arange(batch, device=img.device)
        column_index = None
        if index is not None:
            column_index = torch.cat([index.to(self.index_queue), self.index_queue[:n_queue]])
        out = self._output(logits_i2t, logits_t2i, targets, temp, n_valid, column_index)
        if update_queue and self.training and self.queue_size > 0:
            self._enqueue(img.detach(), txt.detach(), index)
        return out

    def _gathered_forward(self, img: Tensor, txt: Tensor, temp: Tensor, index: Tensor | None) -> ContrastiveOutput:
        """open_clip-style global loss over the features of all ranks (gradient flows through ``gather``)."""
        assert self.gather is not None
        all_img = self.gather(img)
        all_txt = self.gather(txt)
        batch = img.shape[0]
        if self.local_loss:
            logits_i2t = img @ all_txt.t() / temp
            logits_t2i = txt @ all_img.t() / temp
            targets = torch.arange(batch, device=img.device) + self.rank * batch
        else:
            logits_i2t = all_img @ all_txt.t() / temp
            logits_t2i = logits_i2t.t()
            targets = torch.arange(all_img.shape[0], device=img.device)
        column_index = None if index is None else self.gather(index)
        return self._output(logits_i2t, logits_t2i, targets, temp, logits_i2t.shape[1], column_index)

    @staticmethod
    def _output(
        logits_i2t: Tensor,
        logits_t2i: Tensor,
        targets: Tensor,
        temp: Tensor,
        num_valid: int,
        column_index: Tensor | None,
    ) -> ContrastiveOutput:
        loss = 0.5 * (F.cross_entropy(logits_i2t, targets) + F.cross_entropy(logits_t2i, targets))
        with torch.no_grad():
            logs = {
                "itc/loss": loss.detach(),
                "itc/temperature": temp.detach().clone(),
                "itc/acc_i2t": (logits_i2t.argmax(dim=1) == targets).float().mean(),
                "itc/acc_t2i": (logits_t2i.argmax(dim=1) == targets).float().mean(),
            }
        return ContrastiveOutput(
            loss=loss,
            logits={"i2t": logits_i2t, "t2i": logits_t2i},
            logs=logs,
            targets=targets,
            num_valid=num_valid,
            column_index=column_index,
        )

    @torch.no_grad()
    def _enqueue(self, img: Tensor, txt: Tensor, index: Tensor | None) -> None:
        """Write the gathered features of all ranks at the circular pointer (docs/reference/training.md §1.4)."""
        if self.gather is not None:
            img, txt = self.gather(img), self.gather(txt)
            index = None if index is None else self.gather(index)
        n = img.shape[0]
        if index is None:
            index = torch.full((n,), -1, dtype=torch.long, device=img.device)
        size = self.queue_size
        # Slots of the n new entries on the ring; with n > size only the last `size` entries survive.
        slots = (self.queue_ptr + torch.arange(n, device=img.device)) % size
        keep = slice(max(n - size, 0), n)
        slots = slots[keep]
        self.image_queue.index_copy_(0, slots, img[keep].to(self.image_queue.dtype))
        self.text_queue.index_copy_(0, slots, txt[keep].to(self.text_queue.dtype))
        self.index_queue.index_copy_(0, slots, index[keep].to(self.index_queue))
        self.queue_ptr.copy_((self.queue_ptr + n) % size)
        self.queue_total.add_(n)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, queue_size={self.queue_size}, temperature_range={self.temperature_range}, "
            f"gathered={self.gather is not None}, local_loss={self.local_loss}, compat_queue_noise="
            f"{self.compat_queue_noise}"
        )
