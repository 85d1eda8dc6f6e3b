"""Random crop (zero padding) + horizontal flip for a whole batch at once, on whatever device holds it.

torchvision applies these per sample in Python; one gather over the padded batch does the same work
with a single indexing kernel, so augmentation keeps up with a GPU without DataLoader workers.
"""

from __future__ import annotations

import torch

PAD = 4  # the CIFAR recipe: pad 4 px on every side, crop back to the original size


def crop_flip(padded: torch.Tensor, idx: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor,
              flip: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop `size` = (h, w) at offsets (dy, dx) from samples `idx` of `padded` [N, C, H+2p, W+2p],
    mirroring left-right where `flip` is true.

    Output i equals `padded[idx[i], :, dy[i]:dy[i]+h, dx[i]:dx[i]+w]` (flipped if `flip[i]`); the dtype
    is kept, so uint8 images can be cropped before they are converted and normalised.
    """
    h, w = size
    dev = padded.device
    idx, dy, dx, flip = (t.to(dev) for t in (idx, dy, dx, flip))
    rows = dy.view(-1, 1) + torch.arange(h, device=dev)  # [B, h]
    cols = torch.arange(w, device=dev)
    cols = torch.where(flip.bool().view(-1, 1), (w - 1) - cols, cols) + dx.view(-1, 1)  # [B, w]
    chans = torch.arange(padded.shape[1], device=dev)
    return padded[idx.view(-1, 1, 1, 1), chans.view(1, -1, 1, 1), rows.view(-1, 1, h, 1),
                  cols.view(-1, 1, 1, w)]
